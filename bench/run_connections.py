"""New connections at a fixed rate through a task under `egress run --mode enforce`: is every
connection recorded with its task, none wrongly blocked, no event lost, and how much memory
does the auditor take?

h2load (Debian package nghttp2-client) runs INSIDE the task, pinned to one core
(`taskset -c 0`), and opens RATE new HTTP/1.1 connections a second for SECONDS seconds, one
request each (`--h1 -c N -n N`, so each client is one connection with one request; `-r` and
`--rate-period` pace the connections: by default 20 every 10 ms, i.e. 2,000 a second, not
2,000 in one burst at each second; `--period-ms 1000` gives the burst). The server is nginx in
the lab's fake internet on conn.lab (203.0.113.70), plain HTTP on port 80 (`--https`: TLS
on 443), with an access log of each connection's serial number, so the connections that
reached the server are counted too. The purpose allows conn.lab, port 80, protocol http
(tls on 443 with `--https`); h2load resolves the name through egress's resolver.

Everything happens inside the lab (tests/lab/lab.py): egress runs in the lab's task-host
namespace, so the task's namespace, forwarding and NAT live there. Nothing is linked into the
root namespace, nothing is forwarded or NATed there.

Runs are interleaved with the same h2load without egress (a fresh plain namespace each time,
joined to the lab host by a veth and masqueraded there), which shows what the client and the
lab manage alone. In both namespaces the client's ephemeral port range is widened
(PORT_RANGE; `--default-port-range` leaves it): with the default range h2load spends its core
in connect()'s port search and opens only ~930 connections a second, egress or not. The
egress command waits for a file until that sysctl is set in the task's namespace.

Criteria, each PASS or FAIL:
- connections: h2load made every connection and every request succeeded (failed, errored
  and timeout all 0);
- recorded: the store holds one flow per connection to conn.lab:PORT, all with this run's
  task (flows recorded = connections h2load made);
- none wrongly blocked: no flow to conn.lab with verdict block, the gate blocked none, and
  h2load saw no failed or errored request;
- no lost events: no events-lost task event in the store, no NFLOG or conntrack loss warning
  in egress's stderr, and no packet dropped by the gate's queue (queue_dropped and
  user_dropped in /proc/net/netfilter/nfnetlink_queue of the lab host, sampled).

Peak memory of the auditor (reported, no target): every 0.1 s the `egress run` process
and its descendants are read from /proc. The auditor is that process; its forks (the
gate and the store writer: same command line) and the sandbox's two taskinit processes are
the rest of egress; the task's own command and tools run by egress (iptables-nft, once
exec'd) are not counted; a fork caught before its exec counts as "fork". Reported: VmHWM of the auditor process (the kernel's high-water mark, so no peak
is missed between samples), the highest VmHWM of each role, and the highest sum over the
tree of VmRSS and of Pss (smaps_rollup: shared pages split between the processes that map
them, so the fork's shared pages are not counted twice) seen in one sample.

    sudo .venv/bin/python bench/run_connections.py [--rate 2000] [--seconds 10] [--runs 3]
                                                   [--period-ms 10] [--https] [--json out.json]

Exit 0 when the benchmark ran (whether or not the criteria pass), 1 when it could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run_throughput import EGRESS, STATE, Interrupted, _raise, finish, sh  # noqa: E402
from egress.enforce.tasknet import DEFAULT_POOL4  # noqa: E402
from tests.lab.lab import Lab, LabError  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PORT_RANGE = "1024 65535"
"""The client namespace's ephemeral ports (both sides). With the default 32768-60999, 20,000
connections in 10 s leave most of the range in TIME_WAIT, and each connect() searches it
(__inet_hash_connect, __inet_check_established: 80% of h2load's profile): one core then
opens about 930 connections a second, with or without egress."""
SERVER, NAME = "203.0.113.70", "conn.lab"
TASK = "bench-conn"
LOSS_WARNINGS = ("NFLOG sequence gaps", "conntrack event overruns", "recording failed",
                 "conntrack dump failed")
"""egress run's stderr warnings that mean the record lost something (egress/enforce/run.py)."""


# ---------------------------------------------------------------------- memory

def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _kib(text: str, key: str) -> int | None:
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def descendants(root: int) -> list[int]:
    """root and every process below it (from each process's ppid in /proc/PID/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat")
        if not stat:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


class TreeSampler(threading.Thread):
    """Memory of `egress run` (``pid``) and its processes, every ``interval`` seconds until
    ``stop``; also the lab host's NFQUEUE drop counters (the auditor lives in that namespace,
    so /proc/PID/net is the lab host's)."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.interval = pid, interval
        self.stopped = threading.Event()
        self.root_cmdline = b""
        self.peak: dict[int, dict] = {}          # pid -> role, VmHWM kB
        self.max_rss_kib = self.max_pss_kib = 0
        self.max_procs = 0
        self.samples = 0
        self.queue: dict[str, dict[str, int]] = {}   # queue number -> max counters
        self.queue_peers: set[int] = set()       # netlink port ids: the binder's pid, mostly

    def role(self, pid: int) -> str | None:
        if pid == self.pid:
            return "auditor"
        cmd = _cmdline(pid)
        if cmd and cmd == self.root_cmdline:     # a fork: the gate, the store writer
            if pid in self.queue_peers:
                return "gate"                    # it holds the NFQUEUE socket
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(".db"):
                            return "store writer"
            return "fork"
        if b"egress.enforce.taskinit" in cmd:
            return "sandbox"
        return None                              # the task's command, a tool

    def sample(self) -> None:
        if not self.root_cmdline:
            cmd = _cmdline(self.pid)
            if not cmd or cmd.startswith(b"ip\0"):
                return                           # still `ip netns exec`, not yet egress
            self.root_cmdline = cmd
        rss = pss = procs = 0
        for pid in descendants(self.pid):
            role = self.role(pid)
            if role is None:
                continue
            status = _read(f"/proc/{pid}/status")
            hwm, now = _kib(status, "VmHWM"), _kib(status, "VmRSS")
            if hwm is None:
                continue
            procs += 1
            rss += now or 0
            pss += _kib(_read(f"/proc/{pid}/smaps_rollup"), "Pss") or 0
            seen = self.peak.setdefault(pid, {"role": role, "hwm_kib": 0, "samples": 0})
            if role != "fork":
                seen["role"] = role              # a fork is named once it is known
            seen["hwm_kib"] = max(seen["hwm_kib"], hwm)
            seen["samples"] += 1
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = _read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
                seen["cpu_s"] = round((int(fields[11]) + int(fields[12])) / CLK_TCK, 2)
        self.max_rss_kib = max(self.max_rss_kib, rss)
        self.max_pss_kib = max(self.max_pss_kib, pss)
        self.max_procs = max(self.max_procs, procs)
        self.samples += 1
        for line in _read(f"/proc/{self.pid}/net/netfilter/nfnetlink_queue").splitlines():
            cols = line.split()
            if len(cols) >= 8:
                if cols[0].isdigit():
                    self.queue_peers.add(int(cols[1]))
                else:
                    continue
                q = self.queue.setdefault(cols[0], {"queue_dropped": 0, "user_dropped": 0})
                q["queue_dropped"] = max(q["queue_dropped"], int(cols[5]))
                q["user_dropped"] = max(q["user_dropped"], int(cols[6]))

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.sample()
            except (OSError, ValueError, IndexError):
                pass                             # a process that ended while read
            self.stopped.wait(self.interval)

    def result(self) -> dict:
        by_role: dict[str, int] = {}
        cpu: dict[str, float] = {}
        for seen in self.peak.values():
            by_role[seen["role"]] = max(by_role.get(seen["role"], 0), seen["hwm_kib"])
            cpu[seen["role"]] = round(cpu.get(seen["role"], 0) + seen.get("cpu_s", 0), 2)
        return {
            "method": f"/proc every {self.interval}s: VmHWM per process; sums of VmRSS and "
                      "Pss over the auditor, its forks and the sandbox's taskinit processes",
            "samples": self.samples,
            "auditor_hwm_mib": round(by_role.get("auditor", 0) / 1024, 1),
            "hwm_mib_by_role": {k: round(v / 1024, 1) for k, v in sorted(by_role.items())},
            "cpu_s_by_role": dict(sorted(cpu.items())),
            "processes": {str(pid): s for pid, s in self.peak.items()},
            "tree_max_rss_mib": round(self.max_rss_kib / 1024, 1),
            "tree_max_pss_mib": round(self.max_pss_kib / 1024, 1),
            "tree_max_processes": self.max_procs,
            "nfqueue": self.queue,
        }


def memory_line(mem: dict) -> str:
    roles = ", ".join(f"{k} {v} MiB" for k, v in mem["hwm_mib_by_role"].items())
    return (f"auditor peak RSS (VmHWM) {mem['auditor_hwm_mib']} MiB; whole tree peak "
            f"{mem['tree_max_rss_mib']} MiB RSS, {mem['tree_max_pss_mib']} MiB PSS "
            f"({mem['tree_max_processes']} processes); per role VmHWM: {roles} "
            f"[{mem['samples']} samples]; CPU s: "
            + ", ".join(f"{k} {v}" for k, v in mem["cpu_s_by_role"].items()))


# ---------------------------------------------------------------------- egress run

def task_netns(lab: Lab, proc: subprocess.Popen, timeout: float = 30) -> str | None:
    """The task namespace of the egress run in this lab's host namespace (its state file
    names that namespace, which is unique to this bench), once it exists."""
    host = os.stat(f"/run/netns/{lab.host_ns}").st_ino
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for path in STATE.glob("*.json") if STATE.exists() else []:
            with contextlib.suppress(OSError, ValueError):
                state = json.loads(path.read_text())
                if state.get("host_netns") == host and state.get("task_pid") \
                        and Path(f"/run/netns/{state['netns']}").exists():
                    return state["netns"]
        time.sleep(0.02)
    return None


def run_egress(lab: Lab, task: str, purpose: Path, db: Path, command: list[str],
               timeout: float, go: Path | None = None, prepare=None) -> dict:
    """`egress run --mode enforce` of ``command`` in the lab host, sampled while it runs.
    With ``go``: once the task's namespace exists, ``prepare(netns, auditor pid)`` runs, then ``go`` is
    made (the command waits for it)."""
    cmd = ["ip", "netns", "exec", lab.host_ns, EGRESS, "run", "--task", task,
           "--purpose", str(purpose), "--mode", "enforce", "--db", str(db), "--", *command]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    netns = None
    try:
        if go is not None:
            netns = task_netns(lab, proc)
            if netns is not None and prepare is not None:
                prepare(netns, proc.pid)
            go.write_text("")
        out, err, timed_out = finish(proc, timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        finish(proc, 30)
        raise
    finally:
        sampler.stopped.set()
        sampler.join(timeout=5)
        if go is not None:
            go.unlink(missing_ok=True)
    return {"stdout": out, "stderr": err, "status": proc.returncode, "timed_out": timed_out,
            "wall_s": round(time.monotonic() - started, 2), "memory": sampler.result(),
            "netns": netns}


def wait_for(go: Path, command: list[str]) -> list[str]:
    """``command`` started once ``go`` exists (at most 30 s of waiting; then exit 97)."""
    return ["sh", "-c", f'i=0; while [ ! -e "{go}" ]; do sleep 0.02; i=$((i+1)); '
            '[ $i -gt 1500 ] && exit 97; done; exec "$@"', "wait-for-go", *command]


def stored(db: Path, task: str) -> list[dict]:
    done = sh(EGRESS, "audit", "--json", "--events", "--db", db, check=False, timeout=300)
    if done.returncode not in (0, 10):
        raise LabError(f"egress audit: {done.stderr.strip()}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def gate_line(stderr: str) -> str:
    return next((line.strip() for line in stderr.splitlines() if line.startswith("gate:")), "")


def loss_warnings(stderr: str) -> list[str]:
    return [line.strip() for line in stderr.splitlines()
            if line.startswith("warning:") and any(w in line for w in LOSS_WARNINGS)]


def cleanup_runs(lab: Lab) -> list[str]:
    """Runs of ours in the lab host namespace (unique to this bench) whose auditor died."""
    done = sh("ip", "netns", "exec", lab.host_ns, EGRESS, "cleanup", check=False, timeout=60)
    if done.returncode != 0:
        return [f"egress cleanup: {done.stderr.strip() or done.stdout.strip()}"]
    return []


def code_state() -> dict:
    """The commit measured, and the tracked files of egress that differed from it (egress
    runs from the work tree, so uncommitted edits are part of what was measured)."""
    head = sh("git", "-C", REPO, "rev-parse", "--short", "HEAD", check=False).stdout.strip()
    dirty = sh("git", "-C", REPO, "status", "--porcelain", "--untracked-files=no", "--",
               "egress", "cli", "db", "tagging", check=False).stdout.split("\n")
    return {"head": head, "modified": [line[3:] for line in dirty if line.strip()]}


def code_line(state: dict) -> str:
    return (f"code: {state['head']}" + (f" with uncommitted changes to "
                                        f"{', '.join(state['modified'])}"
                                        if state["modified"] else " (clean)"))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ---------------------------------------------------------------------- this benchmark

def start_nginx(lab: Lab, https: bool) -> Path:
    """nginx on conn.lab (203.0.113.70): port 80, or 443 with TLS; its access log (returned)
    has one line per request: the connection's serial number and the status."""
    lab.add_server_address(SERVER)
    d = lab.dir
    tls = ""
    if https:
        key, cert = d / "conn.key", d / "conn.crt"
        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
           "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", f"/CN={NAME}",
           "-addext", f"subjectAltName=DNS:{NAME}", "-keyout", key, "-out", cert)
        tls = f"ssl_certificate {cert}; ssl_certificate_key {key};"
    log = d / "conn-access.log"
    conf = d / "nginx-conn.conf"
    conf.write_text(f"""
daemon off;
user root;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {d}/nginx-conn.pid;
error_log {d}/nginx-conn-error.log;
events {{ worker_connections 16384; }}
http {{
  log_format conn '$connection $status';
  access_log {log} conn buffer=64k flush=1s;
  client_body_temp_path {d}/nginx-body;
  proxy_temp_path {d}/nginx-proxy;
  fastcgi_temp_path {d}/nginx-fastcgi;
  uwsgi_temp_path {d}/nginx-uwsgi;
  scgi_temp_path {d}/nginx-scgi;
  server {{
    listen {SERVER}:{443 if https else 80}{' ssl' if https else ''} backlog=8192;
    server_name {NAME};
    {tls}
    location / {{ return 200 "ok\\n"; }}
  }}
}}
""")
    lab.spawn("net", "nginx", "-c", conf, "-p", d, log="nginx-conn.log")
    lab.wait_port(SERVER, 443 if https else 80)
    return log


def purpose(https: bool) -> str:
    port, protocol = (443, "tls") if https else (80, "http")
    return f'''version = 1
purpose = "new connections benchmark"
task = "{TASK}"

[[allow]]
host = "{NAME}"
ports = [{port}]
protocol = "{protocol}"
'''


def parse_h2load(out: str) -> dict:
    got: dict = {}
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    if m:
        got.update(zip(("total", "started", "done", "succeeded", "failed", "errored",
                        "timeout"), map(int, m.groups())))
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        got["2xx"] = int(m.group(1))
    m = re.search(r"finished in ([\d.]+)(m?s)", out)
    if m:
        got["finished_s"] = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    m = re.search(r"time for connect:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+"
                  r"([\d.]+)(us|ms|s)", out)
    if m:
        unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}
        got["connect_ms"] = {"min": float(m.group(1)) * unit[m.group(2)],
                             "max": float(m.group(3)) * unit[m.group(4)],
                             "mean": float(m.group(5)) * unit[m.group(6)]}
    return got


def parse_log(path: Path) -> dict:
    """h2load's --log-file: per request its start (µs since the epoch), status and µs to the
    end of its response. The achieved rate is connections over the span of their starts."""
    starts, times, bad = [], [], 0
    for line in path.read_text().splitlines() if path.exists() else []:
        cols = line.split("\t")
        if len(cols) >= 3 and cols[0].isdigit():
            starts.append(int(cols[0]))
            times.append(int(cols[2]))
            bad += not cols[1].startswith("2")
    if len(starts) < 2:
        return {"logged": len(starts)}
    starts.sort()
    times.sort()
    span = (starts[-1] - starts[0]) / 1e6
    return {"logged": len(starts), "not_2xx": bad, "start_span_s": round(span, 2),
            "achieved_rate": round((len(starts) - 1) / span, 1) if span else None,
            "request_ms": {"p50": round(pct(times, 50) / 1000, 2),
                           "p99": round(pct(times, 99) / 1000, 2),
                           "max": round(times[-1] / 1000, 2)}}


def pct(sorted_values: list, p: float):
    """Nearest-rank percentile of sorted values."""
    k = max(0, min(len(sorted_values) - 1, -(-len(sorted_values) * p // 100) - 1))
    return sorted_values[int(k)]


class Baseline:
    """The same h2load without egress: a plain namespace joined to the lab host by a veth,
    IPv4 forwarding on that veth and the lab's uplink only, one masquerade rule in an nft
    table of the lab host (as bench/run_throughput.py's "without egress"). A new namespace
    for each run, as egress makes a new one for each task: sockets a run leaves in TIME_WAIT
    never slow the next run's connect()."""

    HOST, TASK, NET = "10.215.0.1", "10.215.0.2", "10.215.0.0/30"

    def __init__(self, lab: Lab):
        self.lab = lab
        self.ns, self.veth, self.table = f"ec{lab.id}t", f"ec{lab.id}v", f"econn{lab.id}"

    def build(self) -> None:
        """The lab host's side, once: the masquerade rule."""
        lab = self.lab
        rules = lab.dir / "baseline.nft"
        rules.write_text(f"table ip {self.table} {{\n  chain postrouting {{\n"
                         "    type nat hook postrouting priority srcnat; policy accept;\n"
                         f'    ip saddr {self.NET} oifname "{lab.host_if}" masquerade\n'
                         "  }\n}\n")
        lab.host("nft", "-f", rules)
        lab.host("sysctl", "-qw", f"net.ipv4.conf.{lab.host_if}.forwarding=1")

    def open(self) -> None:
        """A fresh client namespace and its veth."""
        lab = self.lab
        self.close()
        sh("ip", "netns", "add", self.ns)
        sh("ip", "-n", lab.host_ns, "link", "add", self.veth, "type", "veth",
           "peer", "name", "eth0", "netns", self.ns)
        sh("ip", "-n", lab.host_ns, "addr", "add", f"{self.HOST}/30", "dev", self.veth)
        sh("ip", "-n", lab.host_ns, "link", "set", self.veth, "up")
        for cmd in (("link", "set", "lo", "up"), ("addr", "add", f"{self.TASK}/30", "dev", "eth0"),
                    ("link", "set", "eth0", "up"), ("route", "add", "default", "via", self.HOST)):
            sh("ip", "-n", self.ns, *cmd)
        lab.host("sysctl", "-qw", f"net.ipv4.conf.{self.veth}.forwarding=1")
        sh("ip", "netns", "exec", self.ns, "sysctl", "-qw", "net.ipv4.tcp_fastopen=0")

    def close(self) -> list[str]:
        if Path(f"/run/netns/{self.ns}").exists():
            done = sh("ip", "netns", "del", self.ns, check=False)
            if done.returncode != 0:
                return [f"ip netns del {self.ns}: {done.stderr.strip()}"]
        return []


def client_sysctls(args, netns: str, auditor: int | None = None) -> None:
    """The client's namespace: a wide ephemeral port range (see PORT_RANGE). A task's
    namespace is mounted under /run/netns in the auditor's mount namespace (`ip netns exec`
    gave it one of its own), so it is entered from there."""
    if args.wide_ports:
        enter = ["nsenter", "-t", str(auditor), "-m"] if auditor else []
        sh(*enter, "ip", "netns", "exec", netns, "sysctl", "-qw",
           f"net.ipv4.ip_local_port_range={PORT_RANGE}")


def h2load_cmd(args, target: str, log: Path) -> list[str]:
    n = args.rate * args.seconds
    per_period = max(1, round(args.rate * args.period_ms / 1000))
    scheme = "https" if args.https else "http"
    return ["taskset", "-c", "0", "h2load", "--h1", "-t", "1", "-c", str(n), "-n", str(n),
            "-m", "1", "-r", str(per_period), f"--rate-period={args.period_ms}ms", "-N", "10s",
            f"--log-file={log}", f"{scheme}://{target}/"]


def fresh_log(shared: Path, name: str) -> Path:
    """A file the task's user can write (h2load runs as that user under egress)."""
    log = shared / name
    log.write_text("")
    os.chmod(log, 0o666)
    return log


def run_without(lab: Lab, base: Baseline, args, index: int, access_log: Path,
                shared: Path) -> dict:
    log = fresh_log(shared, f"h2load-without-{index}.log")
    base.open()
    client_sysctls(args, base.ns)
    before = _lines(access_log)
    load_before = os.getloadavg()
    started = time.monotonic()
    proc = subprocess.Popen(["ip", "netns", "exec", base.ns,
                             *h2load_cmd(args, SERVER, log)],     # the address: no DNS here
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _, timed_out = finish(proc, args.seconds + 240)
    finally:
        base.close()
    result = {"side": "without", "port_range": PORT_RANGE if args.wide_ports else "default", "run": index, "status": proc.returncode,
              "timed_out": timed_out, "wall_s": round(time.monotonic() - started, 2),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "h2load": parse_h2load(out), "log": parse_log(log), "h2load_out": out[-3000:]}
    time.sleep(1.5)                               # nginx flushes its log each second
    result["server_connections"] = _server_connections(access_log, before)
    return result


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _server_connections(access_log: Path, before: int) -> int:
    lines = access_log.read_text().splitlines()[before:] if access_log.exists() else []
    return len({line.split()[0] for line in lines if line.strip()})


def stale_conntrack(lab: Lab) -> int:
    """Conntrack entries in the lab host whose source is in egress's task pool: what earlier
    runs left (TIME_WAIT lasts 120 s in conntrack), which a new run, given the same subnet,
    may meet again."""
    pool = ipaddress.ip_network(DEFAULT_POOL4)
    text = lab.host("cat", "/proc/net/nf_conntrack", check=False).stdout
    count = 0
    for line in text.splitlines():
        m = re.search(r"src=(\S+)", line)
        with contextlib.suppress(ValueError):
            count += bool(m) and ipaddress.ip_address(m.group(1)) in pool
    return count


def run_with(lab: Lab, args, index: int, access_log: Path, shared: Path) -> dict:
    n = args.rate * args.seconds
    task = f"{TASK}-{index}"
    purpose_file = lab.dir / "purpose.toml"
    purpose_file.write_text(purpose(args.https).replace(f'"{TASK}"', f'"{task}"'))
    os.chmod(purpose_file, 0o600)
    db = lab.dir / f"conn-{index}.db"
    port = 443 if args.https else 80
    log = fresh_log(shared, f"h2load-with-{index}.log")
    before = _lines(access_log)
    stale = stale_conntrack(lab)
    load_before = os.getloadavg()
    go = shared / f"go-{index}"
    run = run_egress(lab, task, purpose_file, db, wait_for(go, h2load_cmd(args, NAME, log)),
                     timeout=args.seconds + 240, go=go,
                     prepare=lambda netns, pid: client_sysctls(args, netns, pid))
    load_after = os.getloadavg()
    time.sleep(1.5)
    server_conns = _server_connections(access_log, before)
    h2 = parse_h2load(run["stdout"])
    records = stored(db, task)
    flows = [r for r in records if r.get("kind") == "flow" and r.get("dst") == SERVER]
    to_port = [r for r in flows if r.get("dport") == port]
    right_task = [r for r in to_port if r.get("task") == task]
    lost_events = [r for r in records if r.get("kind") == "task-event"
                   and r.get("event") == "events-lost"]
    gate = gate_line(run["stderr"])
    m = re.search(r"([\d,]+) blocked", gate)
    blocked_by_gate = int(m.group(1).replace(",", "")) if m else None
    queue_full = sum(q["queue_dropped"] for q in run["memory"]["nfqueue"].values())
    undelivered = sum(q["user_dropped"] for q in run["memory"]["nfqueue"].values())
    queue_drops = queue_full + undelivered
    made = h2.get("started")
    by_tuple: dict = {}
    for r in right_task:
        by_tuple.setdefault((r.get("src"), r.get("sport")), []).append(r)
    split = [group for group in by_tuple.values() if len(group) > 1]
    extra = [r for group in split for r in sorted(group, key=lambda r: r.get("start") or 0)[1:]]
    result = {
        "side": "with", "netns": run["netns"],
        "port_range": PORT_RANGE if args.wide_ports else "default",
        "split_connections": len(split), "extra_records": len(extra),
        "extra_verdicts": _count(r.get("verdict") for r in extra),
        "extra_findings": _count(f.get("id") for r in extra for f in r.get("findings") or []),
        "split_examples": split[:2], "run": index, "task": task, "status": run["status"],
        "timed_out": run["timed_out"], "wall_s": run["wall_s"],
        "loadavg_before": load_before, "loadavg_after": load_after,
        "h2load": h2, "log": parse_log(log), "server_connections": server_conns,
        "flows_to_server": len(flows), "flows_to_port": len(to_port),
        "flows_right_task": len(right_task),
        "distinct_sports": len({r.get("sport") for r in right_task}),
        "verdicts": dict(sorted(_count(r.get("verdict") for r in flows).items())),
        "other_tasks": _count(r.get("task") for r in to_port if r.get("task") != task),
        "events_lost": [r.get("findings") for r in lost_events],
        "loss_warnings": loss_warnings(run["stderr"]), "queue_drops": queue_drops,
        "queue_dropped": queue_full, "user_dropped": undelivered, "stale_ct": stale,
        "gate": gate, "gate_blocked": blocked_by_gate, "memory": run["memory"],
        "egress_stderr": run["stderr"][-3000:], "h2load_out": run["stdout"][-3000:],
    }
    ok_conn = (made == n and h2.get("succeeded") == n and h2.get("failed") == 0
               and h2.get("errored") == 0 and h2.get("timeout") == 0)
    ok_rec = made is not None and len(right_task) == made == len(to_port)
    ok_block = (result["verdicts"].get("block", 0) == 0 and blocked_by_gate == 0
                and h2.get("failed") == 0 and h2.get("errored") == 0)
    ok_lost = not lost_events and not result["loss_warnings"] and queue_drops == 0
    result["criteria"] = {"connections made and succeeded": ok_conn,
                          "every connection recorded with its task": ok_rec,
                          "none wrongly blocked": ok_block, "no lost events": ok_lost}
    return result


def _count(items) -> dict:
    out: dict = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def _h2_line(r: dict) -> str:
    h2, log = r["h2load"], r["log"]
    if not h2:
        return "h2load printed no result:\n    " + r["h2load_out"][-800:].replace("\n", "\n    ")
    line = (f"h2load: {h2.get('started', '?'):,} connections made, {h2.get('succeeded', '?'):,} "
            f"succeeded, {h2.get('failed', '?')} failed, {h2.get('errored', '?')} errored, "
            f"{h2.get('timeout', '?')} timeout; finished in {h2.get('finished_s', 0):.2f} s")
    if log.get("achieved_rate"):
        line += (f"\n    started over {log['start_span_s']} s = {log['achieved_rate']:,.0f} "
                 f"connections/s; request p50 {log['request_ms']['p50']} ms, p99 "
                 f"{log['request_ms']['p99']} ms, max {log['request_ms']['max']} ms")
    if "connect_ms" in h2:
        line += (f"; connect mean {h2['connect_ms']['mean']:.2f} ms, "
                 f"max {h2['connect_ms']['max']:.2f} ms")
    return line


def report(r: dict, args) -> None:
    print(f"run {r['run']} {r['side']} egress: exit {r['status']}"
          f"{' TIMED OUT' if r['timed_out'] else ''}, wall {r['wall_s']} s, load "
          f"{r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f}")
    print(f"  {_h2_line(r)}")
    print(f"  server (nginx) saw {r['server_connections']:,} connections")
    if r["side"] == "without":
        return
    port = 443 if args.https else 80
    print(f"  before the run, {r['stale_ct']:,} conntrack entries of earlier runs' task "
          f"subnets were in the lab host")
    print(f"  store: {r['flows_to_port']:,} flows to {SERVER}:{port}, "
          f"{r['flows_right_task']:,} with task {r['task']} ({r['distinct_sports']:,} distinct "
          f"source ports); verdicts of flows to {SERVER}: {r['verdicts']}"
          + (f"; other tasks: {r['other_tasks']}" if r["other_tasks"] else ""))
    if r["split_connections"]:
        print(f"  {r['split_connections']:,} connections have more than one record: "
              f"{r['extra_records']:,} extra records, verdicts {r['extra_verdicts']}, "
              f"findings {r['extra_findings']}")
    print(f"  {r['gate'] or 'no gate line in the summary'}")
    print(f"  losses: {len(r['events_lost'])} events-lost task event(s), "
          f"{len(r['loss_warnings'])} loss warning(s); the gate's queue dropped "
          f"{r['queue_drops']:,} packet(s) ({r['queue_dropped']:,} queue full, "
          f"{r['user_dropped']:,} undeliverable)")
    for w in r["loss_warnings"]:
        print(f"    {w}")
    for f in r["events_lost"]:
        print(f"    events-lost: {json.dumps(f)[:300]}")
    print(f"  memory: {memory_line(r['memory'])}")
    for name, ok in r["criteria"].items():
        print(f"  {verdict(ok)}  {name}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=2000, help="new connections a second (2000)")
    ap.add_argument("--seconds", type=int, default=10, help="for this long (10)")
    ap.add_argument("--period-ms", type=int, default=10,
                    help="h2load --rate-period: connections start in groups of "
                         "rate*period this often (10 ms; 1000 gives one burst a second)")
    ap.add_argument("--runs", type=int, default=3,
                    help="runs of each side, interleaved without/with (3)")
    ap.add_argument("--https", action="store_true", help="TLS on 443 instead of HTTP on 80")
    ap.add_argument("--default-port-range", dest="wide_ports", action="store_false",
                    help="leave the client's ephemeral port range at the kernel's default "
                         "(h2load then spends its core in connect()'s port search)")
    ap.add_argument("--json", type=Path, help="write the runs here")
    args = ap.parse_args()
    if min(args.rate, args.seconds, args.period_ms, args.runs) < 1:
        ap.error("--rate, --seconds, --period-ms and --runs must be at least 1")
    if os.geteuid() != 0:
        print("run_connections: needs root (network namespaces)", file=sys.stderr)
        return 1
    if shutil.which("h2load") is None:
        print("run_connections: h2load is missing; install it with "
              "`apt-get install nghttp2-client`", file=sys.stderr)
        return 1
    missing = [t for t in ("ip", "nft", "nginx", "dnsmasq", "taskset", "openssl")
               if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    if missing or not Path(EGRESS).exists():
        print(f"run_connections: missing {', '.join(missing) or EGRESS}", file=sys.stderr)
        return 1

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)
    began = time.monotonic()
    code = code_state()
    runs: list[dict] = []
    problems: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="egress-bench-conn-"))     # 0700, root's
    # not /tmp: egress run gives each task a private one
    shared = Path(tempfile.mkdtemp(prefix="egress-bench-conn-logs-", dir="/var/lib"))
    os.chmod(shared, 0o755)                     # h2load's logs: the task's user writes them
    try:
        with Lab(workdir) as lab:
            base = Baseline(lab)
            try:
                lab.start_dns({NAME: SERVER})
                access_log = start_nginx(lab, args.https)
                base.build()
                n = args.rate * args.seconds
                print(f"lab {lab.id}: {args.runs} run(s) of each side, interleaved; {n:,} "
                      f"connections each, {max(1, round(args.rate * args.period_ms / 1000))} "
                      f"every {args.period_ms} ms ({args.rate:,}/s for {args.seconds} s); "
                      f"{os.cpu_count()} CPUs, kernel {platform.release()}, load "
                      f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
                print(code_line(code) + "\n", flush=True)
                for i in range(1, args.runs + 1):
                    for side in ("without", "with"):
                        r = (run_without(lab, base, args, i, access_log, shared)
                             if side == "without" else run_with(lab, args, i, access_log, shared))
                        runs.append(r)
                        report(r, args)
                        print(flush=True)
                        time.sleep(1)
            finally:
                problems += cleanup_runs(lab) + base.close()
    except (LabError, OSError, subprocess.SubprocessError) as e:
        print(f"run_connections: the benchmark failed: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted):
        print("\nrun_connections: interrupted; everything made was removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(shared, ignore_errors=True)
    elapsed = time.monotonic() - began
    for p in problems:
        print(f"cleanup problem: {p}")
    withs = [r for r in runs if r["side"] == "with"]
    if withs:
        print(f"summary over {len(withs)} run(s) with egress:")
        for name in withs[0]["criteria"]:
            passed = sum(r["criteria"][name] for r in withs)
            print(f"  {verdict(passed == len(withs))}  {name} ({passed}/{len(withs)} runs)")
        for side in ("without", "with"):
            rates = [r["log"].get("achieved_rate") or 0 for r in runs if r["side"] == side]
            p99 = [r["log"].get("request_ms", {}).get("p99", 0) for r in runs
                   if r["side"] == side]
            print(f"  {side + ' egress:':<16} achieved {statistics.median(rates):,.0f} "
                  f"connections/s (median of {len(rates)}; asked {args.rate:,}), request p99 "
                  f"median {statistics.median(p99)} ms")
        mems = [r["memory"] for r in withs]
        print(f"  auditor peak RSS (VmHWM) max {max(m['auditor_hwm_mib'] for m in mems)} MiB; "
              f"whole tree max {max(m['tree_max_rss_mib'] for m in mems)} MiB RSS, "
              f"{max(m['tree_max_pss_mib'] for m in mems)} MiB PSS")
    print(f"took {elapsed:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({
            "kernel": platform.release(), "cpus": os.cpu_count(), "code": code,
            "args": vars(args) | {
                "json": str(args.json)},
            "elapsed_s": round(elapsed, 1), "cleanup_problems": problems, "runs": runs,
        }, indent=2) + "\n")
    return 0 if withs else 1


if __name__ == "__main__":
    sys.exit(main())
