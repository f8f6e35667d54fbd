"""A shell on the lab's host, for trying `egress run` safely: ``sudo .venv/bin/python -m
tests.lab.shell [-- COMMAND...]``.

The lab's task host plays the host (its uplink leads to a fake internet with a
resolver, a package index at pypi.lab and another web server at 203.0.113.20),
so `egress run`'s namespace, forwarding and NAT stay inside the lab. Everything
is removed when the shell (or COMMAND) exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.lab.lab import Lab, missing_tools


def main(argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("tests.lab.shell: needs root (network namespaces)", file=sys.stderr)
        return 1
    if missing_tools():
        print(f"tests.lab.shell: needs {', '.join(missing_tools())} (tests/system-deps.sh)",
              file=sys.stderr)
        return 1
    command = argv[argv.index("--") + 1:] if "--" in argv else argv
    with tempfile.TemporaryDirectory(prefix="egress-lab-") as tmp, Lab(Path(tmp)) as lab:
        lab.start_dns({"pypi.lab": "203.0.113.10", "evil.lab": "198.51.100.66"})
        lab.start_https("pypi.lab", "203.0.113.10", body="lab package index")
        lab.start_https("mirror.lab", "203.0.113.20", body="not declared")
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                   PS1=f"(egress lab {lab.host_ns}) # ")
        print(f"lab host {lab.host_ns}: pypi.lab (203.0.113.10) and 203.0.113.20 on its "
              "fake internet; exit to remove the lab", file=sys.stderr)
        return subprocess.run(["ip", "netns", "exec", lab.host_ns,
                               *(command or ["bash", "--norc", "-i"])], env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
