"""Latents from elsewhere into a store, and a run's latents out as plain arrays (issue 33).

The exchange format is two files that NumPy, pandas, polars and Arrow read as they are:

    tokens.parquet (or .csv)   one row per stored token, ordered as the latents' rows:
        prompt_id, branch_id, parent_branch_id (empty for a root), position, token_id, token_text
        optional: prompt_text, is_prompt, logprob, entropy, branch_kind, branch_path, ended_with_eos
    latents.npz (or .safetensors)   one (tokens, d) float array per layer, named layer_<L>

A branch holds its own tokens only (positions fork_position .. end, contiguous), as in the store: a fork
starts where it leaves its parent, a root at position 0. Whole sequences with shared prefixes (a
sequence_id column instead of branch_id/parent_branch_id, `--sequences`) are turned into such a tree. Independent samples are roots of their own
prompts, or siblings with one parent. Import checks the whole input before writing anything (one
StoreError line naming the first problem), then writes one transaction per prompt, like ingest, so a
killed import resumes with the same command; the run record says `"source": "import"` in its config.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from store.connect import reading
from store.errors import StoreError
from store.records import BranchRecord, RunRecord, is_run_name

REQUIRED = ("prompt_id", "branch_id", "parent_branch_id", "position", "token_id", "token_text")
OPTIONAL = ("prompt_text", "is_prompt", "logprob", "entropy")  # carried from whole sequences into the tree
PE_TYPES = ("learned_absolute", "rope", "alibi", "unknown")


@dataclass
class ImportReport:
    run_id: str
    store: Path
    prompts_written: int
    prompts_before: int
    tokens: int
    layers: list[int]

    def summary(self) -> str:
        return (
            f"run {self.run_id}: {self.prompts_written} prompts imported into {self.store} "
            f"({self.prompts_before} there before); {self.tokens} tokens x layers {self.layers}"
        )


def export_arrays(store: str | Path, run_id: str, out_dir: str | Path, variant: str = "normal") -> Path:
    """Write a run's tokens (tokens.parquet), latents (latents.npz, one array per layer, rows in the
    tokens' order) and its record (run.json) into out_dir; returns out_dir."""
    from store import queries

    out = Path(out_dir)
    with reading(store) as con:
        run = queries.run_row(con, run_id)
        if run is None:
            raise StoreError(f"{store} has no run '{run_id}'")
        tokens = queries.exchange_tokens(con, run_id)
        layers = queries.run_layers(con, run_id).get(variant, [])
        arrays = {}
        for layer in layers:
            keys, X = queries.layer_vectors(con, run_id, layer, variant)
            if not keys.equals(tokens.select("branch_id", "position")):
                raise StoreError(f"run '{run_id}' layer {layer} does not hold one latent per token")
            arrays[f"layer_{layer}"] = X
    try:
        out.mkdir(parents=True, exist_ok=True)
        tokens.write_parquet(out / "tokens.parquet")
        np.savez(out / "latents.npz", **arrays)
        (out / "run.json").write_text(
            json.dumps(
                {k: run[k] for k in ("model", "n_layers", "pe_type")}
                | {"run_id": run_id, "variant": variant},
                indent=1,
            )
        )
    except OSError as exc:
        raise StoreError(f"cannot write to {out}: {exc.strerror or exc}") from None
    return out


def read_tokens(path: str | Path, sequences: bool = False) -> pl.DataFrame:
    """The token table of a Parquet or CSV file, its required columns checked (a tree's, or with
    sequences=True whole sequences')."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            table = pl.read_parquet(path)
        elif path.suffix.lower() == ".csv":
            table = pl.read_csv(path, schema_overrides={"token_text": pl.String, "prompt_text": pl.String})
        else:
            raise StoreError(f"token table {path} must be .parquet or .csv")
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise StoreError(f"cannot read token table {path}: {str(exc).splitlines()[0]}") from None
    need = SEQUENCE_COLUMNS if sequences else REQUIRED
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise StoreError(f"token table {path} lacks column(s) {', '.join(missing)} (needs {', '.join(need)})")
    return table


def read_latents(path: str | Path) -> dict[int, np.ndarray]:
    """layer -> (tokens, d) float32 array, from an .npz (arrays layer_<L>) or .safetensors file."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as f:
                raw = {k: f[k] for k in f.files}
        elif path.suffix.lower() == ".safetensors":
            from safetensors.numpy import load_file

            raw = load_file(str(path))
        else:
            raise StoreError(f"latents {path} must be .npz or .safetensors")
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, a truncated zip (BadZipFile), a corrupt safetensors header
        text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"cannot read latents {path}: {text}") from None
    out = {}
    for name, array in raw.items():
        layer = name.removeprefix("layer_")
        if not layer.isdigit():
            raise StoreError(f"latents {path}: array '{name}' is not named layer_<L> (L the layer number)")
        if array.ndim != 2:
            raise StoreError(f"latents {path}: array '{name}' has shape {array.shape}, not (tokens, d)")
        out[int(layer)] = array
    if not out:
        raise StoreError(f"latents {path} holds no arrays")
    return dict(sorted(out.items()))


SEQUENCE_COLUMNS = ("prompt_id", "sequence_id", "position", "token_id", "token_text")


def from_sequences(
    table: pl.DataFrame, latents: dict[int, np.ndarray]
) -> tuple[pl.DataFrame, dict[int, np.ndarray]]:
    """Whole sequences (one row per token of each sequence, from position 0: prompt_id, sequence_id,
    position, token_id, token_text; latents rows in the table's order) as the exchange's tree: per
    prompt, sequences in order of first appearance; each sequence forks off the earlier one it shares the
    longest prefix of, where they part, and stores only its tokens from there (the shared prefix's
    latents are the earlier sequence's, as a causal model computes the same ones); a sequence that is a
    prefix of an earlier one adds nothing; one that shares nothing is another root of its prompt."""
    missing = [c for c in SEQUENCE_COLUMNS if c not in table.columns]
    if missing:
        raise StoreError(
            f"sequence table lacks column(s) {', '.join(missing)} (needs {', '.join(SEQUENCE_COLUMNS)})"
        )
    for layer, array in latents.items():
        if array.shape[0] != len(table):
            raise StoreError(f"layer {layer} has {array.shape[0]} rows, the sequence table {len(table)}")
    if table.is_empty():
        raise StoreError("the sequence table holds no rows")
    table = table.with_row_index("_src")
    optional = [c for c in OPTIONAL if c in table.columns]
    rows, keep, next_id = [], [], 0
    for (prompt_id,), prompt in table.group_by(["prompt_id"], maintain_order=True):
        done: list[tuple[list[int], list[tuple[int, int]]]] = []  # (token ids, lineage [(start, branch)])
        for (_seq,), seq in prompt.group_by(["sequence_id"], maintain_order=True):
            seq = seq.sort("position")
            if seq["position"].to_list() != list(range(len(seq))):
                raise StoreError(
                    f"sequence {_seq} of prompt {prompt_id} does not hold positions 0..{len(seq) - 1} once each"
                )
            ids = seq["token_id"].to_list()
            best, k = None, 0
            for other in done:  # the earlier sequence sharing the longest prefix
                n = 0
                while n < min(len(ids), len(other[0])) and ids[n] == other[0][n]:
                    n += 1
                if n > k:
                    best, k = other, n
            if best is not None and k == len(ids):
                continue  # a prefix of an earlier sequence: already stored
            parent = None
            lineage: list[tuple[int, int]] = []
            if best is not None:
                lineage = [(start, b) for start, b in best[1] if start < k]
                parent = lineage[-1][1]
            branch = next_id
            next_id += 1
            own = seq[k:]
            rows.append(
                own.select(
                    pl.lit(prompt_id).alias("prompt_id"),
                    pl.lit(branch).alias("branch_id"),
                    pl.lit(parent, pl.Int64).alias("parent_branch_id"),
                    "position",
                    "token_id",
                    "token_text",
                    *optional,
                )
            )
            keep.append(own["_src"].to_numpy())
            done.append((ids, [*lineage, (k, branch)]))
    out = pl.concat(rows, how="vertical_relaxed")
    index = np.concatenate(keep)
    return out, {layer: array[index] for layer, array in latents.items()}


def split_roots(tokens: pl.DataFrame) -> pl.DataFrame:
    """A root branch whose rows say is_prompt = false from some position on holds a prompt and what was
    generated after it: the store keeps those apart (a root's tokens are its prompt), so the generated
    part becomes a child branch (a new id, kind sample) forking where the prompt ends, and the root's
    children that fork later hang from it. Without an is_prompt column, or with no prompt row in a root,
    a root's tokens are its prompt."""
    if "is_prompt" not in tokens.columns or tokens.is_empty():
        return tokens
    roots = tokens.filter(pl.col("parent_branch_id").is_null())
    gen = (
        roots.filter(~pl.col("is_prompt").fill_null(False))
        .group_by("branch_id")
        .agg(pl.col("position").min().alias("k"))
        .filter(pl.col("k") > 0)
    )  # no prompt rows at all: left whole
    if gen.is_empty():
        return tokens
    next_id = int(tokens["branch_id"].max()) + 1
    for root, k in gen.sort("branch_id").iter_rows():
        new = next_id
        next_id += 1
        after = (pl.col("branch_id") == root) & (pl.col("position") >= k)
        later_child = (pl.col("parent_branch_id") == root) & (
            pl.col("branch_id").is_in(
                tokens.filter(pl.col("parent_branch_id") == root)
                .group_by("branch_id")
                .agg(pl.col("position").min())
                .filter(pl.col("position") > k)["branch_id"]
                .implode()
            )
        )
        tokens = tokens.with_columns(
            pl.when(after)
            .then(pl.lit(root))
            .when(later_child)
            .then(pl.lit(new))
            .otherwise(pl.col("parent_branch_id"))
            .alias("parent_branch_id"),
            pl.when(after).then(pl.lit(new)).otherwise(pl.col("branch_id")).alias("branch_id"),
        )
        if "branch_kind" in tokens.columns:
            tokens = tokens.with_columns(
                pl.when(pl.col("branch_id") == new)
                .then(pl.lit("sample"))
                .otherwise(pl.col("branch_kind"))
                .alias("branch_kind")
            )
    return tokens


def check(tokens: pl.DataFrame, latents: dict[int, np.ndarray]) -> None:
    """One StoreError line for the first thing that breaks the store contract; nothing when all holds."""
    n = len(tokens)
    widths = {a.shape[1] for a in latents.values()}
    for layer, array in latents.items():
        if array.shape[0] != n:
            raise StoreError(
                f"layer {layer} has {array.shape[0]} rows, the token table {n}: one latent per token row"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise StoreError(f"layer {layer} is {array.dtype}, not floating point")
        if not np.isfinite(array).all():
            bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
            raise StoreError(f"layer {layer} holds NaN or infinite values (first at token row {bad})")
    if len(widths) != 1:
        raise StoreError(f"the layers have different widths {sorted(widths)}")
    for c in ("prompt_id", "branch_id", "position", "token_id"):
        if tokens[c].null_count():
            raise StoreError(f"column {c} has empty values")
        if not tokens[c].dtype.is_integer():
            raise StoreError(f"column {c} must hold integers, holds {tokens[c].dtype}")
    if tokens["token_text"].null_count():
        raise StoreError("column token_text has empty values")
    dup = tokens.group_by("branch_id", "position").len().filter(pl.col("len") > 1)
    if len(dup):
        b, p = dup.sort("branch_id", "position").row(0)[:2]
        raise StoreError(f"branch {b} has position {p} more than once ({len(dup)} duplicated positions)")
    per = tokens.group_by("branch_id").agg(
        pl.col("prompt_id").n_unique().alias("prompts"),
        pl.col("parent_branch_id").n_unique().alias("parents"),
        pl.col("prompt_id").first(),
        pl.col("parent_branch_id").first().alias("parent"),
        pl.col("position").min().alias("start"),
        pl.col("position").max().alias("end"),
        pl.len().alias("n"),
    )
    for row in per.sort("branch_id").iter_rows(named=True):
        b = row["branch_id"]
        if row["prompts"] > 1 or row["parents"] > 1:
            raise StoreError(f"branch {b} has more than one prompt_id or parent_branch_id")
        if row["end"] - row["start"] + 1 != row["n"]:
            raise StoreError(
                f"branch {b}'s positions are not contiguous ({row['n']} tokens over "
                f"{row['start']}..{row['end']})"
            )
    info = {r["branch_id"]: r for r in per.iter_rows(named=True)}
    for b, row in sorted(info.items()):
        parent = row["parent"]
        if parent is None:
            if row["start"] != 0:
                raise StoreError(f"branch {b} has no parent but starts at position {row['start']}, not 0")
            continue
        if parent not in info:
            raise StoreError(f"branch {b}'s parent branch {parent} is not in the table")
        if info[parent]["prompt_id"] != row["prompt_id"]:
            raise StoreError(f"branch {b} (prompt {row['prompt_id']}) has a parent of another prompt")
        if not info[parent]["start"] < row["start"] <= info[parent]["end"] + 1:
            raise StoreError(
                f"branch {b} starts at {row['start']}, outside what its parent {parent} continues "
                f"({info[parent]['start'] + 1}..{info[parent]['end'] + 1})"
            )
        depth, seen = 0, {b}
        while parent is not None:  # a loop of parents would never reach a root
            if parent in seen:
                raise StoreError(f"branch {b}'s parents loop back to branch {parent}")
            seen.add(parent)
            parent, depth = info[parent]["parent"], depth + 1


def _records(
    tokens: pl.DataFrame, latents: dict[int, np.ndarray], prompt_ids: list[int]
) -> Iterator[tuple[int, str, int, list[BranchRecord]]]:
    """(prompt_id, text, n_prompt_tokens, [BranchRecord]) per prompt of a checked input, one at a time (only
    one prompt's latents are copied at once). tokens carries its row numbers in `_row`."""
    layers = list(latents)
    parents = dict(tokens.select("branch_id", "parent_branch_id").unique("branch_id").iter_rows())
    for prompt_id in prompt_ids:
        prompt = tokens.filter(pl.col("prompt_id") == prompt_id)
        records = []
        for (branch_id,), br in prompt.sort("branch_id", "position").group_by(
            ["branch_id"], maintain_order=True
        ):
            idx = br["_row"].to_numpy()
            depth, p = 0, parents[branch_id]
            while p is not None:
                depth, p = depth + 1, parents[p]
            n = len(br)
            nan = np.full(n, np.nan)
            kind = (
                br["branch_kind"][0]
                if "branch_kind" in br.columns
                else ("prompt" if depth == 0 else "sample" if depth == 1 else "fork")
            )
            records.append(
                BranchRecord(
                    branch_id=int(branch_id),
                    prompt_id=int(prompt_id),
                    parent_branch_id=parents[branch_id],
                    fork_position=int(br["position"][0]),
                    depth=depth,
                    kind=str(kind),
                    path=str(br["branch_path"][0]) if "branch_path" in br.columns else f"b{branch_id}",
                    token_ids=br["token_id"].to_numpy().astype(np.int32),
                    token_texts=br["token_text"].to_list(),
                    logprobs=np.asarray(
                        br["logprob"].to_numpy() if "logprob" in br.columns else nan, np.float32
                    ),
                    entropies=np.asarray(
                        br["entropy"].to_numpy() if "entropy" in br.columns else nan, np.float32
                    ),
                    ended_with_eos=bool(br["ended_with_eos"][0]) if "ended_with_eos" in br.columns else False,
                    latents=np.stack([latents[li][idx] for li in layers]).astype(np.float32),
                )
            )
        roots = [r for r in records if r.parent_branch_id is None]
        root = min(roots, key=lambda r: r.branch_id) if roots else records[0]
        is_prompt = prompt.filter(pl.col("branch_id") == root.branch_id)
        n_prompt = int(is_prompt["is_prompt"].sum()) if "is_prompt" in prompt.columns else root.n_tokens
        text = (
            str(prompt["prompt_text"][0])
            if "prompt_text" in prompt.columns and prompt["prompt_text"][0] is not None
            else "".join(is_prompt["token_text"].to_list()[:n_prompt])
        )
        yield int(prompt_id), text, n_prompt, records


def _digest(*paths: Path) -> str:
    """The first 16 hex digits of the SHA-256 of the files' bytes, one after the other."""
    from store.shards import sha256_of

    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            sha256_of(f, h)
    return h.hexdigest()[:16]


def import_arrays(
    store: str | Path,
    tokens_path: str | Path,
    latents_path: str | Path,
    run_id: str | None = None,
    model: str = "imported",
    pe_type: str = "unknown",
    n_layers: int | None = None,
    created_by: str = "branchlens import",
    sequences: bool = False,
) -> ImportReport:
    """Import a run from a token table and per-layer latents (see the module docstring) into `store`
    (created if missing); sequences=True: the table holds whole sequences (from_sequences). Checks
    everything first; then one transaction per prompt, skipping prompts already there, so the same
    command resumes."""
    tokens_path, latents_path = Path(tokens_path), Path(latents_path)
    tokens = read_tokens(tokens_path, sequences)
    latents = read_latents(latents_path)
    if tokens.is_empty():
        raise StoreError(f"token table {tokens_path} holds no rows")
    digest = _digest(tokens_path, latents_path)
    return import_tables(
        store,
        tokens,
        latents,
        digest,
        run_id,
        model,
        pe_type,
        n_layers,
        created_by,
        sequences,
        {"tokens": str(tokens_path), "latents": str(latents_path)},
    )


def import_tables(
    store: str | Path,
    tokens: pl.DataFrame,
    latents: dict[int, np.ndarray],
    digest: str,
    run_id: str | None = None,
    model: str = "imported",
    pe_type: str = "unknown",
    n_layers: int | None = None,
    created_by: str = "branchlens import",
    sequences: bool = False,
    origin: dict | None = None,
) -> ImportReport:
    """import_arrays on a token table and latents already in memory; `digest` names the content (the run
    id's default and the run's config hash), `origin` goes into the run's config."""
    from store.writer import StoreWriter

    if pe_type not in PE_TYPES:
        raise StoreError(f"pe_type must be one of {', '.join(PE_TYPES)}, got {pe_type!r}")
    if sequences:
        tokens, latents = from_sequences(tokens, latents)
    if tokens.is_empty():
        raise StoreError("the token table holds no rows")
    tokens = split_roots(tokens)
    check(tokens, latents)
    run_id = run_id or f"import-{digest[:12]}"
    if not is_run_name(run_id):
        raise StoreError(f"run id must be a name (letters, digits, '.', '_' or '-'), got {run_id!r}")
    layers = list(latents)
    d = next(iter(latents.values())).shape[1]
    config = {"source": "import", **(origin or {}), "layers": layers, "content": digest}
    run = RunRecord(
        run_id,
        model,
        config,
        digest,
        n_layers if n_layers is not None else max(layers),
        d,
        pe_type,
        "none",
        "float32",
    )
    tokens = tokens.with_row_index("_row")
    writer = StoreWriter(store, created_by=created_by)
    writer.check_existing()
    try:
        writer.prepare(d)
        done = writer.start_run(run)
        todo = [p for p in tokens["prompt_id"].unique(maintain_order=True).to_list() if p not in done]
        written = 0
        for prompt_id, text, n_prompt, records in _records(tokens, latents, todo):
            writer.write_prompt(run_id, prompt_id, text, n_prompt, records, layers)
            written += 1
        writer.finish_run(run_id)
    finally:
        writer.release()
    return ImportReport(run_id, Path(store), written, len(done), len(tokens), layers)


def copy_run(source: str | Path, run_id: str, target: str | Path, new_id: str | None = None) -> ImportReport:
    """Copy a run (every variant-`normal` latent, token, branch and prompt) from one store into another,
    through the exchange files in a temporary folder, keeping its model, positional encoding and layer
    count; the target run id is the source's unless new_id is given."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="branchlens-copy-") as tmp:
        folder = export_arrays(source, run_id, tmp)
        run = json.loads((folder / "run.json").read_text())
        return import_arrays(
            target,
            folder / "tokens.parquet",
            folder / "latents.npz",
            new_id or run_id,
            model=run["model"],
            pe_type=run["pe_type"] if run["pe_type"] in PE_TYPES else "unknown",
            n_layers=run["n_layers"],
            created_by="branchlens copy",
        )
