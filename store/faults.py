"""A test-only fault hook: die at a named point of the work, chosen by what the process has done.

Tests that kill an ingest must not pick their moment by wall-clock time (a faster or slower machine would
hit other phases, or none). Instead they set

    BRANCHLENS_FAULT=PHASE:N[:pause]       e.g. commit:2, or commit:1:pause

and the process, the N-th time it reaches `fault_point(PHASE)`, prints `fault: PHASE N` on stderr and
kills itself with SIGKILL (no cleanup handlers run, as with a real kill -9 or an OOM kill). With `:pause`
it prints `fault: PHASE N paused` and waits there (inside a commit: holding the store's write lock) until
a line arrives on its standard input, then goes on.

With several processes (Ray workers) set `BRANCHLENS_FAULT_ONCE=PATH` as well: only the first process to
reach the point creates PATH and faults; the others (and a restarted worker) go on unharmed.

Phases: `load` (model loaded, nothing written yet), `generate` (after each branch is generated),
`commit` (inside a prompt's write transaction, rows inserted but not committed), `compact` (inside
compaction, the copy written but not yet in place), `shard` (a task's shard files written but not yet
committed: before the rename, or before the marker object on S3), `sql` (in the SQL tab's query process,
after the first batch of a result: a sort has spilled by then), `sql-wait` (in the app, once its query's process
has said the query started). Without the variable every call is a no-op.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

ENV = "BRANCHLENS_FAULT"
ONCE_ENV = "BRANCHLENS_FAULT_ONCE"
PHASES = ("load", "generate", "commit", "compact", "shard", "sql", "sql-wait")
_reached: Counter[str] = Counter()


def fault_point(phase: str) -> None:
    """Count this arrival at `phase`; die here if BRANCHLENS_FAULT names it and this is the N-th."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    parts = spec.split(":")
    want, nth, action = parts[0], parts[1] if len(parts) > 1 else "1", parts[2] if len(parts) > 2 else "kill"
    if want not in PHASES or not nth.isdigit() or action not in ("kill", "pause"):
        raise ValueError(f"{ENV}={spec!r}: expected PHASE:N[:pause] with PHASE one of {', '.join(PHASES)}")
    _reached[phase] += 1
    if phase != want or _reached[phase] != int(nth) or not _first_to_fault():
        return
    if action == "pause":
        print(f"fault: {phase} {nth} paused", file=sys.stderr, flush=True)
        sys.stdin.readline()
        return
    print(f"fault: {phase} {nth}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _first_to_fault() -> bool:
    """True unless BRANCHLENS_FAULT_ONCE names a marker file that another process already created."""
    marker = os.environ.get(ONCE_ENV)
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
