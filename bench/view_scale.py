"""A whole dashboard view (residualize + project + metrics with bands) against the number of tokens.

Issue 15's goals (2-core dev machine, warm, default ViewSpec, synthetic branch trees at d=640):
  100k view <= 6x the 20k view in the same run; 200k <= 15 s; 1M <= 90 s; peak RSS <= 6 GB at 1M;
  landmark layout's trustworthiness within 0.02 of the exact full layout at 50k (both printed).
Each size runs in its own process (so its peak RSS is its own): it builds the data, warms the kernels on
a 3k-token view, then times one view, its residuals written over the input as views.service does
(`in_place`). Ratios are to the first size, measured in the same run. With --against DIR, every size also
runs with the code of another checkout (e.g. the commit before a change), alternating, so before and after
are measured side by side on the same (shared, noisy) machine.

    python bench/view_scale.py                      # 20k 50k 100k 200k, and the quality check at 50k
    python bench/view_scale.py --sizes 200000 --no-quality --against /tmp/base   # before / after at 200k
    python bench/view_scale.py --sizes 1000000 --no-quality                      # the whole view at 1M
    python bench/view_scale.py --sizes 20000 1000000 --no-quality --no-removal   # projection + kNN measures
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tokens_for(n: int, d: int = 640, seed: int = 0):
    """Exactly n tokens of synthetic branch trees (10 branches of up to 200 tokens per prompt), built 40
    prompts at a time in float32 so that 1M tokens fit; random token ids (vocabulary 5000) so the
    token-identity metric runs too (its value is at chance here)."""
    from analysis.synthetic import branch_tree
    from analysis.tokens import TokenSet

    X = np.empty((n, d), np.float32)
    position, branch, prompt = (np.empty(n, np.int64) for _ in range(3))
    filled, chunk = 0, 0
    while filled < n:
        tree = branch_tree(n_prompts=40, branches_per_prompt=10, length=200, d=d, seed=seed + chunk)
        take = min(len(tree), n - filled)
        X[filled : filled + take] = tree.X[:take]
        position[filled : filled + take] = tree.position[:take]
        branch[filled : filled + take] = tree.branch[:take] + chunk * 1_000_000
        prompt[filled : filled + take] = tree.prompt[:take] + chunk * 1_000
        filled += take
        chunk += 1
    token_id = np.random.default_rng(seed).integers(0, 5000, n)
    return TokenSet(X, position, branch, prompt, {"token_id": token_id})


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def neighbour_steps(tokens) -> tuple[dict, dict]:
    """Only what analysis.engine.neighbours serves, on the raw vectors: the projection and every kNN measure
    (R2_pos and the removal left out). Returns (timings, metrics)."""
    from analysis import ViewSpec, project
    from analysis.measures import MEASURES, Context

    spec = ViewSpec()
    t = time.perf_counter()
    coords = project(tokens.X, spec.projection)
    timings = {"project": time.perf_counter() - t}
    t = time.perf_counter()
    space = tokens.X / np.linalg.norm(tokens.X, axis=1, keepdims=True)
    ctx = Context(tokens, space, coords, spec.k, spec.window, spec.n_queries)
    metrics = {key: m.compute(ctx) for key, m in MEASURES.items() if key != "r2_pos"}
    timings["knn metrics"] = time.perf_counter() - t
    return timings, metrics


def one(n: int, removal: bool = True) -> dict:
    """Time one warm default view of n tokens in this process (or, without removal, neighbour_steps)."""
    import inspect

    from analysis import ViewSpec, compute_view

    tokens = tokens_for(n)
    data_rss = peak_rss_gb()
    compute_view(tokens.subset(np.arange(3000)), ViewSpec())  # kernels compiled / loaded from disk
    # the service's call: its freshly read vectors become the residuals (code before `in_place` copies)
    lean = {"in_place": True} if "in_place" in inspect.signature(compute_view).parameters else {}
    t = time.perf_counter()
    if removal:
        view = compute_view(tokens, ViewSpec(), **lean)
        steps, m = view.timings, view.metrics
    else:
        steps, m = neighbour_steps(tokens)
    wall = time.perf_counter() - t
    return {
        "n": n,
        "wall": wall,
        "steps": steps,
        "peak_rss_gb": peak_rss_gb(),
        "data_rss_gb": data_rss,
        "leak": [m["leak"]["leak"], m["leak"]["sd"]],
        "nn_branch": [m["nn_branch"]["purity"], m["nn_branch"]["sd"]],
        "trust": [m["projection"]["trustworthiness"], m["projection"]["sd"]],
    }


def quality(n: int) -> dict:
    """Trustworthiness of the landmark layout and of the full UMAP on exact neighbours, same residuals."""
    import importlib

    from analysis import ViewSpec
    from analysis.engine import neighbours
    from analysis.metrics import trustworthiness
    from analysis.view import residualize

    P = importlib.import_module("analysis.project")  # `analysis.project` the attribute is the function
    tokens = tokens_for(n)
    _, kept, _ = residualize(tokens, ViewSpec())
    spec = P.ProjectionSpec()
    X = kept.X / np.linalg.norm(kept.X, axis=1, keepdims=True)
    Y = P.pca_reduce(X, spec.pca_dims, spec.seed)
    P.umap_layout(Y[:3000], spec)  # warm
    t = time.perf_counter()
    landmark = P.landmark_layout(Y, spec)
    t_landmark = time.perf_counter() - t
    exact_max = neighbours.EXACT_GRAPH_MAX
    neighbours.EXACT_GRAPH_MAX = len(Y)  # exact kNN graph of all points (brute force)
    try:
        t = time.perf_counter()
        full = P.umap_layout(Y, spec)
        t_full = time.perf_counter() - t
    finally:
        neighbours.EXACT_GRAPH_MAX = exact_max
    out = {"n": len(Y)}
    for name, coords, secs in (("landmark", landmark, t_landmark), ("full exact", full, t_full)):
        q = trustworthiness(X, coords, k=10)
        out[name] = {
            "trust": q["trustworthiness"],
            "sd": q["sd"],
            "continuity": q["continuity"],
            "secs": secs,
        }
    return out


def child(args: list[str], root: Path = ROOT) -> dict:
    """Run this script with `args` in a fresh process, on the code of checkout `root`."""
    script = root / "bench" / "view_scale.py"
    out = subprocess.run(
        [sys.executable, str(script if root != ROOT else Path(__file__)), *args],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    if out.returncode:
        return {
            "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


def quality_line(r: dict) -> str:
    return (
        f"leak {r['leak'][0]:+.3f} ±{1.96 * r['leak'][1]:.3f}, branch 1-NN {r['nn_branch'][0]:.3f} "
        f"±{1.96 * r['nn_branch'][1]:.3f}, trustworthiness {r['trust'][0]:.3f} ±{1.96 * r['trust'][1]:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 50_000, 100_000, 200_000])
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument(
        "--no-removal",
        action="store_true",
        help="time only the projection and the kNN measures (what analysis.engine.neighbours serves)",
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--against", type=Path, help="another checkout: each size also runs on its code")
    parser.add_argument("--quality-at", type=int, default=50_000)
    parser.add_argument("--quality-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.one:
        print(json.dumps(one(args.one, removal=not args.no_removal)))
        return
    if args.quality_only:
        print(json.dumps(quality(args.quality_at)))
        return
    goals = {100_000: None, 200_000: 15.0, 1_000_000: 90.0}
    base = None
    print(f"{'tokens':>9} {'view':>8} {'ratio':>6} {'peak RSS':>9} {'data':>6}  steps (s)")
    for n in args.sizes:
        one_args = ["--one", str(n), *(["--no-removal"] if args.no_removal else [])]
        if args.against:
            b = child(one_args, args.against.resolve())
            print(
                f"{n:>9} {'failed: ' + b['error'] if 'error' in b else format(b['wall'], '7.2f') + 's'}"
                + (
                    ""
                    if "error" in b
                    else f"        {b['peak_rss_gb']:7.2f}GB {b['data_rss_gb']:5.2f}GB  "
                    + ", ".join(f"{k} {v:.1f}" for k, v in b["steps"].items())
                )
                + f"  ({args.against})"
            )
        r = child(one_args)
        if "error" in r:
            print(f"{n:>9} failed: {r['error']}")
            continue
        if args.against and "error" not in b:
            print(f"{'':>9} {args.against.name}: " + quality_line(b))
            print(
                f"{'':>9} this checkout / {args.against.name}: view {r['wall'] / b['wall']:.2f}x, "
                f"peak RSS {r['peak_rss_gb'] / b['peak_rss_gb']:.2f}x"
            )
        base = base or r
        ratio = r["wall"] / base["wall"]
        goal = goals.get(n)
        verdict = ""
        if n == 100_000 and base["n"] == 20_000:
            verdict = f"  (goal <= 6x the 20k view: {'met' if ratio <= 6 else 'MISSED'})"
        elif goal:
            verdict = f"  (goal <= {goal:g} s: {'met' if r['wall'] <= goal else 'MISSED'})"
        if n == 1_000_000:
            verdict += f"  (peak RSS goal <= 6 GB: {'met' if r['peak_rss_gb'] <= 6 else 'MISSED'})"
        steps = ", ".join(f"{k} {v:.1f}" for k, v in r["steps"].items())
        print(
            f"{n:>9} {r['wall']:7.2f}s {ratio:5.2f}x {r['peak_rss_gb']:7.2f}GB {r['data_rss_gb']:5.2f}GB  {steps}{verdict}"
        )
        print(f"{'':>9} " + quality_line(r))
    if not args.no_quality:
        q = child(["--quality-only", "--quality-at", str(args.quality_at)])
        if "error" in q:
            print(f"quality check failed: {q['error']}")
            return
        lm, full = q["landmark"], q["full exact"]
        gap = full["trust"] - lm["trust"]
        print(f"\nlayout quality at {q['n']} tokens (k=10, 1500 sampled tokens, ±1.96 sd):")
        for name in ("landmark", "full exact"):
            v = q[name]
            print(
                f"  {name:<10} trustworthiness {v['trust']:.4f} ±{1.96 * v['sd']:.4f}, continuity "
                f"{v['continuity']:.4f}, layout {v['secs']:.1f} s"
            )
        print(f"  gap {gap:+.4f} (goal: within 0.02: {'met' if abs(gap) <= 0.02 else 'MISSED'})")


if __name__ == "__main__":
    main()
