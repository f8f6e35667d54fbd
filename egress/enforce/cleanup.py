"""``egress cleanup``: undo what a killed auditor left, never touching a live run.

A run whose auditor died keeps no egress (its dead-man's switch expired), but
its processes, namespace, rules and host settings stay until removed here.
The task's processes are stopped first (SIGKILL to the init of its PID
namespace takes every process of the task with it), so nothing of the task
runs while its rules go.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from egress.enforce import tasknet


class CleanupError(RuntimeError):
    pass


def _alive(pid: int | None, marker: str) -> bool:
    """Is ``pid`` running and still the program we started (not a reused PID)?"""
    if not pid:
        return False
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def stop_task(pid: int | None) -> bool:
    """SIGKILL the task's PID-namespace init (and so all of the task), then its parent."""
    if not _alive(pid, "egress.enforce.taskinit"):
        return False
    for child in _children(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _alive(pid, "egress.enforce.taskinit") and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def remove_rules(net: tasknet.TaskNet) -> None:
    from egress.enforce.nft import Nft, NftError
    if not net.removal:
        return
    nft = Nft()
    try:
        nft.run(net.removal)
    except NftError:
        pass                                # already gone
    finally:
        nft.close()


def clean_dead_runs() -> list[str]:
    """Clean every run of this network namespace whose auditor is gone; what was done."""
    if os.geteuid() != 0:
        raise CleanupError("egress cleanup needs root")
    done = []
    here = tasknet.host_netns_id()
    for net in tasknet.all_runs():
        alive = (tasknet.start_ticks(net.auditor_pid) == net.auditor_start
                 if net.auditor_start else _alive(net.auditor_pid, "egress"))
        if net.host_netns != here or alive:
            continue                        # another host's, or its auditor still runs
        stopped = stop_task(net.task_pid)
        if net.gate:
            from egress.enforce import gaterules
            gaterules.remove(**net.gate)
        remove_rules(net)
        problems = tasknet.remove(net)
        done.append(f"task {net.task}: {'processes stopped, ' if stopped else ''}"
                    f"namespace {net.netns} and rules removed"
                    + (f" ({'; '.join(problems)})" if problems else ""))
    return done
