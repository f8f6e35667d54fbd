"""owners on the kernel: sock_diag lookups and SOCK_DESTROY in another network namespace,
and the /proc walk that names the process holding a socket.

A closed lab of its own: two network namespaces made here with unique names, T (the task)
and S (a server), joined by a veth pair made inside T with its peer moved to S (the root
namespace gets no link, no route, no forwarding). In S a Python server listens on TCP and
UDP, over IPv4 and IPv6 (documentation addresses). In T a task runs in its own PID
namespace (unshare --pid --fork): its init starts 48 sleepers and one client, as nobody,
with secrets on its command line; the client connects over TCP and UDP, v4 and v6, prints
its sockets, then prints the error each socket gets. The test process stays in the root
namespace throughout and checks that it does.

Every process is started here and stopped here by its PID; the namespaces are deleted on
the way out, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

import pytest

from egress.enforce import owners

T_ADDR, S_ADDR = "192.0.2.2", "192.0.2.1"
T_ADDR6, S_ADDR6 = "2001:db8::2", "2001:db8::1"
TCP_PORT, UDP_PORT, BOUND_UDP_PORT = 7000, 7001, 7101
SLEEPERS = 48                       # + the task's init + the client = 50 processes
TOKEN = "ghp_" + "A1b2C3d4E5" * 4

SERVER = f"""
import socket, sys, threading, time
def tcp(fam, addr):
    l = socket.socket(fam, socket.SOCK_STREAM)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind((addr, {TCP_PORT})); l.listen(16)
    held = []
    while True:
        held.append(l.accept()[0])
def udp(fam, addr):
    u = socket.socket(fam, socket.SOCK_DGRAM); u.bind((addr, {UDP_PORT}))
    while True:
        data, peer = u.recvfrom(2048); u.sendto(data, peer)
for fn, fam, addr in ((tcp, socket.AF_INET, "{S_ADDR}"), (tcp, socket.AF_INET6, "{S_ADDR6}"),
                      (udp, socket.AF_INET, "{S_ADDR}"), (udp, socket.AF_INET6, "{S_ADDR6}")):
    threading.Thread(target=fn, args=(fam, addr), daemon=True).start()
time.sleep(0.2); print("ready", flush=True); time.sleep(600)
"""

CLIENT = f"""
import json, os, socket, sys, threading, time
lock = threading.Lock()
def say(**kw):
    with lock:
        print(json.dumps(kw), flush=True)
socks = {{}}
socks["tcp4"] = socket.create_connection(("{S_ADDR}", {TCP_PORT}), timeout=10)
socks["tcp6"] = socket.create_connection(("{S_ADDR6}", {TCP_PORT}), timeout=10)
socks["tcp46"] = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)    # dual-stack, to IPv4
socks["tcp46"].connect(("::ffff:{S_ADDR}", {TCP_PORT}))
for name, fam, addr in (("udp4", socket.AF_INET, "{S_ADDR}"),
                        ("udp6", socket.AF_INET6, "{S_ADDR6}"),
                        ("udp46", socket.AF_INET6, "::ffff:{S_ADDR}"),
                        ("udp4bound", socket.AF_INET, "{S_ADDR}")):
    u = socket.socket(fam, socket.SOCK_DGRAM)
    if name == "udp4bound":
        u.bind(("{T_ADDR}", {BOUND_UDP_PORT}))
    u.connect((addr, {UDP_PORT})); u.send(b"hello"); u.settimeout(10); u.recv(100)
    socks[name] = u
for s in socks.values():
    s.settimeout(None)
say(pid=os.getpid(), socks={{n: [s.getsockname()[:2], s.getpeername()[:2]]
                            for n, s in socks.items()}})
def wait(name, s):
    try:
        while True:
            if not s.recv(100) and name.startswith("tcp"):
                say(sock=name, eof=True); return
    except OSError as e:
        say(sock=name, errno=e.errno, error=repr(e))
for n, s in socks.items():
    threading.Thread(target=wait, args=(n, s), daemon=True).start()
time.sleep(600)
"""

INIT = """
import subprocess, sys
n, client = int(sys.argv[1]), sys.argv[2]
sleepers = [subprocess.Popen(["sleep", "600"]) for _ in range(n)]
proc = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                         "/usr/bin/python3", "-c", client, "--password", "hunter2",
                         "--token=" + sys.argv[3]])
proc.wait()
"""


def _problem() -> str | None:
    if os.geteuid() != 0:
        return "the owners lab needs root (network and PID namespaces)"
    missing = [t for t in ("ip", "unshare", "setpriv") if shutil.which(t) is None]
    if missing or not os.path.exists("/usr/bin/python3"):
        return f"the owners lab needs {', '.join(missing) or '/usr/bin/python3'}"
    return None


def _sh(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def _netns_ids() -> tuple[int, int]:
    return os.stat("/proc/self/ns/net").st_ino, os.stat("/proc/thread-self/ns/net").st_ino


class Lines:
    """A started process's stdout, line by line, read on a thread of its own."""

    def __init__(self, proc: subprocess.Popen):
        self.q: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.q.put(line.rstrip("\n"))

    def wait(self, pred, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no such line in {timeout}s; seen: {self.seen}")
            try:
                line = self.q.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(line)
            if pred(line):
                return line


class OwnersLab:
    def __init__(self):
        tag = f"{os.getpid() % 10000:04d}{secrets.token_hex(2)}"
        self.t, self.s = f"egow{tag}t", f"egow{tag}s"
        self.t_path = f"/run/netns/{self.t}"
        self.procs: list[subprocess.Popen] = []
        self.made: list[str] = []
        self.init_pid = self.client_pid = 0

    def build(self) -> "OwnersLab":
        for ns in (self.t, self.s):
            _sh("ip", "netns", "add", ns)
            self.made.append(ns)
        _sh("ip", "-n", self.t, "link", "add", "vt", "type", "veth", "peer", "name", "vs",
            "netns", self.s)
        for ns, dev, a4, a6 in ((self.t, "vt", T_ADDR, T_ADDR6), (self.s, "vs", S_ADDR, S_ADDR6)):
            _sh("ip", "-n", ns, "addr", "add", f"{a4}/24", "dev", dev)
            _sh("ip", "-n", ns, "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        server = self._start("ip", "netns", "exec", self.s, sys.executable, "-c", SERVER)
        Lines(server).wait(lambda line: line == "ready")
        self.task = self._start("ip", "netns", "exec", self.t, "unshare", "--pid", "--fork",
                                "--kill-child", "/usr/bin/python3", "-c", INIT, str(SLEEPERS),
                                CLIENT, TOKEN)
        self.out = Lines(self.task)
        self.client = json.loads(self.out.wait(lambda line: line.startswith('{"pid"'), 30))
        self.init_pid = self._child_of(self.task.pid)
        self.client_pid = self._host_pid(self.client["pid"])
        return self

    def _start(self, *cmd: str) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        self.procs.append(proc)
        return proc

    @staticmethod
    def _child_of(pid: int) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = f.read().split()
            if kids:
                return int(kids[0])
            time.sleep(0.02)
        raise RuntimeError(f"{pid} started no child")

    def _host_pid(self, ns_pid: int) -> int:
        """The host pid of the task's process ``ns_pid``: independent of owners' walk."""
        pidns = os.stat(f"/proc/{self.init_pid}/ns/pid").st_ino
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                if os.stat(f"/proc/{name}/ns/pid").st_ino != pidns:
                    continue
                with open(f"/proc/{name}/status") as f:
                    nspid = [line for line in f if line.startswith("NSpid:")][0].split()
            except (OSError, IndexError):
                continue
            if int(nspid[-1]) == ns_pid:
                return int(name)
        raise RuntimeError(f"no process {ns_pid} in the task's PID namespace")

    def tuple_of(self, name: str) -> tuple[str, str, int, str, int]:
        """The flow as the host sees it (a dual-stack socket's flow is plain IPv4)."""
        (src, sport), (dst, dport) = self.client["socks"][name]
        return name[:3], src.removeprefix("::ffff:"), sport, dst.removeprefix("::ffff:"), dport

    def close(self) -> None:
        # The task's init first: SIGKILL to a PID namespace's init ends all of the task.
        for pid in (self.init_pid,):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


@pytest.fixture
def olab():
    problem = _problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    lab = OwnersLab()
    try:
        yield lab.build()
    finally:
        lab.close()
        assert not os.path.exists(lab.t_path)
        deadline = time.monotonic() + 5
        while lab.client_pid and os.path.exists(f"/proc/{lab.client_pid}") \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not (lab.client_pid and os.path.exists(f"/proc/{lab.client_pid}"))


def _socket_inodes(pid: int) -> set[int]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                out.add(int(link[8:-1]))
    return out


def test_find_socket_and_owner_in_the_tasks_namespace(olab):
    before = _netns_ids()
    held = _socket_inodes(olab.client_pid)
    owners.clear_cache()
    for name in ("tcp4", "tcp6", "udp4", "udp6", "tcp46", "udp46"):
        proto, src, sport, dst, dport = olab.tuple_of(name)
        found = owners.find_socket(olab.t_path, proto, src, sport, dst, dport)
        assert found is not None, name
        assert (found.proto, found.src, found.sport, found.dst, found.dport) == \
            (proto, src, sport, dst, dport)
        # the socket's own family: a dual-stack socket is IPv6 with v4-mapped addresses
        assert found.state == "ESTABLISHED" and found.family == int(name[-1])
        assert found.uid == 65534                      # the client runs as nobody
        assert found.inode in held                     # the client's own fd table says so
        owner = owners.owner_of(found.inode, olab.init_pid)
        assert owner is not None, name
        assert owner.pid == olab.client_pid and owner.ns_pid == olab.client["pid"]
        assert owner.uid == 65534 and owner.holders == (olab.client_pid,)
        assert owner.exe == os.readlink(f"/proc/{olab.client_pid}/exe")
        assert owner.cmdline[:2] == ["/usr/bin/python3", "-c"]
        assert owner.cmdline[-3:] == ["--password", "***", "--token=***"]
        assert "hunter2" not in " ".join(owner.cmdline) and TOKEN not in " ".join(owner.cmdline)
        assert abs(owner.start_time - time.time()) < 120
        print(f"\n{name}: {found}\n  owner pid={owner.pid} ns_pid={owner.ns_pid} "
              f"uid={owner.uid} exe={owner.exe} cmdline[-3:]={owner.cmdline[-3:]}")
    # The same flow from the root namespace's point of view: nothing there.
    proto, src, sport, dst, dport = olab.tuple_of("tcp4")
    assert owners.find_socket(None, proto, src, sport, dst, dport) is None
    # A tuple nobody has: None, not an error.
    assert owners.find_socket(olab.t_path, "tcp", src, sport + 1, dst, dport) is None
    assert owners.find_socket(olab.t_path, "udp", src, 9, dst, dport) is None
    assert _netns_ids() == before


def test_find_socket_on_a_missing_namespace_raises_and_leaves_us_alone():
    before = _netns_ids()
    with pytest.raises(FileNotFoundError):
        owners.find_socket("/run/netns/egress-no-such-ns", "tcp", "192.0.2.2", 1, "192.0.2.1", 2)
    with pytest.raises(OSError):       # not a network namespace file: setns says EINVAL
        owners.find_socket("/proc/self/ns/uts", "tcp", "192.0.2.2", 1, "192.0.2.1", 2)
    assert _netns_ids() == before


def test_destroy_sockets_aborts_the_clients_connections(olab):
    before = _netns_ids()
    for name in ("tcp4", "tcp6", "udp4", "udp6", "tcp46", "udp46"):
        flow = olab.tuple_of(name)
        assert owners.find_socket(olab.t_path, *flow) is not None
        assert owners.destroy_sockets(olab.t_path, *flow) == 1, name
        line = olab.out.wait(lambda line, n=name: f'"sock": "{n}"' in line)
        got = json.loads(line)
        print(f"\nclient, {name} after SOCK_DESTROY: {got['error']}")
        assert got["errno"] == 103                     # ECONNABORTED
        assert owners.find_socket(olab.t_path, *flow) is None
        assert owners.destroy_sockets(olab.t_path, *flow) == 0
    assert _netns_ids() == before


def test_destroy_of_an_explicitly_bound_udp_socket(olab):
    """udp_abort disconnects but keeps a socket bound by the program hashed: it is aborted
    once, then found again as an unconnected socket on its port (a limit to know)."""
    flow = olab.tuple_of("udp4bound")
    assert owners.destroy_sockets(olab.t_path, *flow) == 1
    got = json.loads(olab.out.wait(lambda line: '"sock": "udp4bound"' in line))
    assert got["errno"] == 103
    again = owners.find_socket(olab.t_path, *flow)
    print(f"\nbound UDP socket after SOCK_DESTROY: {again}")
    assert again is not None and again.state == "CLOSE"
    assert (again.dst, again.dport) == ("0.0.0.0", 0)


def test_timing_for_one_flow_with_50_processes(olab):
    tree = owners.descendants(olab.init_pid)
    assert len(tree) >= SLEEPERS + 2
    flow = olab.tuple_of("tcp4")
    runs = {"find_socket (one-shot, new thread + socket)": [], "SockDiag.find (kept socket)": [],
            "owner_of (uncached)": [], "owner_of (cached)": [],
            "owner_of (uncached, first holder only)": [], "descendants walk alone": [],
            "find_socket + owner_of (uncached)": []}
    with owners.SockDiag(olab.t_path) as diag:
        for _ in range(30):
            t0 = time.perf_counter()
            found = owners.find_socket(olab.t_path, *flow)
            t1 = time.perf_counter()
            owners.clear_cache()
            owner = owners.owner_of(found.inode, olab.init_pid)
            t2 = time.perf_counter()
            owners.owner_of(found.inode, olab.init_pid)
            t3 = time.perf_counter()
            diag.find(*flow)
            t4 = time.perf_counter()
            owners.clear_cache()
            owners.owner_of(found.inode, olab.init_pid, all_holders=False)
            t5 = time.perf_counter()
            owners.descendants(olab.init_pid)
            t6 = time.perf_counter()
            runs["owner_of (uncached, first holder only)"].append(t5 - t4)
            runs["descendants walk alone"].append(t6 - t5)
            assert owner is not None and owner.pid == olab.client_pid
            runs["find_socket (one-shot, new thread + socket)"].append(t1 - t0)
            runs["owner_of (uncached)"].append(t2 - t1)
            runs["owner_of (cached)"].append(t3 - t2)
            runs["SockDiag.find (kept socket)"].append(t4 - t3)
            runs["find_socket + owner_of (uncached)"].append(t2 - t0)
    print(f"\n{len(tree)} processes in the task; median and max of 30 runs:")
    for what, values in runs.items():
        print(f"  {what:45s} {statistics.median(values) * 1e3:7.3f} ms"
              f"  (max {max(values) * 1e3:.3f} ms)")
    assert statistics.median(runs["find_socket + owner_of (uncached)"]) < 0.5
