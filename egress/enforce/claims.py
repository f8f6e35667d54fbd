"""Tasks by process tree on a shared host: whose is a new socket no uid or cgroup task has?

No kernel rule matches a process tree, and by the time a logged packet is read
a short flow's socket (and its process) may be gone. So while any task is
attributed by process tree, the first packet of each untagged new flow (the
agent's recording labels those ``UNTAGGED_LABEL``) is queued (NFQUEUE, with
``--queue-bypass``: never held if the agent is gone) and held while the socket's
holder is looked up (sock_diag, then the trees only: each task's root and its
descendants), then accepted, unchanged. What is found waits, by tuple, for the
record to take it; attribution only, nothing is enforced.
"""

from __future__ import annotations

import threading

from egress.enforce import agentrules, gaterules
from egress.enforce.tasknet import sh

FOUND_MAX = 16384
"""Claims kept for the record to take; the oldest go first (flows that were never logged)."""
QUEUE_OFFSET = 0
"""The claim queue is the agent's first queue number (tasks take ``queue + label``, label
1 and up)."""


def _rules(queue: int) -> list[list[str]]:
    common = ["!", "-o", "lo", "-m", "connlabel", "--label", str(agentrules.UNTAGGED_LABEL),
              "-m", "conntrack", "--ctstate", "NEW"]
    to = ["-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"]
    return [[*common, "-p", "tcp", "--syn", *to], [*common, "-p", "udp", *to]]


class TreeClaims:
    def __init__(self, queue: int):
        self.queue_num = queue
        self.trees: dict[str, int] = {}         # task -> the pid at the root of its tree
        self.found: dict[tuple, tuple] = {}     # (proto, src, sport, dst, dport) -> (task, info)
        self._lock = threading.Lock()
        self._queue = self._diag = self._thread = None
        self._stop = threading.Event()
        self.stats = {"held": 0, "claimed": 0, "unknown": 0}

    # ------------------------------------------------------------ tasks

    def add(self, task: str, pid: int) -> None:
        with self._lock:
            first = not self.trees
            self.trees[task] = pid
        if first:
            self._start()

    def remove(self, task: str) -> None:
        with self._lock:
            self.trees.pop(task, None)
            last = not self.trees
        if last:
            self.close()

    def take(self, key: tuple) -> tuple[str, object] | None:
        """(task, process) found for a flow's first packet, once."""
        with self._lock:
            return self.found.pop(key, None)

    # ------------------------------------------------------------ kernel

    def _start(self) -> None:
        from egress.enforce.nfqueue import NfQueue
        from egress.enforce.owners import SockDiag
        self._stop.clear()
        self._queue = NfQueue(self.queue_num, fail_open=True, uid_gid=False)
        self._diag = SockDiag(None)
        self._thread = threading.Thread(target=self._serve, name="egress-tree-claims",
                                        daemon=True)
        self._thread.start()
        gaterules.ensure_chain(gaterules.LOCAL_CHAIN, "OUTPUT")
        for family in (4, 6):
            for rule in _rules(self.queue_num):
                sh(gaterules.tool(family), "-t", "mangle", "-I", gaterules.LOCAL_CHAIN, "1",
                   *rule)

    def close(self) -> None:
        if self._queue is None:
            return
        gaterules.unload(gaterules.LOCAL_CHAIN, _rules(self.queue_num))
        self._stop.set()
        self._thread.join(timeout=5)
        self._queue.close()
        self._diag.close()
        self._queue = self._diag = None

    def _serve(self) -> None:
        from egress.sources.live import packet_tuple
        while not self._stop.is_set():
            for packet in self._queue.read(timeout=0.2):
                key = packet_tuple(packet.payload)
                if key is not None:
                    self._claim(key)
                self._queue.verdict(packet.packet_id, True)

    def _claim(self, key: tuple) -> None:
        from egress.enforce.owners import descends, owner_of
        self.stats["held"] += 1
        try:
            sock = self._diag.find("tcp" if key[0] == 6 else "udp", *key[1:5])
        except OSError:
            sock = None
        with self._lock:
            trees = list(self.trees.items())
        for task, root in trees if sock is not None else ():
            info = owner_of(sock.inode, root, all_holders=False, whole_pidns=False)
            if info is not None and descends(info.pid, root):
                with self._lock:
                    self.found[key[:5]] = (task, info.record())
                    while len(self.found) > FOUND_MAX:     # flows never recorded
                        self.found.pop(next(iter(self.found)))
                self.stats["claimed"] += 1
                return
        self.stats["unknown"] += 1
