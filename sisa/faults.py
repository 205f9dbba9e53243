"""Fault injection for the crash tests: named points where a test can have the process killed.

Set SISA_FAULT=<point> (and optionally SISA_FAULT_AT=<n>, the n-th time the point is reached,
default 1). SISA_FAULT_ACTION=kill (default) SIGKILLs the process there, as a power cut or the
OOM killer would; SISA_FAULT_ACTION=raise raises InjectedFault, as a bug would;
SISA_FAULT_ACTION=pause writes the file SISA_FAULT_FLAG and waits until it is removed, so a
test can act while the command is stopped mid-way. Unset, a point costs one dictionary lookup.

Worker processes (sisa.executors) inherit the environment, and so the fault. Counts are per
process; SISA_FAULT_ONCE=<file> makes the fault fire once across all processes: the first to
reach it creates the file and fires, later ones (a retry of the killed job, other workers) see
the file and carry on. That is how a test kills a Ray worker on the first attempt only.

Points, in the order a forget meets them:
  journaled          the request and its deletions are committed; no training yet
  cache-zeroed       the image cache's rows of the deleted samples are zeros on disk, not yet marked so
  epoch              an epoch of a slice step has finished
  temp-written       a checkpoint's (or receipt's) temp file is synced, not yet renamed
  checkpoint-saved   a checkpoint file is in place, not yet in the index
  shard-committed    a shard's new checkpoints are live in the index; old files not yet removed
  retrained          all shards are complete; requests not yet marked done
  receipt-written    a request's receipt is on disk; the request is not yet marked done
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

_hits: dict[str, int] = {}


class InjectedFault(RuntimeError):
    """Raised at a fault point by SISA_FAULT_ACTION=raise."""


def fault_point(name: str) -> None:
    if os.environ.get("SISA_FAULT") != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(os.environ.get("SISA_FAULT_AT", "1")):
        return
    once = os.environ.get("SISA_FAULT_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # atomic: one winner
        except FileExistsError:
            return
    action = os.environ.get("SISA_FAULT_ACTION", "kill")
    if action == "raise":
        raise InjectedFault(f"injected fault at {name}")
    if action == "pause":
        flag = Path(os.environ["SISA_FAULT_FLAG"])
        flag.write_text(str(os.getpid()))
        while flag.exists():
            time.sleep(0.05)
        return
    os.kill(os.getpid(), signal.SIGKILL)
