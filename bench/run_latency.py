"""How long a task waits for egress's verdict, seen from the client: the gate path (an SSH
banner to an allowed TLS address, stopped before it leaves) from send() to the connection's
reset, against the L3/L4 rule (an undeclared address, refused at the SYN) from connect() to
ECONNREFUSED, and an allowed TLS ClientHello from send() to the server's first reply byte.
Target: p99 of the gate path under 20 ms.

Everything happens inside the lab (tests/lab/lab.py): `egress run --mode enforce` in the lab's
task-host namespace, its purpose allowing gate.lab (203.0.113.80) on 443, protocol tls. In the
fake internet a plain TCP echo server listens on 203.0.113.80:443 and on 198.51.100.99:443
(undeclared; its listener makes sure a refusal there is egress's, not a closed port). It
writes the first bytes of each connection to a file, so a banner that got through is seen.
Nothing is linked into the root namespace, nothing is forwarded or NATed there.

The client (`CLIENT` below, run by the task's user with /usr/bin/python3 from a 0755 folder
made under /var/lib and removed afterwards) repeats N times (default 500), interleaved, rotating
which comes first:
- ssh: resolve gate.lab (egress's resolver; not timed), connect to port 443, then time from
  sendall("SSH-2.0-OpenSSH_9.2p1\\r\\n") to the first error or end of recv(): the gate
  identifies SSH where the rule wants TLS, drops the payload and marks the flow blocked; the
  client's next packet (its retransmission) meets the blocked-mark rule's TCP reset.
- refused: time from the start of connect() to 198.51.100.99:443 to ECONNREFUSED.
- tls: a real ClientHello for gate.lab (made with ssl.MemoryBIO, not timed), time from
  sendall() to the echo's first byte.
Each attempt has a 5 s timeout. Outcomes other than the expected one (reset, refused, reply)
are counted and listed, never dropped. Without egress, the same tls attempts run in a plain
namespace (veth, masquerade in the lab host, as run_connections.py's baseline) for the
round trip the gate adds to.

The auditor's peak memory is sampled as in run_connections.py (TreeSampler): VmHWM of the
`egress run` process, of its forks (gate, store writer) and of the sandbox's processes, and
the highest sums of VmRSS and Pss over them.

    sudo .venv/bin/python bench/run_latency.py [-n 500] [--json out.json]

Exit 0 when the benchmark ran (whether or not the target is met), 1 when it could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run_connections import (Baseline, cleanup_runs, code_line, code_state,  # noqa: E402
                                   gate_line, loss_warnings, memory_line, pct, run_egress,
                                   stored, verdict)
from bench.run_throughput import Interrupted, _raise, finish, sh  # noqa: E402
from tests.lab.lab import Lab, LabError  # noqa: E402

ALLOWED, NAME, UNDECLARED, PORT = "203.0.113.80", "gate.lab", "198.51.100.99", 443
TASK = "bench-latency"
TARGET_MS = 20.0
PYTHON = "/usr/bin/python3"
"""The task's interpreter: the system's (the task's user cannot read root's pyenv)."""

PURPOSE = f'''version = 1
purpose = "verdict latency benchmark"
task = "{TASK}"

[[allow]]
host = "{NAME}"
ports = [{PORT}]
protocol = "tls"
'''

SERVER = r'''
import socket, sys, threading
out = open(sys.argv[1], "ab", buffering=0)
lock = threading.Lock()
def serve(c, where):
    c.settimeout(30)
    first = True
    try:
        while (data := c.recv(65536)):
            if first:
                with lock:
                    out.write(where + b" " + data[:16].hex().encode() + b"\n")
                first = False
            c.sendall(data)
    except OSError:
        pass
    finally:
        c.close()
def listen(address, port):
    s = socket.create_server((address, port), backlog=1024)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c, address.encode()), daemon=True).start()
for address in sys.argv[3:]:
    threading.Thread(target=listen, args=(address, int(sys.argv[2])), daemon=True).start()
threading.Event().wait()
'''
"""The echo server: each connection's first bytes (hex) to a file, then echoes everything."""

CLIENT = r'''
import errno, json, socket, ssl, sys, time
n, name, allowed, undeclared, port, kinds = (int(sys.argv[1]), sys.argv[2], sys.argv[3],
                                            sys.argv[4], int(sys.argv[5]), sys.argv[6].split(","))
BANNER = b"SSH-2.0-OpenSSH_9.2p1\r\n"
TIMEOUT = 5.0
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

def address():
    """The allowed name's address, through the task's resolver (keeps its set element fresh);
    the literal address where there is no resolver of egress's (the baseline)."""
    if name == "-":
        return allowed
    return socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]

def client_hello():
    bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(bio_in, bio_out, server_hostname=name if name != "-" else "gate.lab")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return bio_out.read()

def outcome_of_recv(s):
    try:
        data = s.recv(4096)
        return ("eof" if data == b"" else "reply"), time.perf_counter_ns()
    except ConnectionResetError:
        return "reset", time.perf_counter_ns()
    except socket.timeout:
        return "timeout", time.perf_counter_ns()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno)), time.perf_counter_ns()

def payload(kind):
    data = BANNER if kind == "ssh" else client_hello()
    addr = address()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    try:
        s.connect((addr, port))
    except OSError as e:
        s.close()
        return "connect " + errno.errorcode.get(e.errno, str(e.errno) if e.errno else "timeout"), None
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter_ns()
    try:
        s.sendall(data)
    except OSError as e:
        s.close()
        return "send " + errno.errorcode.get(e.errno, str(e.errno)), None
    what, t1 = outcome_of_recv(s)
    s.close()
    return what, (t1 - t0) // 1000

def refused(kind):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    t0 = time.perf_counter_ns()
    try:
        s.connect((undeclared, port))
        what = "connected"
    except ConnectionRefusedError:
        what = "refused"
    except socket.timeout:
        what = "timeout"
    except OSError as e:
        what = errno.errorcode.get(e.errno, str(e.errno))
    t1 = time.perf_counter_ns()
    s.close()
    return what, (t1 - t0) // 1000

RUN = {"ssh": payload, "tls": payload, "refused": refused}
results = {k: [] for k in kinds}
for i in range(n):
    order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
    for kind in order:
        results[kind].append(RUN[kind](kind))
print(json.dumps(results))
'''
"""The task's client: one JSON object on stdout, kind -> [[outcome, µs or null], ...]."""

EXPECTED = {"ssh": "reset", "refused": "refused", "tls": "reply"}


def summarize(attempts: list) -> dict:
    """Outcomes counted; median, p99 and max (ms) of the attempts with the expected outcome
    and also of all timed attempts."""
    outcomes: dict[str, int] = {}
    for what, _ in attempts:
        outcomes[what] = outcomes.get(what, 0) + 1
    return {"attempts": len(attempts), "outcomes": outcomes,
            "all_ms": _dist([us for _, us in attempts if us is not None])}


def summarize_kind(kind: str, attempts: list) -> dict:
    s = summarize(attempts)
    s["expected"] = EXPECTED[kind]
    s["expected_ms"] = _dist([us for what, us in attempts
                              if what == EXPECTED[kind] and us is not None])
    return s


def _dist(us: list[int]) -> dict:
    if not us:
        return {"count": 0}
    us = sorted(us)
    return {"count": len(us), "min": us[0] / 1000, "median": pct(us, 50) / 1000,
            "p99": pct(us, 99) / 1000, "max": us[-1] / 1000}


def _fmt(d: dict) -> str:
    if not d.get("count"):
        return "no timed attempt"
    return (f"median {d['median']:.2f} ms, p99 {d['p99']:.2f} ms "
            f"(min {d['min']:.2f}, max {d['max']:.2f}; {d['count']} timed)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=500, help="attempts of each kind (500)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the tls round trip without egress")
    ap.add_argument("--json", type=Path, help="write the attempts and the summary here")
    args = ap.parse_args()
    if args.n < 1:
        ap.error("-n must be at least 1")
    if os.geteuid() != 0:
        print("run_latency: needs root (network namespaces)", file=sys.stderr)
        return 1
    missing = [t for t in ("ip", "nft", "dnsmasq", "nsenter") if shutil.which(t) is None
               and not Path(f"/usr/sbin/{t}").exists()]
    if missing or not Path(PYTHON).exists():
        print(f"run_latency: missing {', '.join(missing) or PYTHON}", file=sys.stderr)
        return 1

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)
    began = time.monotonic()
    problems: list[str] = []
    out: dict = {"n": args.n, "kernel": platform.release(), "cpus": os.cpu_count(),
                 "target_p99_ms": TARGET_MS, "code": code_state()}
    workdir = Path(tempfile.mkdtemp(prefix="egress-bench-latency-"))    # 0700, root's
    # not /tmp: egress run gives each task a private one
    shared = Path(tempfile.mkdtemp(prefix="egress-bench-latency-client-", dir="/var/lib"))
    os.chmod(shared, 0o755)                     # the task's user reads the client here
    client = shared / "client.py"
    client.write_text(CLIENT)
    os.chmod(client, 0o644)
    try:
        with Lab(workdir) as lab:
            base = Baseline(lab)
            try:
                lab.start_dns({NAME: ALLOWED})
                for address in (ALLOWED, UNDECLARED):
                    lab.add_server_address(address)
                got = workdir / "received.txt"
                got.write_text("")
                lab.spawn("net", sys.executable, "-c", SERVER, got, PORT, ALLOWED, UNDECLARED,
                          log="echo-server.log")
                for address in (ALLOWED, UNDECLARED):
                    lab.wait_port(address, PORT)
                purpose = workdir / "purpose.toml"
                purpose.write_text(PURPOSE)
                os.chmod(purpose, 0o600)
                out["loadavg_before"] = os.getloadavg()
                print(f"lab {lab.id}: {args.n} attempts of each kind, interleaved; "
                      f"{os.cpu_count()} CPUs, kernel {platform.release()}, load "
                      f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
                print(code_line(out["code"]), flush=True)
                run = run_egress(lab, TASK, purpose, workdir / "latency.db",
                                 [PYTHON, str(client), str(args.n), NAME, ALLOWED, UNDECLARED,
                                  str(PORT), "ssh,refused,tls"],
                                 timeout=args.n * 3 * 6 + 120)
                out["loadavg_after"] = os.getloadavg()
                out["egress"] = {k: run[k] for k in ("status", "timed_out", "wall_s", "memory")}
                out["egress"]["stderr"] = run["stderr"][-3000:]
                try:
                    attempts = json.loads(run["stdout"].strip().splitlines()[-1])
                except (ValueError, IndexError):
                    raise LabError("the client printed no result: "
                                   + (run["stdout"] + run["stderr"])[-1500:]) from None
                out["with"] = {k: summarize_kind(k, v) for k, v in attempts.items()}
                reached = [line.split() for line in got.read_text().splitlines()]
                banner = b"SSH-2.0-".hex()
                out["ssh_banners_at_server"] = sum(1 for w in reached
                                                   if len(w) == 2 and w[1].startswith(banner))
                out["undeclared_at_server"] = sum(1 for w in reached if w and w[0] == UNDECLARED)
                records = stored(workdir / "latency.db", TASK)
                flows = [r for r in records if r.get("kind") == "flow"]
                out["store"] = {
                    "ssh_blocked": sum(1 for r in flows if r.get("dst") == ALLOWED
                                       and r.get("app") == "ssh" and r.get("verdict") == "block"),
                    "tls_allowed": sum(1 for r in flows if r.get("dst") == ALLOWED
                                       and r.get("app") == "tls" and r.get("verdict") == "allow"),
                    "undeclared_blocked": sum(1 for r in flows if r.get("dst") == UNDECLARED
                                              and r.get("verdict") == "block"),
                    "undeclared_packets": sum(r.get("packets_out") or 0 for r in flows
                                              if r.get("dst") == UNDECLARED),
                    "undeclared_sports": len({r.get("sport") for r in flows
                                              if r.get("dst") == UNDECLARED}),
                    "flows": len(flows),
                    "events_lost": sum(1 for r in records if r.get("event") == "events-lost"),
                }
                out["gate"] = gate_line(run["stderr"])
                out["loss_warnings"] = loss_warnings(run["stderr"])
                if not args.no_baseline:
                    base.build()
                    base.open()
                    proc = subprocess.Popen(
                        ["ip", "netns", "exec", base.ns, PYTHON, str(client), str(args.n), "-",
                         ALLOWED, UNDECLARED, str(PORT), "tls"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        start_new_session=True)
                    stdout, stderr, _ = finish(proc, args.n * 6 + 60)
                    base.close()
                    try:
                        plain = json.loads(stdout.strip().splitlines()[-1])
                        out["without"] = {k: summarize_kind(k, v) for k, v in plain.items()}
                    except (ValueError, IndexError):
                        problems.append(f"baseline printed no result: {stderr[-500:]}")
            finally:
                problems += cleanup_runs(lab) + base.close()
    except (LabError, OSError, subprocess.SubprocessError) as e:
        print(f"run_latency: the benchmark failed: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted):
        print("\nrun_latency: interrupted; everything made was removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(shared, ignore_errors=True)
    out["elapsed_s"] = round(time.monotonic() - began, 1)
    out["cleanup_problems"] = problems

    e = out["egress"]
    print(f"egress run: exit {e['status']}{' TIMED OUT' if e['timed_out'] else ''}, wall "
          f"{e['wall_s']} s, load {out['loadavg_before'][0]:.2f} -> {out['loadavg_after'][0]:.2f}\n")
    labels = {"ssh": "gate path: SSH banner to an allowed TLS address, send -> reset",
              "refused": "L3/L4 rule: undeclared address, connect -> refused",
              "tls": "allowed ClientHello, send -> first echoed byte"}
    for kind in ("ssh", "refused", "tls"):
        s = out["with"].get(kind)
        if s is None:
            continue
        print(f"{labels[kind]}:")
        print(f"  outcomes {s['outcomes']} (expected {s['expected']})")
        print(f"  {s['expected']}: {_fmt(s['expected_ms'])}")
        if s["outcomes"].get(s["expected"], 0) != s["attempts"]:
            print(f"  all timed attempts: {_fmt(s['all_ms'])}")
    if "without" in out:
        s = out["without"]["tls"]
        print(f"without egress, ClientHello -> first echoed byte: {_fmt(s['expected_ms'])}, "
              f"outcomes {s['outcomes']}")
    print()
    print(f"{out['gate'] or 'no gate line in the summary'}")
    st = out["store"]
    print(f"store: {st['ssh_blocked']} ssh flows blocked, {st['tls_allowed']} tls flows allowed, "
          f"{st['undeclared_blocked']} undeclared flows blocked ({st['undeclared_packets']} "
          f"packets out, {st['undeclared_sports']} source ports), {st['flows']} flows in all; "
          f"{st['events_lost']} events-lost; {len(out['loss_warnings'])} loss warning(s)")
    print(f"server: {out['ssh_banners_at_server']} SSH banners and "
          f"{out['undeclared_at_server']} undeclared connections reached it")
    print(f"memory: {memory_line(e['memory'])}")
    for p in problems:
        print(f"cleanup problem: {p}")
    ssh = out["with"].get("ssh", {})
    p99 = ssh.get("expected_ms", {}).get("p99")
    all_reset = ssh.get("outcomes", {}).get("reset", 0) == ssh.get("attempts")
    met = p99 is not None and all_reset and p99 < TARGET_MS
    out["target_met"] = met
    print(f"\n{verdict(met)}  gate path p99 < {TARGET_MS:.0f} ms "
          f"({'p99 %.2f ms' % p99 if p99 is not None else 'no reset timed'}"
          f"{'' if all_reset else '; not every attempt ended in a reset'})")
    stopped = out["ssh_banners_at_server"] == 0 and ssh.get("outcomes", {}).get("reply", 0) == 0
    print(f"{verdict(stopped)}  no SSH banner reached the server")
    print(f"took {out['elapsed_s']:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
