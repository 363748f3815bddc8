"""Store read speed: the latents of one layer into a numpy array, against np.load of the same array.

Builds a store through the real writer (one transaction per prompt, 5 layers interleaved as ingest writes
them), then reads one layer, side by side in one process:

- `np.load` of the same (n, d) float32 array from an .npy file (the floor: page cache to memory);
- `store.queries.layer_vectors` and `token_rows` (the app's read: labels + vectors), the product's path;
- for reference, the same rows with `ORDER BY branch_id, position` inside DuckDB (the query used before),
  and a token_rows-style three-way join that carries the vectors.

Every figure is the median of --repeats warm reads (files in the page cache) and is given as MB/s of
vector bytes and as a ratio to np.load.

    python bench/store_read.py            # --tokens 200000 --dim 640 --layers 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from analysis.synthetic import branch_tree
from store import reading
from store.compact import compact
from store.queries import layer_vectors, token_rows
from views.synthetic import write_tree


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def read_all(store: Path, run_id: str, layer: int, reference: np.ndarray, repeats: int) -> dict[str, float]:
    out = {}
    with reading(store) as con:
        s, (_, vecs) = timed(lambda: layer_vectors(con, run_id, layer), repeats)
        assert np.array_equal(vecs, reference)
        out["layer_vectors"] = s
        s, (labels, vecs) = timed(lambda: token_rows(con, run_id, layer), repeats)
        assert np.array_equal(vecs, reference) and labels.height == len(reference)
        out["token_rows (labels + vectors)"] = s
        # References: the same vectors with the sort / join done inside DuckDB (the queries used before).
        sql_sorted = (
            "SELECT branch_id, position, vec FROM latents WHERE run_id = ? AND layer = ? "
            "AND variant = 'normal' ORDER BY branch_id, position"
        )
        out["DuckDB ORDER BY (before)"] = timed(
            lambda: con.sql(sql_sorted, params=[run_id, layer]).to_arrow_table(), repeats
        )[0]
        sql_join = (
            "SELECT l.branch_id, l.position, t.token_text, l.vec FROM latents l "
            "JOIN tokens t USING (run_id, branch_id, position) JOIN branches b USING (run_id, branch_id) "
            "WHERE l.run_id = ? AND l.layer = ? AND l.variant = 'normal' ORDER BY l.branch_id, l.position"
        )
        out["DuckDB join + ORDER BY (token_rows before)"] = timed(
            lambda: con.sql(sql_join, params=[run_id, layer]).to_arrow_table(), repeats
        )[0]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=640)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    n_prompts = max(1, args.tokens // 2000)
    tree = branch_tree(n_prompts=n_prompts, branches_per_prompt=20, length=100, d=args.dim, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        store, npy = Path(tmp) / "read.duckdb", Path(tmp) / "layer.npy"
        t0 = time.perf_counter()
        run_id = write_tree(store, tree, extra_layers=args.layers - 1)
        write_s = time.perf_counter() - t0
        layer = args.layers // 2
        with reading(store) as con:
            keys, reference = layer_vectors(con, run_id, layer)
        np.save(npy, reference)
        mb = reference.nbytes / 1e6

        np_s, arr = timed(lambda: np.load(npy), args.repeats)
        assert np.array_equal(arr, reference)
        reads = {"np.load": np_s}
        size = {"as written": store.stat().st_size}
        reads |= {
            f"{k} [as written]": v for k, v in read_all(store, run_id, layer, reference, args.repeats).items()
        }
        t0 = time.perf_counter()
        compact(store)
        compact_s = time.perf_counter() - t0
        size["compacted"] = store.stat().st_size
        reads |= {
            f"{k} [compacted]": v for k, v in read_all(store, run_id, layer, reference, args.repeats).items()
        }
    print(
        json.dumps(
            {
                "tokens_per_layer": len(reference),
                "dim": args.dim,
                "layers": args.layers,
                "layer_MB": round(mb, 1),
                "store_MB": {k: round(v / 1e6, 1) for k, v in size.items()},
                "write_s": round(write_s, 1),
                "compact_s": round(compact_s, 1),
                "reads": {
                    name: {
                        "s": round(s, 3),
                        "MB_per_s": round(mb / s),
                        "ratio_vs_np_load": round(np_s / s, 3),
                    }
                    for name, s in reads.items()
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
