"""`egress rules apply` / `remove` in the lab's host: a task's rules by uid, loaded and
unloaded in one transaction each, touching no other task's, shown with real traffic from
processes of those uids (curl by setpriv) to the lab's servers."""

import sys
from pathlib import Path

from tests.lab.lab import LINK_NET

EGRESS = str(Path(sys.executable).parent / "egress")
NOBODY, OTHER = 65534, 65533

PURPOSE = '''version = 1
purpose = "Fetch from the lab's index"
task = "{task}"
mode = "enforce"

[[allow]]
host = "pypi.lab"
'''


def curl(lab, uid: int, url: str) -> str:
    got = lab.host("setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
                   "curl", "-sk", "--max-time", "3", "-o", "/dev/null", "-w", "%{http_code}",
                   url, check=False)
    return got.stdout


def test_apply_and_remove_by_uid(lab):
    lab.start_dns({"pypi.lab": "203.0.113.10"})
    lab.start_https("pypi.lab", "203.0.113.10")
    lab.start_https("mirror.lab", "203.0.113.20")
    for task, uid in (("task-a", NOBODY), ("task-b", OTHER)):
        purpose = lab.dir / f"{task}.toml"
        purpose.write_text(PURPOSE.format(task=task))
        # no egress resolver here: the host's (the lab's dnsmasq) is the task's
        loaded = lab.host(EGRESS, "rules", "apply", "--purpose", purpose, "--match",
                          f"uid:{uid}", "--resolve-now", "--resolver", LINK_NET)
        assert f"loaded the rules of task {task}" in loaded.stdout
        assert "pypi.lab -> 203.0.113.10" in loaded.stdout
    for uid in (NOBODY, OTHER):
        assert curl(lab, uid, "https://pypi.lab/") == "200"
        assert curl(lab, uid, "https://203.0.113.20/") == "000"      # refused
    assert curl(lab, 0, "https://203.0.113.20/") == "200"              # not a task's uid

    removed = lab.host(EGRESS, "rules", "remove", "--match", f"uid:{NOBODY}")
    assert "dispatch_uid 65534" in removed.stdout
    assert curl(lab, NOBODY, "https://203.0.113.20/") == "200"         # task-a's rules gone
    assert curl(lab, OTHER, "https://203.0.113.20/") == "000"          # task-b's kept
    again = lab.host(EGRESS, "rules", "remove", "--match", f"uid:{NOBODY}", check=False)
    assert again.returncode == 1 and "no task's rules are loaded" in again.stderr
