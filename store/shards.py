"""A run as Parquet shards (what distributed ingest workers write), on a local disk or in an S3-compatible
bucket, and merging them into a DuckDB store.

Layout of a run directory `ROOT/<run_id>/` (ROOT is `STORE.shards` unless given; `s3://bucket/prefix` too):

    run.json                 the RunRecord (model, resolved config, hash, width) and the task split
    shard-00000/             one task: its prompts' whole trees
        prompts.parquet      prompt_id, text, n_tokens
        branches.parquet     the `branches` columns without run_id
        tokens.parquet       the `tokens` columns without run_id
        latents.parquet      the `latents` columns without run_id (vec as a fixed-size list of float32)
        commit.json          the commit record: run id, the run's config hash, task, and each file's rows,
                             bytes and SHA-256 (on S3 the marker object holds it)

When a shard counts (is committed):
- local: a shard is written into a hidden temporary directory and renamed into place, so a shard
  directory that exists is complete.
- S3 (no rename there): each attempt writes its four files under `shard-00000/<attempt>/`, then the
  commit marker `shard-00000/<attempt>.committed`. A shard counts once a marker exists, and reads take
  the files of the first committed attempt (by name), so a worker killed mid-upload leaves nothing that
  counts, and two attempts of one task never mix their files. Objects of attempts that never committed
  are garbage: `sweep()` removes them once the run is complete.
A task that runs again (a retried worker, a resumed run) finds its shard committed and writes nothing.
The merge checks each committed shard against its commit record (run id and config hash of the run it
merges, each file's bytes, SHA-256 and rows, latents = tokens x layers) and refuses, in one line and before
importing any of it, a shard that does not match: a file rewritten, truncated or copied from another run.
It imports each shard that matches in one transaction, skipping shards already imported, and marks
the run complete when every planned prompt is in; the store then answers the same SQL as a
single-process run. `store.inplace` reads the committed shards without a merge.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from store.errors import StoreError, reason
from store.faults import fault_point
from store.objectstore import Location, check_bucket, locate, storage_error
from store.records import BranchRecord, RunRecord, is_run_name
from store.writer import SHARD_TABLES, StoreWriter, arrow_tables

_SHARD = re.compile(r"^shard-(\d{5,})$")
MARKER = ".committed"  # S3: shard-NNNNN/<attempt>.committed, written after shard-NNNNN/<attempt>/*.parquet
RECORD = "commit.json"  # local: the commit record inside the shard directory


def _shard_name(task: int) -> str:
    return f"shard-{task:05d}"


@dataclass(frozen=True)
class Shard:
    """A committed shard: the file of each shard table on its file system."""

    task: int
    fs: pafs.FileSystem
    files: dict[str, str]
    record: str = ""  # the commit record's path (commit.json, or the S3 marker)

    @property
    def where(self) -> str:
        return self.files["prompts"].rsplit("/", 1)[0]

    def dataset(self, name: str) -> pads.Dataset:
        """One table of the shard as an Arrow dataset (read lazily, by column and batch)."""
        return pads.dataset(self.files[name], filesystem=self.fs, format="parquet")

    def verify(self, run: dict) -> None:
        """Check the shard against its commit record and the run it is merged into (`run`: the manifest's
        run record); one StoreError line naming what differs, reading nothing into a store."""

        def bad(what: str) -> StoreError:
            return StoreError(
                f"shard {self.where} does not match its commit record ({what}); nothing of it was "
                "merged: write that task again (delete the shard directory and rerun the same "
                "ingest command) or remove it"
            )

        try:
            with self.fs.open_input_stream(self.record) as f:
                record = json.loads(f.read())
        except FileNotFoundError:
            raise bad(
                "no commit record: written by a branchlens from before 2026-12-07, or not by branchlens"
            ) from None
        except OSError as exc:
            raise storage_error(exc, "read shard", self.where) from None
        except ValueError:
            raise bad("the record is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
            raise bad("the record names no files: written by a branchlens from before 2026-12-07, or damaged")
        if record.get("run_id") != run["run_id"] or record.get("config_hash") != run["config_hash"]:
            raise bad(
                f"it belongs to run '{record.get('run_id')}' with config {record.get('config_hash')}, not "
                f"'{run['run_id']}' with config {run['config_hash']}"
            )
        if record.get("task") != self.task:
            raise bad(f"it was written for task {record.get('task')}, not {self.task}")
        rows = {}
        for name in SHARD_TABLES:
            want = record["files"].get(name)
            want = want if isinstance(want, dict) else {}
            try:
                with self.fs.open_input_stream(self.files[name]) as f:
                    digest, size = sha256_of(f)
            except OSError as exc:
                raise storage_error(exc, "read shard", self.where) from None
            if size != want.get("bytes") or digest != want.get("sha256"):
                raise bad(
                    f"{name}.parquet has {size} bytes and SHA-256 {digest[:12]}..., the record "
                    f"{want.get('bytes')} and {str(want.get('sha256'))[:12]}..."
                )
            rows[name] = want.get("rows")
        listed = (run.get("config") or {}).get("layers")
        layers = len(listed) if isinstance(listed, list) and listed else None
        if not all(isinstance(rows[t], int) for t in ("latents", "tokens")):
            raise bad("the record gives no row counts")
        if layers and rows["latents"] != rows["tokens"] * layers:
            raise bad(f"{rows['latents']} latents for {rows['tokens']} tokens x {layers} layers")


def sha256_of(stream, h=None) -> tuple[str, int]:
    """(SHA-256 hex, bytes read) of a readable stream, read in 8 MiB blocks; with `h`, a running hash to
    continue (the hex then covers everything it was fed)."""
    h, n = h if h is not None else hashlib.sha256(), 0
    while block := stream.read(8 << 20):
        h.update(block)
        n += len(block)
    return h.hexdigest(), n


def _encoded(tables: dict[str, pa.Table], run: dict, task: int) -> tuple[dict[str, bytes], bytes]:
    """Each table as Parquet bytes, and the commit record that names them (JSON bytes)."""
    files, described = {}, {}
    for name, table in tables.items():
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        files[name] = sink.getvalue().to_pybytes()
        described[name] = {
            "rows": table.num_rows,
            "bytes": len(files[name]),
            "sha256": hashlib.sha256(files[name]).hexdigest(),
        }
    record = {"run_id": run["run_id"], "config_hash": run["config_hash"], "task": task, "files": described}
    return files, json.dumps(record, indent=1, sort_keys=True).encode()


def run_dir(store: str | Path, run_id: str, root: str | Path | None = None) -> str:
    """Where a run's shards go: ROOT/<run_id>, ROOT defaulting to STORE.shards (a path or an s3:// URL)."""
    if not is_run_name(run_id):
        raise StoreError(
            f"run id {run_id!r} is not a name (letters, digits, '.', '_', '-'): it would name a "
            "folder outside the run's shards"
        )
    return locate(root if root else f"{store}.shards").join(run_id).url


def task_prompts(manifest: dict) -> dict[int, list[int]]:
    """task index -> the prompt ids it holds, from the manifest's split."""
    n, per_task = manifest["n_prompts"], manifest["prompts_per_task"]
    return {task: list(range(lo, min(lo + per_task, n))) for task, lo in enumerate(range(0, n, per_task))}


def check_location(where: str | Path) -> None:
    """Fail early, in one line, on a malformed shard URL, a missing bucket, missing credentials or an
    unreachable endpoint (nothing is written)."""
    check_bucket(locate(where))


def write_manifest(run_path: str | Path, run: RunRecord, n_prompts: int, prompts_per_task: int) -> dict:
    """Create run.json, or check an existing one describes the same run; returns the manifest."""
    loc = locate(run_path)
    manifest = {"run": asdict(run), "n_prompts": n_prompts, "prompts_per_task": prompts_per_task}
    path = loc.join("run.json")
    if _exists(path):
        found = read_manifest(run_path)
        if found["run"]["config_hash"] != run.config_hash:
            raise StoreError(
                f"{loc} holds shards of run '{run.run_id}' with other settings; "
                "choose another --run-id or shard directory"
            )
        return found
    try:
        _put(path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    except OSError as exc:
        raise storage_error(exc, "write shards to", loc) from None
    return manifest


def read_manifest(run_path: str | Path) -> dict:
    loc = locate(run_path)
    path = loc.join("run.json")
    if not _exists(path):
        check_bucket(loc)  # a missing bucket says so
        raise StoreError(f"{loc} is not a branchlens run directory (no run.json)")
    try:
        with path.fs.open_input_stream(path.path) as f:
            return json.loads(f.read())
    except OSError as exc:
        raise storage_error(exc, "read", path) from None
    except ValueError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None


def finished_shards(run_path: str | Path) -> dict[int, Shard]:
    """task index -> Shard, for every committed shard (see the module docstring)."""
    loc = locate(run_path)
    if not loc.remote:
        root = Path(loc.path)
        if not root.is_dir():
            return {}
        out = {}
        for entry in root.iterdir():
            match = _SHARD.match(entry.name)
            if match and entry.is_dir():
                out[int(match.group(1))] = Shard(
                    int(match.group(1)),
                    loc.fs,
                    {name: str(entry / f"{name}.parquet") for name in SHARD_TABLES},
                    str(entry / RECORD),
                )
        return dict(sorted(out.items()))
    return _committed_objects(loc, loc.path)


def shard_exists(run_path: str | Path, task: int) -> bool:
    """Whether the task's shard is committed."""
    loc = locate(run_path)
    if not loc.remote:
        return Path(loc.path, _shard_name(task)).exists()
    return task in _committed_objects(loc, loc.join(_shard_name(task)).path)


def _committed_objects(loc: Location, under: str) -> dict[int, Shard]:
    """The committed S3 shards below `under` (the run, or one shard), from one recursive listing."""
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(under, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise storage_error(exc, "list", loc) from None
    objects = {info.path for info in infos if info.type == pafs.FileType.File}
    markers: dict[int, list[str]] = {}
    for key in objects:
        rel = key[len(loc.path) :].strip("/").split("/")
        if len(rel) == 2 and _SHARD.match(rel[0]) and rel[1].endswith(MARKER):
            attempt = rel[1][: -len(MARKER)]
            shard_dir = f"{loc.path}/{rel[0]}/{attempt}"
            if all(f"{shard_dir}/{name}.parquet" in objects for name in SHARD_TABLES):
                markers.setdefault(int(_SHARD.match(rel[0]).group(1)), []).append(shard_dir)
    return {
        task: Shard(
            task, loc.fs, {name: f"{min(dirs)}/{name}.parquet" for name in SHARD_TABLES}, min(dirs) + MARKER
        )
        for task, dirs in sorted(markers.items())
    }


def write_shard(
    run_path: str | Path,
    task: int,
    prompts: list[tuple[int, str, int, list[BranchRecord]]],
    layers: list[int],
    variant: str = "normal",
) -> bool:
    """Write one task's prompts (prompt_id, text, n_prompt_tokens, branches) as a shard and commit it.
    Returns False, writing nothing that counts, when the shard is already committed."""
    loc = locate(run_path)
    if shard_exists(loc.url, task):
        return False
    tables: dict[str, list[pa.Table]] = {name: [] for name in SHARD_TABLES}
    for prompt_id, text, n_tokens, branches in prompts:
        tables["prompts"].append(
            pa.table(
                {
                    "prompt_id": pa.array([prompt_id], pa.int32()),
                    "text": pa.array([text]),
                    "n_tokens": pa.array([n_tokens], pa.int32()),
                }
            )
        )
        branch_tbl, token_tbl, latent_tbl = arrow_tables(branches, layers, variant)
        tables["branches"].append(branch_tbl)
        tables["tokens"].append(token_tbl)
        tables["latents"].append(latent_tbl)
    merged = {name: pa.concat_tables(parts) for name, parts in tables.items()}
    files, record = _encoded(merged, read_manifest(loc.url)["run"], task)
    return (_commit_object_shard if loc.remote else _commit_local_shard)(loc, task, files, record)


def _commit_local_shard(loc: Location, task: int, files: dict[str, bytes], record: bytes) -> bool:
    final = Path(loc.path, _shard_name(task))
    tmp = Path(loc.path, f".{_shard_name(task)}.tmp-{uuid.uuid4().hex}")
    try:
        tmp.mkdir(parents=True)
        for name, data in files.items():
            (tmp / f"{name}.parquet").write_bytes(data)
        (tmp / RECORD).write_bytes(record)
        fault_point("shard")
        try:
            os.rename(tmp, final)  # atomic; fails when another attempt already put the shard there
        except OSError:
            if final.exists():
                return False
            raise
        return True
    except OSError as exc:
        raise StoreError(f"cannot write shard {final}: {reason(exc)}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _commit_object_shard(loc: Location, task: int, files: dict[str, bytes], record: bytes) -> bool:
    shard = loc.join(_shard_name(task))
    attempt = f"attempt-{uuid.uuid4().hex[:12]}"
    data = shard.join(attempt)
    try:
        for name, payload in files.items():
            _put(data.join(f"{name}.parquet"), payload)
        fault_point("shard")
        if shard_exists(loc.url, task):  # another attempt committed while this one wrote: drop ours
            loc.fs.delete_dir(data.path)
            return False
        _put(shard.join(attempt + MARKER), record)
        return True
    except OSError as exc:
        raise storage_error(exc, "write shard", shard) from None


def sweep(run_path: str | Path) -> int:
    """Remove what uncommitted attempts left (killed workers): temporary directories locally, attempt
    objects without a marker on S3. Call it only when every task is committed (no writer is running).
    Returns the number of entries removed."""
    loc = locate(run_path)
    removed = 0
    try:
        if not loc.remote:
            for entry in Path(loc.path).glob(".shard-*.tmp-*"):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
            return removed
        kept = {s.files["prompts"].rsplit("/", 1)[0] for s in finished_shards(loc.url).values()}
        for info in loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True)):
            if info.type != pafs.FileType.Directory or not _SHARD.match(info.base_name):
                continue
            for entry in loc.fs.get_file_info(pafs.FileSelector(info.path)):
                if entry.type == pafs.FileType.Directory and entry.path not in kept:
                    loc.fs.delete_dir(entry.path)
                    removed += 1
    except OSError as exc:
        raise storage_error(exc, "clean up", loc) from None
    return removed


def _exists(loc: Location) -> bool:
    try:
        return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise storage_error(exc, "read", loc) from None


def _put(loc: Location, data: bytes) -> None:
    """Write a small file whole: a temporary file renamed into place locally; one object put on S3."""
    if loc.remote:
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)
        return
    target = Path(loc.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def merge(run_path: str | Path, store: str | Path, created_by: str) -> tuple[int, int, bool]:
    """Import every committed shard of the run at `run_path` (a directory or an s3:// URL) into `store`
    (created if missing).

    Returns (shards imported now, shards already there, run complete). Run it again at any time: it
    only adds what is missing."""
    manifest = read_manifest(run_path)
    run = RunRecord(**manifest["run"])
    shards = finished_shards(run_path)
    writer = StoreWriter(store, created_by=created_by)
    writer.check_existing()
    try:
        writer.prepare(run.d_model)
        writer.start_run(run)
        imported = skipped = 0
        for shard in shards.values():
            shard.verify(manifest["run"])
            try:
                sources = {name: shard.dataset(name) for name in SHARD_TABLES}
            except (OSError, pa.ArrowException) as exc:
                raise StoreError(f"cannot read shard {shard.where}: {str(exc).splitlines()[0]}") from None
            if writer.import_shard(run.run_id, sources):
                imported += 1
            else:
                skipped += 1
        complete = len(writer.start_run(run)) == manifest["n_prompts"]
        if complete:
            writer.finish_run(run.run_id)
    finally:
        writer.release()
    return imported, skipped, complete
