"""The host agent in the lab's host namespace: two tasks by uid (one in enforce, one in
audit), a process no task claims, one task stopped midway. Every flow lands on the right
task or untagged, judged as its purpose says."""

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EGRESS = str(Path(sys.executable).parent / "egress")
T1, T2, STRANGER = 65534, 65533, 65532

PURPOSE = '''version = 1
purpose = "{purpose}"
task = "{task}"
mode = "{mode}"

[[allow]]
host = "{host}"
'''


def curl(lab, uid: int, url: str) -> str:
    return lab.host("setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
                    "curl", "-sk", "--max-time", "3", "-o", "/dev/null", "-w", "%{http_code}",
                    url, check=False).stdout


def stop_and_read(lab, agent, db) -> list[dict]:
    """SIGTERM to the agent, then the flow records of its store (port 443 only)."""
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=60) == 0, (lab.dir / "agent.log").read_text()
    audit = subprocess.run([EGRESS, "audit", "--json", "--db", str(db)], capture_output=True,
                           text=True)
    records = [json.loads(line) for line in audit.stdout.splitlines()]
    return [f for f in records if f.get("kind") == "flow" and f["dport"] == 443]


BOUNDED = ["setpriv", "--bounding-set",
           "-all,+net_admin,+net_bind_service,+sys_ptrace,+dac_read_search", "--inh-caps", "-all"]
"""The capabilities examples/systemd/egress-agent.service gives the agent, and no others."""


@pytest.mark.parametrize("limits", [[], BOUNDED], ids=["root", "unit-capabilities"])
def test_two_tasks_an_untagged_process_and_a_task_stopped_midway(lab, limits):
    lab.start_dns({"pypi.lab": "203.0.113.10", "other.lab": "203.0.113.20"})
    lab.start_https("pypi.lab", "203.0.113.10")
    lab.start_https("other.lab", "203.0.113.20")
    sock, db = lab.dir / "agent.sock", lab.dir / "egress.db"
    agent = lab.spawn("host", *limits, EGRESS, "agent", "--socket", sock, "--db", db,
                      log="agent.log")
    lab.wait_log("agent.log", "listening on")
    for task, uid, mode, host in (("t1", T1, "enforce", "pypi.lab"),
                                  ("t2", T2, "audit", "other.lab")):
        purpose = lab.dir / f"{task}.toml"
        purpose.write_text(PURPOSE.format(purpose=f"task {task}", task=task, mode=mode,
                                          host=host))
        started = lab.host(EGRESS, "task", "start", task, "--purpose", purpose, "--uid",
                           str(uid), "--socket", sock)
        assert f"task {task} started: uid:{uid}" in started.stdout
    listed = lab.host(EGRESS, "task", "list", "--socket", sock).stdout
    assert "t1\tuid:65534\tenforce" in listed and "t2\tuid:65533\taudit" in listed

    assert curl(lab, T1, "https://pypi.lab/") == "200"          # declared
    assert curl(lab, T1, "https://203.0.113.20/") == "000"      # refused: enforce
    assert curl(lab, T2, "https://other.lab/") == "200"         # declared
    assert curl(lab, T2, "https://203.0.113.10/") == "200"      # undeclared: audit passes
    assert curl(lab, STRANGER, "https://203.0.113.20/") == "200"  # no task: untagged

    lab.host(EGRESS, "task", "stop", "t1", "--socket", sock)
    assert curl(lab, T1, "https://203.0.113.20/") == "200"      # t1's rules are gone
    idle = lab.dir / "idle.toml"                 # a task without a single flow
    idle.write_text(PURPOSE.format(purpose="idle", task="idle", mode="audit", host="pypi.lab"))
    lab.host(EGRESS, "task", "start", "idle", "--purpose", idle, "--uid", "65530",
             "--socket", sock)
    lab.host(EGRESS, "task", "stop", "idle", "--socket", sock)

    flows = stop_and_read(lab, agent, db)

    def of(task, dst):
        return sorted((f["verdict"] for f in flows if f["task"] == task and f["dst"] == dst))

    assert of("t1", "203.0.113.10") == ["allow"]
    assert of("t1", "203.0.113.20") == ["block"]
    assert of("t2", "203.0.113.20") == ["allow"]
    assert of("t2", "203.0.113.10") == ["flag"]
    assert of(None, "203.0.113.20") == ["flag", "flag"]         # the stranger, t1 after stop
    events = subprocess.run([EGRESS, "audit", "--json", "--db", str(db)], capture_output=True,
                            text=True).stdout.splitlines()
    events = [(e["task"], e["event"]) for e in map(json.loads, events)
              if e["kind"] == "task-event" and e["event"].startswith("task-")]
    for task in ("t1", "t2", "idle"):       # in the store from its start, flows or not
        assert events.count((task, "task-started")) == 1, events
    assert events.count(("t1", "task-ended")) == events.count(("idle", "task-ended")) == 1
    assert ("t2", "task-ended") not in events       # still running when the agent stopped
    untagged = [f for f in flows if f["task"] is None]
    assert all("untagged" in {x["id"] for x in f["findings"]} for f in untagged)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_systemd_unit_verifies(tmp_path):
    unit = Path(__file__).parents[2] / "examples" / "systemd" / "egress-agent.service"
    text = unit.read_text()
    bounding = re.search(r"^CapabilityBoundingSet=(.*)$", text, re.M).group(1).split()
    assert bounding == ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_SYS_PTRACE",
                        "CAP_DAC_READ_SEARCH"]
    assert [f"+{c[4:].lower()}" for c in bounding] == BOUNDED[2].split(",")[1:]
    local = tmp_path / "egress-agent.service"
    local.write_text(text.replace("/usr/local/bin/egress", EGRESS))
    done = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


def test_a_task_by_time_window_takes_the_unclaimed_flows_while_it_runs(lab):
    lab.start_dns({"pypi.lab": "203.0.113.10"})
    lab.start_https("pypi.lab", "203.0.113.10")
    lab.start_https("other.lab", "203.0.113.20")
    sock, db = lab.dir / "agent.sock", lab.dir / "egress.db"
    agent = lab.spawn("host", EGRESS, "agent", "--socket", sock, "--db", db, log="agent.log")
    lab.wait_log("agent.log", "listening on")
    purpose = lab.dir / "window.toml"
    purpose.write_text(PURPOSE.format(purpose="by window", task="w1", mode="enforce",
                                      host="pypi.lab"))
    started = lab.host(EGRESS, "task", "start", "w1", "--purpose", purpose, "--socket", sock)
    assert "task w1 started: time window, audit" in started.stdout
    again = lab.host(EGRESS, "task", "start", "w2", "--purpose", purpose, "--socket", sock,
                     check=False)
    assert again.returncode == 1 and "already attributed by time window" in again.stderr
    assert curl(lab, STRANGER, "https://203.0.113.20/") == "200"    # recorded, not enforced
    assert curl(lab, 0, "https://203.0.113.20/") == "200"           # root: never the task's
    lab.host(EGRESS, "task", "stop", "w1", "--socket", sock)
    assert curl(lab, STRANGER, "https://203.0.113.10/") == "200"    # after it: untagged
    flows = [(f["task"], f["dst"], f["verdict"]) for f in stop_and_read(lab, agent, db)]
    assert ("w1", "203.0.113.20", "flag") in flows
    assert (None, "203.0.113.10", "flag") in flows
    assert len(flows) == 2                       # root's flow is not recorded at all


def test_two_tasks_by_cgroup_one_by_uid_an_untagged_process_and_one_stopped(lab):
    """Tasks by cgroup v2 beside one by uid. The agent and the tasks' processes enter the
    lab's host by
    `nsenter --net` (keeping this mount namespace, where /sys/fs/cgroup is; `ip netns exec`
    hides it, KERNEL.md). The upstream resolver is the lab's, named in a config file: the
    agent must not read this machine's own resolv.conf."""
    from egress.enforce.ruleset import cgroup2_mount
    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 mount")
    lab.start_dns({"pypi.lab": "203.0.113.10", "other.lab": "203.0.113.20"})
    lab.start_https("pypi.lab", "203.0.113.10")
    lab.start_https("other.lab", "203.0.113.20")
    shared = lab.shared_dir()
    (shared / "egress.toml").write_text('[resolver]\nupstream = ["10.99.0.1"]\n')
    groups = {}
    for task, host in (("c1", "pypi.lab"), ("c2", "other.lab")):
        name = f"egress-lab-{lab.id}-{task}"
        path = Path(mount) / name
        path.mkdir()
        lab.cleanup_later_cgroup(path)
        groups[task] = (name, path)
        (lab.dir / f"{task}.toml").write_text(PURPOSE.format(
            purpose=f"task {task}", task=task, mode="enforce", host=host))
    enter = ["nsenter", f"--net=/run/netns/{lab.host_ns}"]
    sock, db = lab.dir / "agent.sock", lab.dir / "egress.db"
    log = open(lab.dir / "agent.log", "wb")
    agent = subprocess.Popen([*enter, EGRESS, "--config", shared / "egress.toml", "agent",
                              "--socket", sock, "--db", db], stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    lab.procs.append(agent)
    lab.wait_log("agent.log", "listening on")
    for task, (name, _) in groups.items():
        subprocess.run([*enter, EGRESS, "task", "start", task, "--purpose",
                        lab.dir / f"{task}.toml", "--cgroup", name, "--socket", sock],
                       check=True, capture_output=True)
    # a cgroup that does not exist: nft refuses it; one line, and the agent goes on
    refused = subprocess.run([*enter, EGRESS, "task", "start", "c9", "--purpose",
                              lab.dir / "c1.toml", "--cgroup", f"egress-lab-{lab.id}-none",
                              "--socket", sock], capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stderr.startswith("egress: task c9: "), refused
    assert refused.stderr.count("\n") == 1, refused.stderr
    (lab.dir / "u1.toml").write_text(PURPOSE.format(purpose="by uid", task="u1",
                                                    mode="enforce", host="pypi.lab"))
    subprocess.run([*enter, EGRESS, "task", "start", "u1", "--purpose", lab.dir / "u1.toml",
                    "--uid", str(T1), "--socket", sock], check=True, capture_output=True)

    def curl_as(uid, url):
        return subprocess.run(
            [*enter, "setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
             "curl", "-sk", "--max-time", "3", "-o", "/dev/null", "-w", "%{http_code}", url],
            capture_output=True, text=True).stdout

    def curl_in(task, url):
        procs = groups[task][1] / "cgroup.procs"
        return subprocess.run(
            [*enter, "sh", "-c", f"echo $$ > {procs}; exec setpriv --reuid {STRANGER} "
             f"--regid {STRANGER} --clear-groups curl -sk --max-time 3 -o /dev/null "
             f"-w '%{{http_code}}' {url}"], capture_output=True, text=True).stdout

    assert curl_in("c1", "https://pypi.lab/") == "200"
    assert curl_in("c1", "https://other.lab/") == "000"        # a name c1 may not resolve
    assert curl_in("c2", "https://other.lab/") == "200"
    assert curl_in("c2", "https://203.0.113.10/") == "000"
    assert curl_as(T1, "https://pypi.lab/") == "200"            # u1, its DNS redirected
    assert curl_as(T1, "https://203.0.113.20/") == "000"
    assert curl_as(STRANGER, "https://203.0.113.20/") == "200"  # no task's: untagged
    subprocess.run([*enter, EGRESS, "task", "stop", "c1", "--socket", sock], check=True,
                   capture_output=True)
    assert curl_in("c1", "https://203.0.113.20/") == "200"      # c1 has ended: untagged
    flows = sorted(((f["task"], f["dst"], f["verdict"]) for f in stop_and_read(lab, agent, db)),
                   key=str)
    assert flows == sorted([("c1", "203.0.113.10", "allow"), ("c2", "203.0.113.20", "allow"),
                            ("c2", "203.0.113.10", "block"), ("u1", "203.0.113.10", "allow"),
                            ("u1", "203.0.113.20", "block"), (None, "203.0.113.20", "flag"),
                            (None, "203.0.113.20", "flag")], key=str), flows


def test_a_task_by_process_tree_takes_its_descendants_flows_only(lab):
    """Two shells of the same ordinary user: the task is one of them and what it starts;
    the other's flows stay untagged. Recorded and judged in audit mode."""
    lab.start_https("other.lab", "203.0.113.20")
    marker = lab.shared_dir() / "go"
    sock, db = lab.dir / "agent.sock", lab.dir / "egress.db"
    agent = lab.spawn("host", EGRESS, "agent", "--socket", sock, "--db", db, log="agent.log")
    lab.wait_log("agent.log", "listening on")
    shells = [lab.spawn("host", "setpriv", "--reuid", str(STRANGER), "--regid", str(STRANGER),
                        "--clear-groups", "sh", "-c",
                        f"while [ ! -e {marker} ]; do sleep 0.1; done; curl -sk --max-time 3 "
                        f"-o /dev/null https://203.0.113.20/{name}", log=f"{name}.log")
              for name in ("tree", "other")]
    purpose = lab.dir / "p.toml"
    purpose.write_text(PURPOSE.format(purpose="by pid", task="p1", mode="enforce",
                                      host="pypi.lab"))
    started = lab.host(EGRESS, "task", "start", "p1", "--purpose", purpose, "--pid",
                       str(shells[0].pid), "--socket", sock)
    assert f"task p1 started: pid:{shells[0].pid}, audit" in started.stdout
    root = lab.host(EGRESS, "task", "start", "p2", "--purpose", purpose, "--pid", "1",
                    "--socket", sock, check=False)
    assert root.returncode == 1 and "runs as uid 0" in root.stderr
    marker.touch()
    assert [s.wait(timeout=30) for s in shells] == [0, 0]
    lab.host(EGRESS, "task", "stop", "p1", "--socket", sock)
    flows = stop_and_read(lab, agent, db)
    assert sorted((str(f["task"]), f["verdict"]) for f in flows) == [("None", "flag"),
                                                                      ("p1", "flag")], (lab.dir / "agent.log").read_text()
    (mine,) = [f for f in flows if f["task"] == "p1"]
    assert mine["process"]["exe"] == "/usr/bin/curl" and "/tree" in mine["process"]["cmdline"]


@pytest.mark.parametrize("leaving_by, recorded", [("uplink", True), ("dummy0", False)])
def test_interface_limits_what_is_recorded(lab, leaving_by, recorded):
    lab.start_https("other.lab", "203.0.113.20")
    sock, db = lab.dir / "agent.sock", lab.dir / "egress.db"
    interface = lab.host_if if leaving_by == "uplink" else leaving_by
    agent = lab.spawn("host", EGRESS, "agent", "--socket", sock, "--db", db, "--interface",
                      interface, log="agent.log")
    lab.wait_log("agent.log", "listening on")
    assert curl(lab, STRANGER, "https://203.0.113.20/") == "200"
    flows = stop_and_read(lab, agent, db)
    assert [(f["task"], f["dst"]) for f in flows] == ([(None, "203.0.113.20")] if recorded
                                                      else [])
