"""Writing runs into a store: one short transaction per prompt tree, so a crash never leaves half a
branch and readers can open the file between commits."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from store.connect import NO_EXTENSIONS, connect_with_retry, file_kind, reading
from store.errors import StoreError, reason
from store.faults import fault_point
from store.leftovers import creating_copy, remove_stale_copies
from store.records import BranchRecord, RunRecord
from store.schema import create_schema, first_row, read_meta

# Written in an older storage format on purpose: the DuckDB CLI on PyPI (duckdb-cli 1.5) cannot read the
# 2.0 default, and DuckDB 2 reads and writes this one without upgrading it.
STORAGE_COMPATIBILITY = "v1.5.0"
SHARD_TABLES = ("prompts", "branches", "tokens", "latents")
_CLAIMS: dict[
    str, tuple[int, int]
] = {}  # store path -> (lock file descriptor, writers of this process holding it)
_FILE_LOCKS: dict[str, int] = {}  # store path -> a descriptor of the store file itself, flocked for the claim


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _lock_file_itself(key: str) -> None:
    """flock the store file itself (its inode) for the claim of `key`, so a hard link, which names the same
    file beside another lock file, is refused too. DuckDB's own locks are fcntl locks, which flock does not
    touch on a local file system (on NFS flock is emulated with fcntl: keep stores on local disks). Closing
    this descriptor drops this process's fcntl locks on the file, so a claim is released only after the
    process's own connections to it are closed (every writer connection is short-lived). Nothing to lock
    while the file does not exist yet (creation is guarded by the lock file)."""
    if key in _FILE_LOCKS:
        return
    try:
        fd = os.open(key, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(
            f"another ingest, merge or compaction is writing to {key} under another name (a hard "
            "link); wait until it ends, then run this command again"
        ) from None
    _FILE_LOCKS[key] = fd


class StoreWriter:
    """Owns all writes of one ingest process to one store file."""

    def __init__(self, path: str | Path, created_by: str, lock_timeout: float = 120.0):
        self.path = Path(path)
        self.created_by = created_by
        self.lock_timeout = lock_timeout
        self._claim_fd: int | None = None
        self._key = ""  # the resolved store path the claim holds

    def claim(self) -> None:
        """Become the one writing job of this store (an ingest, a merge, a compaction) until release(): an
        advisory lock on `STORE.ingest-lock` beside the resolved file (a symlink to the store shares it),
        which the kernel drops when the holder dies. Another process holding it:
        one StoreError line naming it, nothing written. Writers of one process share the claim."""
        if self._claim_fd is not None:
            return
        key = self._key = str(self.path.resolve())  # kept: release() must not depend on the working directory
        if key in _CLAIMS:
            fd, count = _CLAIMS[key]
            _CLAIMS[key] = (fd, count + 1)
            self._claim_fd = fd
            return
        resolved = Path(key)  # through a symlink, the lock beside the file itself: one lock per store file
        lock = resolved.with_name(resolved.name + ".ingest-lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            what = "create store" if file_kind(self.path) == "missing" else "write to store"
            hint = ""
            if exc.errno == errno.ENAMETOOLONG and len(resolved.name) < 255:
                hint = (
                    f" (the store's file name must leave {len('.ingest-lock')} characters for '.ingest-lock')"
                )
            elif self.path.is_symlink() and not resolved.parent.is_dir():
                hint = f" (it is a link to {resolved}, whose folder does not exist)"
            raise StoreError(
                f"cannot {what} {self.path}: cannot create its lock file: {reason(exc)}{hint}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreError(
                f"another ingest, merge or compaction (pid {holder}) is writing to {self.path}; wait "
                "until it ends (then run this command again: it resumes), or use another --store"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            _lock_file_itself(key)
        except StoreError:
            os.close(fd)
            raise
        self._claim_fd = fd
        _CLAIMS[key] = (fd, 1)

    def release(self) -> None:
        """End this writer's claim (the lock goes when the process's last writer of the store releases)."""
        if self._claim_fd is None:
            return
        key = self._key
        fd, count = _CLAIMS.get(key, (self._claim_fd, 1))
        if count <= 1:
            _CLAIMS.pop(key, None)
            if key in _FILE_LOCKS:
                os.close(_FILE_LOCKS.pop(key))
            os.close(fd)  # closing the file drops the flock
        else:
            _CLAIMS[key] = (fd, count - 1)
        self._claim_fd = None

    @contextmanager
    def _connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived read-write connection; a failed write (disk full, file too large, unwritable
        directory) becomes one StoreError line. Every write is one transaction, so what was committed
        before stays readable."""
        con = connect_with_retry(self.path, read_only=False, lock_timeout=self.lock_timeout)
        try:
            yield con
        except (duckdb.IOException, duckdb.TransactionException, OSError) as exc:
            # TransactionException here is a COMMIT that could not be written (e.g. "File too large")
            raise StoreError(
                f"cannot write to store {self.path}: {reason(exc)}; what was written before "
                "is kept, free space (or fix the path) and run the same command to resume"
            ) from exc
        finally:
            con.close()

    def check_existing(self) -> dict[str, str] | None:
        """Meta of the store if it exists (raising StoreError unless it is one of this version), else None.

        Cheap and read-only: ingest calls it before loading a model, so a wrong file fails fast.
        """
        if file_kind(self.path) == "missing":
            return None
        with reading(self.path, lock_timeout=self.lock_timeout) as con:  # checks the version and the whole
            return read_meta(con, str(self.path))

    def prepare(self, dim: int) -> None:
        """Create the store if missing (atomically), else check its version and vector width; remove what
        a killed compaction left beside it."""
        self.claim()
        remove_stale_copies(Path(os.path.realpath(self.path)))
        meta = self.check_existing()
        if meta is None:
            self._create(dim)
            return
        if meta.get("vector_dim") != str(dim):
            raise StoreError(
                f"{self.path} holds latents of width {meta.get('vector_dim')}, this model's are {dim}; "
                "use another --store file for this model"
            )

    def _create(self, dim: int) -> None:
        # Through a symlink to a file not made yet, the store is made where the link points (a link is a
        # name that exists, so linking onto it would fail and leave DuckDB to make an empty file there).
        target = Path(os.path.realpath(self.path))
        tmp = creating_copy(target, os.getpid())  # one per process: no clobbering
        wal = tmp.with_name(tmp.name + ".wal")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            con = duckdb.connect(
                str(tmp), config=NO_EXTENSIONS | {"storage_compatibility_version": STORAGE_COMPATIBILITY}
            )
            try:
                create_schema(con, dim, self.created_by)
                # Into the file itself now: a checkpoint that fails on close is silent and would leave the
                # schema in a WAL that the rename below does not carry.
                con.execute("CHECKPOINT")
            finally:
                con.close()
            if wal.exists():
                raise OSError(f"the new store's write-ahead log was not merged ({wal.name} left behind)")
            try:
                os.link(tmp, target)  # atomic and never over an existing file: the first creator wins
            except FileExistsError:
                pass  # another process created it meanwhile; its store is checked like any existing one
            except OSError:  # a file system without hard links
                if not target.exists():
                    os.replace(tmp, target)
        except (OSError, duckdb.Error) as exc:
            raise StoreError(f"cannot create store {self.path}: {reason(exc)}") from exc
        finally:
            for leftover in (tmp, wal):
                try:
                    leftover.unlink(missing_ok=True)
                except OSError:
                    pass
        if self._key in _CLAIMS:
            _lock_file_itself(self._key)  # the new file is this claim's too

    def start_run(self, run: RunRecord) -> set[int]:
        """Register the run (or find it again) and return the prompt ids already written."""
        with self._connection() as con:
            row = first_row(con, "SELECT config_hash, status FROM runs WHERE run_id = ?", [run.run_id])
            if row is None:
                con.execute(
                    "INSERT INTO runs VALUES (?, ?, ?, ?, ?, 'running', NULL, ?, ?, ?, ?, ?, ?)",
                    [
                        run.run_id,
                        run.model,
                        _now(),
                        json.dumps(run.config, sort_keys=True),
                        run.config_hash,
                        run.n_layers,
                        run.d_model,
                        run.pe_type,
                        run.device,
                        run.dtype,
                        self.created_by,
                    ],
                )
                return set()
            if row[0] != run.config_hash:
                raise StoreError(
                    f"run '{run.run_id}' already exists in {self.path} with other settings; "
                    "choose another --run-id or --store"
                )
            done = con.execute("SELECT prompt_id FROM prompts WHERE run_id = ?", [run.run_id]).fetchall()
            return {r[0] for r in done}

    def write_prompt(
        self,
        run_id: str,
        prompt_id: int,
        text: str,
        n_prompt_tokens: int,
        branches: list[BranchRecord],
        layers: list[int],
        variant: str = "normal",
    ) -> None:
        """Write one prompt's whole tree (prompt row, branches, tokens, latents) in one transaction."""
        branch_tbl, token_tbl, latent_tbl = arrow_tables(branches, layers, variant)
        with self._connection() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute(
                    "INSERT INTO prompts VALUES (?, ?, ?, ?)", [run_id, prompt_id, text, n_prompt_tokens]
                )
                for table, name in ((branch_tbl, "branches"), (token_tbl, "tokens"), (latent_tbl, "latents")):
                    con.register("_batch", table)
                    con.execute(
                        f"INSERT INTO {name} BY NAME SELECT ?::VARCHAR AS run_id, * FROM _batch", [run_id]
                    )
                    con.unregister("_batch")
                fault_point("commit")
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                raise

    def write_variant(
        self,
        run_id: str,
        prompt_id: int,
        items: list[tuple[int, np.ndarray, np.ndarray]],
        layers: list[int],
        variant: str,
    ) -> bool:
        """Add latents of another variant for one prompt's branches, in one transaction: items are
        (branch_id, positions (n,), latents (len(layers), n, d)). Returns False (writing nothing) when the
        prompt already has this variant, so re-runs are idempotent."""
        table = pa.table(
            {
                "branch_id": pa.array(
                    np.concatenate([np.full(len(p) * len(layers), b, np.int32) for b, p, _ in items])
                ),
                "position": pa.array(
                    np.concatenate([np.tile(p.astype(np.int32), len(layers)) for _, p, _ in items])
                ),
                "layer": pa.array(
                    np.concatenate([np.repeat(np.array(layers, np.int16), len(p)) for _, p, _ in items])
                ),
                "variant": pa.array([variant] * sum(len(p) * len(layers) for _, p, _ in items)),
                "vec": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.concatenate([lat.astype(np.float32).reshape(-1) for _, _, lat in items])),
                    items[0][2].shape[-1],
                ),
            }
        )
        with self._connection() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                exists = first_row(
                    con,
                    "SELECT count(*) FROM latents l JOIN branches b USING (run_id, branch_id) "
                    "WHERE l.run_id = ? AND b.prompt_id = ? AND l.variant = ?",
                    [run_id, prompt_id, variant],
                )[0]
                if exists:
                    con.execute("ROLLBACK")
                    return False
                con.register("_batch", table)
                con.execute(
                    "INSERT INTO latents BY NAME SELECT ?::VARCHAR AS run_id, * FROM _batch", [run_id]
                )
                con.unregister("_batch")
                con.execute("COMMIT")
                return True
            except BaseException:
                _rollback(con)
                raise

    def import_shard(self, run_id: str, sources: dict[str, Any]) -> bool:
        """Add one Parquet shard (store.shards) of a run in one transaction: `sources` maps each of
        SHARD_TABLES to an Arrow table or dataset (local or on S3, scanned without a DuckDB extension).
        Returns False, writing nothing, when its prompts are already in the store, so a merge can be run
        again."""
        with self._connection() as con:
            views = {name: f"_shard_{name}" for name in SHARD_TABLES}
            for name, view in views.items():
                con.register(view, sources[name])
            con.execute("BEGIN TRANSACTION")
            try:
                present = first_row(
                    con,
                    f"SELECT count(*) FROM prompts WHERE run_id = ? AND prompt_id IN "
                    f"(SELECT prompt_id FROM {views['prompts']})",
                    [run_id],
                )[0]
                if present:
                    con.execute("ROLLBACK")
                    return False
                for name, view in views.items():
                    con.execute(
                        f"INSERT INTO {name} BY NAME SELECT ?::VARCHAR AS run_id, * FROM {view}", [run_id]
                    )
                con.execute("COMMIT")
                return True
            except BaseException:
                _rollback(con)
                raise
            finally:
                for view in views.values():
                    con.unregister(view)

    def finish_run(self, run_id: str) -> None:
        with self._connection() as con:
            # a finished run started again changes nothing, not even its completion time
            con.execute(
                "UPDATE runs SET status = 'complete', completed_at = ? WHERE run_id = ? AND status <> 'complete'",
                [_now(), run_id],
            )


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back if a transaction is still open (a failed COMMIT has already ended it)."""
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass


def arrow_tables(
    branches: list[BranchRecord], layers: list[int], variant: str
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Arrow tables for branches, tokens and latents (latents ordered by layer, branch, position)."""
    branch_tbl = pa.table(
        {
            "branch_id": pa.array([b.branch_id for b in branches], pa.int32()),
            "prompt_id": pa.array([b.prompt_id for b in branches], pa.int32()),
            "parent_branch_id": pa.array([b.parent_branch_id for b in branches], pa.int32()),
            "fork_position": pa.array([b.fork_position for b in branches], pa.int32()),
            "depth": pa.array([b.depth for b in branches], pa.int16()),
            "kind": pa.array([b.kind for b in branches], pa.string()),
            "path": pa.array([b.path for b in branches], pa.string()),
            "n_tokens": pa.array([b.n_tokens for b in branches], pa.int32()),
            "end_position": pa.array([b.end_position for b in branches], pa.int32()),
            "ended_with_eos": pa.array([b.ended_with_eos for b in branches], pa.bool_()),
        }
    )
    branch_ids = np.concatenate([np.full(b.n_tokens, b.branch_id, np.int32) for b in branches])
    positions = np.concatenate([b.positions for b in branches])
    token_tbl = pa.table(
        {
            "branch_id": branch_ids,
            "position": positions,
            "token_id": np.concatenate([np.asarray(b.token_ids, np.int32) for b in branches]),
            "token_text": pa.array([t for b in branches for t in b.token_texts], pa.string()),
            "logprob": pa.array(
                np.concatenate([b.logprobs for b in branches]).astype(np.float32), from_pandas=True
            ),
            "entropy": pa.array(
                np.concatenate([b.entropies for b in branches]).astype(np.float32), from_pandas=True
            ),
            "is_prompt": np.concatenate([np.full(b.n_tokens, b.kind == "prompt") for b in branches]),
        }
    )
    d = branches[0].latents.shape[-1]
    vecs = np.concatenate([b.latents[li] for li in range(len(layers)) for b in branches], axis=0).astype(
        np.float32, copy=False
    )
    n = len(positions)
    latent_tbl = pa.table(
        {
            "branch_id": np.tile(branch_ids, len(layers)),
            "position": np.tile(positions, len(layers)),
            "layer": np.repeat(np.asarray(layers, np.int16), n),
            "variant": pa.array([variant] * (n * len(layers)), pa.string()),
            "vec": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), d),
        }
    )
    return branch_tbl, token_tbl, latent_tbl
