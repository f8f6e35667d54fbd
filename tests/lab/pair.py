"""Two network namespaces, A and B, joined only to each other by one veth (vA, vB): the
smallest closed lab, for tests of our netlink code in A against servers in B.

Unique names per run, nothing linked to the root namespace, removed on ``close``
(also when a test fails), and only the processes it started are stopped, by PID.
Subclasses add what they load (``build``) and run (``prelude`` before ``in_a``'s parts).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def skip_or_fail(problem: str) -> None:
    """A lab that cannot run is skipped here, and a failure under CI=true."""
    if os.environ.get("CI") == "true":
        pytest.fail(problem)
    pytest.skip(problem)


class NamespacePair:
    tag = "egP"
    """The names' prefix (namespaces ``<tag><pid><hex>a`` and ``...b``)."""
    prelude = ""
    """Python run in A before each ``in_a``'s parts."""
    python = sys.executable

    def __init__(self, workdir: Path, a4: str, b4: str, a6: str, b6: str):
        tag = f"{os.getpid() % 10000}{secrets.token_hex(2)}"
        self.a, self.b = f"{self.tag}{tag}a", f"{self.tag}{tag}b"
        self.addresses = (a4, b4, a6, b6)
        self.dir = Path(workdir)
        self.procs: list[subprocess.Popen] = []

    def sh(self, *cmd: str, input: str | None = None, timeout: float = 60) -> str:
        done = subprocess.run(cmd, input=input, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
        return done.stdout

    def build(self) -> None:
        a4, b4, a6, b6 = self.addresses
        for ns in (self.a, self.b):
            self.sh("ip", "netns", "add", ns)
            self.sh("ip", "-n", ns, "link", "set", "lo", "up")
            # no duplicate address detection on the new veth (its link-local address too):
            # a tentative address delays the first IPv6 packet by a second
            self.sh("ip", "netns", "exec", ns, "sysctl", "-qw",
                    "net.ipv6.conf.default.accept_dad=0")
        self.sh("ip", "-n", self.a, "link", "add", "vA", "type", "veth", "peer", "name", "vB",
                "netns", self.b)
        for ns, dev, v4, v6 in ((self.a, "vA", a4, a6), (self.b, "vB", b4, b6)):
            self.sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            self.sh("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            self.sh("ip", "-n", ns, "link", "set", dev, "up")
        for address in (b4, b6):            # neighbours resolved before anything is timed
            self.sh("ip", "netns", "exec", self.a, "ping", "-c1", "-W5", address)

    def in_a(self, *parts: str, timeout: float = 90) -> dict:
        """Run the prelude and the parts inside A; the last line they print is JSON."""
        script = self.dir / f"in_a_{secrets.token_hex(3)}.py"
        script.write_text("\n".join(map(textwrap.dedent, (self.prelude, *parts))))
        out = self.sh("ip", "netns", "exec", self.a, self.python, str(script), timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])

    def close(self) -> None:
        for proc in self.procs:         # only the processes this lab started, by PID
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
