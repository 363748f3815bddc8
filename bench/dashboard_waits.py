"""What a user waits for in the dashboard after each change, driven through Streamlit's AppTest on a
synthetic store, with plain UMAP on the same tokens measured in the same run as the yardstick.

    python bench/dashboard_waits.py            # --prompts 8 --branches 18 --length 40 --d 640
    python bench/dashboard_waits.py --store branchlens.duckdb   # an existing store (the demo), read only
    python bench/dashboard_waits.py --store branchlens.duckdb --fresh-start   # + the first start, measured
        # in new processes: kernels as the setup command left them, and compiled from nothing

The store: `python -m views synthetic` (known positional helix, branch content); fresh view cache;
numba kernels compiled or loaded from disk once before the first step (as the app's warm-up does).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _other_layer(at) -> None:
    """The first layer in the list other than the one shown (not computed yet in this run)."""
    box = at.selectbox(key="layer")
    box.set_value(next(int(o) for o in box.options if int(o) != box.value))


STEPS = [  # (what the user does, how AppTest does it)
    ("first view (4 prompts)", lambda at: None),
    ("layer change", lambda at: _other_layer(at)),
    ("method change (regression)", lambda at: at.selectbox(key="method").set_value("regression")),
    (
        "all prompts",
        lambda at: next(m for m in at.multiselect if m.label == "Prompts").set_value(
            list(range(len(next(m for m in at.multiselect if m.label == "Prompts").options)))
        ),
    ),
    ("layer change, all prompts", lambda at: _other_layer(at)),
    ("method change (auto), all prompts", lambda at: at.selectbox(key="method").set_value("auto")),
    (
        "fit on plotted tokens (= the whole run)",
        lambda at: at.selectbox(key="fit_scope").set_value("plotted"),
    ),
    ("PCA instead of UMAP", lambda at: at.radio(key="projection").set_value("pca")),
    ("rerun, nothing changed", lambda at: None),
    ("open the Layers tab", lambda at: at.session_state.__setitem__("tab", "Layers")),
    ("open the Clusters tab", lambda at: at.session_state.__setitem__("tab", "Clusters")),
]


FIRST_VIEW = """
import sys
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[1], default_timeout=1800)
at.session_state["store_path"] = sys.argv[2]
at.run()
assert not at.exception, [e.value for e in at.exception]
assert any("Position explains" in m.value for m in at.markdown), "no verdict: the first view was not drawn"
"""


def fresh_start(store: Path, tmp: Path, cold: bool) -> float:
    """Seconds from starting a new Python process to the app's first view drawn in it (AppTest: the
    server's first run without the browser), the app's own kernel warm-up on, a fresh view cache. cold:
    numba's cache in an empty directory, so every kernel compiles (a checkout before the setup command)."""
    env = {k: v for k, v in os.environ.items() if k not in ("BRANCHLENS_NO_WARMUP", "NUMBA_CACHE_DIR")}
    env["BRANCHLENS_CACHE"] = str(Path(tempfile.mkdtemp(dir=tmp)))
    if cold:
        env["NUMBA_CACHE_DIR"] = str(Path(tempfile.mkdtemp(dir=tmp)))
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", FIRST_VIEW, str(ROOT / "app.py"), str(store)], cwd=ROOT, env=env, check=True
    )
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--branches", type=int, default=18)
    p.add_argument("--length", type=int, default=40)
    p.add_argument("--d", type=int, default=640)
    p.add_argument("--store", help="measure this store (read only) instead of a new synthetic one")
    p.add_argument(
        "--fresh-start",
        action="store_true",
        help="also time the first view in new processes, kernels warm (after the setup command) and cold",
    )
    args = p.parse_args()
    warnings.simplefilter("ignore")
    tmp = Path(tempfile.mkdtemp())
    store = Path(args.store).resolve() if args.store else tmp / "bench.duckdb"
    if not args.store:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "views",
                "synthetic",
                str(store),
                "--prompts",
                str(args.prompts),
                "--branches",
                str(args.branches),
                "--length",
                str(args.length),
                "--d",
                str(args.d),
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    starts = []
    if args.fresh_start:
        load = os.getloadavg()[0]
        starts = [
            (f"first start, kernels on disk (load {load:.1f})", fresh_start(store, tmp, cold=False)),
            ("first start, kernels compiled from nothing", fresh_start(store, tmp, cold=True)),
        ]
    os.environ.update(BRANCHLENS_NO_WARMUP="1", BRANCHLENS_CACHE=str(tmp / "cache"))
    sys.path.insert(0, str(ROOT))
    from streamlit.testing.v1 import AppTest

    from analysis.engine import jit

    jit.warm_up()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=1800)
    at.session_state["store_path"] = str(store)
    what = (
        str(store)
        if args.store
        else (f"{args.prompts} prompts x {args.branches + 1} branches, length {args.length}, d={args.d}")
    )
    print(f"store: {what}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    waits = []
    for name, act in STEPS:
        act(at)
        t = time.perf_counter()
        at.run()
        waits.append((name, time.perf_counter() - t))
        assert not at.exception, [e.value for e in at.exception]
    # the yardstick: plain umap-learn on all the stored tokens of one layer, in this process, warm
    import umap

    from store import queries
    from store.connect import reading

    with reading(store) as con:
        _, X = queries.token_rows(con, at.selectbox(key="run").value, int(at.selectbox(key="layer").value))
    umap.UMAP().fit_transform(X[:500])
    t = time.perf_counter()
    umap.UMAP().fit_transform(X)
    plain = time.perf_counter() - t
    tokens = X
    print(f"\n{'step':<42} {'wait':>7}   ratio to plain UMAP of {len(tokens)} tokens ({plain:.2f} s)")
    for name, seconds in starts + waits:
        print(f"{name:<42} {seconds:6.1f} s   {seconds / plain:5.2f}")


if __name__ == "__main__":
    main()
