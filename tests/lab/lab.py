"""The lab: a closed network of namespaces with real servers and real clients.

Two network namespaces this run creates and names uniquely: the task host
and a fake internet, joined by one veth pair made inside them (never in the
root namespace, which gets no link, no route, no forwarding). The fake
internet's servers listen on documentation addresses that live on its own
loopback; the task host reaches them through its default route to the
veth, inside its own namespace. A recorder (tcpdump) captures what crosses
the task host's interface.

Every process is started here and stopped here, by its PID; the namespaces,
the /etc/netns resolv.conf and anything else made are removed on exit, also
when a test fails.

    with Lab(tmp_path) as lab:
        lab.start_dns({"pypi.lab": "203.0.113.10"})
        lab.start_https("pypi.lab", "203.0.113.10")
        with lab.recording() as capture:
            lab.host("curl", "-s", "--cacert", lab.ca, "https://pypi.lab/")
        # capture: a pcap of it
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

LINK_HOST, LINK_NET = "10.99.0.2", "10.99.0.1"
"""The veth's two ends: the task host, and the fake internet (its router and resolver)."""
LINK_HOST6, LINK_NET6 = "fd99::2", "fd99::1"
"""The same, over IPv6."""

TOOLS = {"ip": "iproute2", "tcpdump": "tcpdump", "sshd": "openssh-server",
         "ssh": "openssh-client", "nginx": "nginx-light", "dnsmasq": "dnsmasq-base",
         "curl": "curl", "openssl": "openssl", "autossh": "autossh", "ping": "iputils-ping",
         "ptunnel-ng": "ptunnel-ng", "iodine": "iodine", "iodined": "iodine",
         "socat": "socat"}
"""Commands the lab uses, with the Debian package that brings each (tests/system-deps.sh)."""


SHARED_ROOT = "/var/lib"
"""Where files for a task's user go (`Lab.shared_dir`): /tmp is private to each task."""


class LabError(RuntimeError):
    pass


def missing_tools() -> list[str]:
    return [pkg for tool, pkg in TOOLS.items()
            if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]


class Lab:
    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.id = f"{os.getpid() % 10000:04d}{secrets.token_hex(2)}"
        self.host_ns, self.net_ns = f"eg{self.id}h", f"eg{self.id}n"
        self.host_if, self.net_if = f"eg{self.id}a", f"eg{self.id}b"
        self.procs: list[subprocess.Popen] = []
        self._made: list = []               # cleanup steps, run in reverse
        self.ca: Path | None = None

    # ---------------------------------------------------------------- set-up

    def __enter__(self) -> "Lab":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _sh(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        result = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, **kw)
        if check and result.returncode != 0:
            raise LabError(f"{' '.join(map(str, cmd))}: {result.stderr.strip()}")
        return result

    def _build(self) -> None:
        for ns in (self.host_ns, self.net_ns):
            self._sh("ip", "netns", "add", ns)
            self._made.append(("netns", ns))
        # The veth is made inside the host namespace with its peer in the net one.
        self._sh("ip", "-n", self.host_ns, "link", "add", self.host_if, "type", "veth",
                 "peer", "name", self.net_if, "netns", self.net_ns)
        for ns, dev, addr, addr6 in ((self.host_ns, self.host_if, LINK_HOST, LINK_HOST6),
                                     (self.net_ns, self.net_if, LINK_NET, LINK_NET6)):
            self._sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            self._sh("ip", "-n", ns, "addr", "add", f"{addr6}/64", "dev", dev, "nodad")
            self._sh("ip", "-n", ns, "link", "set", dev, "up")
            self._sh("ip", "-n", ns, "link", "set", "lo", "up")
        self._sh("ip", "-n", self.host_ns, "route", "add", "default", "via", LINK_NET)
        self._sh("ip", "-n", self.host_ns, "-6", "route", "add", "default", "via", LINK_NET6)
        if not Path("/etc/netns").exists():
            Path("/etc/netns").mkdir()
            self._made.append(("empty-dir", Path("/etc/netns")))
        netns_etc = Path("/etc/netns") / self.host_ns
        netns_etc.mkdir(exist_ok=False)
        self._made.append(("dir", netns_etc))
        # ip netns exec bind-mounts this over /etc/resolv.conf for the host's commands.
        (netns_etc / "resolv.conf").write_text(f"nameserver {LINK_NET}\n")

    def shared_dir(self) -> Path:
        """A folder the task's user can read: outside /tmp, which `egress run` makes private
        to each task (root-owned, 0755, removed when the lab closes)."""
        path = Path(tempfile.mkdtemp(prefix=f"egress-lab-{self.id}-", dir=SHARED_ROOT))
        os.chmod(path, 0o755)
        self._made.append(("dir", path))
        return path

    def cleanup_later_cgroup(self, path: Path) -> None:
        """Remove a cgroup made for a test when the lab closes (its processes gone first)."""
        self._made.append(("cgroup", Path(path)))

    def cleanup_later(self, path: Path) -> None:
        """Remove a file made outside the lab's folder when the lab closes."""
        self._made.append(("file", Path(path)))

    def add_server_address(self, address: str) -> None:
        """An address of the fake internet (on its loopback, so only the lab reaches it)."""
        bits = 128 if ":" in address else 32
        self._sh("ip", "-n", self.net_ns, "addr", "add", f"{address}/{bits}", "dev", "lo")

    # ---------------------------------------------------------------- running

    def _exec(self, ns: str, cmd) -> list[str]:
        return ["ip", "netns", "exec", ns, *map(str, cmd)]

    def host(self, *cmd, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command on the task host and wait for it."""
        return self._sh(*self._exec(self.host_ns, cmd), check=check, timeout=timeout)

    def net(self, *cmd, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command in the fake internet (a relay's own side) and wait for it."""
        return self._sh(*self._exec(self.net_ns, cmd), check=check, timeout=timeout)

    def spawn(self, where: str, *cmd, log: str | None = None) -> subprocess.Popen:
        """Start a long-running command on the task host ("host") or the internet ("net")."""
        ns = self.host_ns if where == "host" else self.net_ns
        out = open(self.dir / (log or f"{Path(str(cmd[0])).name}-{len(self.procs)}.log"), "wb")
        proc = subprocess.Popen(self._exec(ns, cmd), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        """Stop a process this lab started (its whole session: ip netns exec and the tool)."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)

    def wait_log(self, log: str, text: str, timeout: float = 20) -> None:
        """Wait until a started process's log says ``text``."""
        path = self.dir / log
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and text in path.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise LabError(f"{log} never said {text!r}: "
                       + (path.read_text(errors="replace")[-500:] if path.exists() else ""))

    def wait_port(self, address: str, port: int, timeout: float = 10) -> None:
        """Wait until something listens on address:port in the fake internet."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self._sh(*self._exec(self.net_ns, ["ss", "-Hltnu"]), check=False).stdout
            where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
            if f"{where} " in out or f"{where}\t" in out:
                return
            time.sleep(0.05)
        raise LabError(f"nothing listens on {address}:{port} in the lab after {timeout}s")

    # ---------------------------------------------------------------- servers

    def start_dns(self, names: dict[str, str]) -> None:
        """dnsmasq on the internet side, authoritative for the lab's names, forwarding none."""
        args = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                "--conf-file=/dev/null", f"--listen-address={LINK_NET}", "--bind-interfaces",
                f"--pid-file={self.dir / 'dnsmasq.pid'}", "--log-facility=-", "--log-queries",
                "--user=nobody", "--group=nogroup"]
        args += [f"--host-record={name},{address}" for name, address in names.items()]
        self.spawn("net", *args, log="dnsmasq.log")
        self.wait_port(LINK_NET, 53)

    def _ca(self, name: str) -> tuple[Path, Path]:
        key, cert = self.dir / f"{name}.key", self.dir / f"{name}.crt"
        self._sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", f"/CN={name}",
                 "-addext", f"subjectAltName=DNS:{name}", "-keyout", key, "-out", cert)
        return key, cert

    def start_https(self, name: str, address: str, body: str = "lab index\n",
                    root: Path | None = None) -> Path:
        """nginx serving ``name`` over TLS on address:443 (``root``'s files, or ``body``);
        returns the certificate (the CA)."""
        self.add_server_address(address)
        key, cert = self._ca(name)
        serve = f"root {root};" if root else f'return 200 "{body.strip()}\\n";'
        conf = self.dir / f"nginx-{name}.conf"
        # Workers as root: the test's temporary folders are private to root.
        conf.write_text(f"""
daemon off;
user root;
pid {self.dir}/nginx-{name}.pid;
error_log {self.dir}/nginx-{name}-error.log;
events {{}}
http {{
  access_log off;
  client_body_temp_path {self.dir}/nginx-body;
  proxy_temp_path {self.dir}/nginx-proxy;
  fastcgi_temp_path {self.dir}/nginx-fastcgi;
  uwsgi_temp_path {self.dir}/nginx-uwsgi;
  scgi_temp_path {self.dir}/nginx-scgi;
  server {{
    listen {f"[{address}]" if ":" in address else address}:443 ssl;
    server_name {name};
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location / {{ {serve} }}
  }}
}}
""")
        self.spawn("net", "nginx", "-c", conf, "-p", self.dir, log=f"nginx-{name}.log")
        self.wait_port(address, 443)
        self.ca = cert
        return cert

    def start_sshd(self, address: str, port: int = 22) -> Path:
        """OpenSSH's sshd on address:port, root allowed by a key; returns the client's key."""
        self.add_server_address(address)
        hostkey, userkey = self.dir / f"sshd-{port}-hostkey", self.dir / "client-key"
        for key in (hostkey, userkey):
            if not key.exists():
                self._sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
        (self.dir / "authorized_keys").write_text((self.dir / "client-key.pub").read_text())
        conf = self.dir / f"sshd-{port}.conf"
        conf.write_text(f"""ListenAddress {address}:{port}
HostKey {hostkey}
PidFile {self.dir}/sshd-{port}.pid
AuthorizedKeysFile {self.dir}/authorized_keys
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
AllowTcpForwarding yes
ClientAliveInterval 5
""")
        privsep = Path("/run/sshd")             # sshd refuses to start without it
        if not privsep.exists():
            privsep.mkdir(mode=0o755)
            self._made.append(("dir", privsep))
        self.spawn("net", "/usr/sbin/sshd", "-D", "-e", "-f", conf, log=f"sshd-{port}.log")
        self.wait_port(address, port)
        return userkey

    def start_tls_relay(self, name: str, address: str, to: str) -> None:
        """socat on address:443 unwrapping TLS (a certificate for ``name``) into TCP ``to``
        (host:port): how SSH or anything else is hidden inside TLS on 443."""
        self.add_server_address(address)
        key, cert = self._ca(name)
        self.spawn("net", "socat", f"OPENSSL-LISTEN:443,bind={address},reuseaddr,fork,"
                   f"cert={cert},key={key},verify=0", f"TCP:{to}", log=f"socat-{name}.log")
        self.wait_port(address, 443)

    def start_listener(self, address: str, port: int) -> Path:
        """A TCP server that writes every byte it receives to a file (returned): what
        reached the server, and so what left the task host."""
        import sys
        self.add_server_address(address)
        got = self.dir / f"received-{address}-{port}.bin"
        got.write_bytes(b"")
        code = ("import socket, sys, threading\n"
                "s = socket.create_server((sys.argv[1], int(sys.argv[2])))\n"
                "out = open(sys.argv[3], 'ab', buffering=0)\n"
                "def serve(c):\n"
                "    while (data := c.recv(65536)):\n"
                "        out.write(data)\n"
                "    c.close()\n"
                "while True:\n"
                "    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()\n")
        self.spawn("net", sys.executable, "-c", code, address, str(port), got,
                   log=f"listener-{port}.log")
        self.wait_port(address, port)
        return got

    # ---------------------------------------------------------------- tunnels

    def serve_host_http(self, port: int = 8080) -> None:
        """A web server on the task host's loopback: what a reverse tunnel exposes."""
        import sys
        self.spawn("host", sys.executable, "-m", "http.server", str(port), "--bind",
                   "127.0.0.1", log=f"http-{port}.log")

    def use_forward(self, port: int = 9000, times: int = 8, pause: float = 0.4) -> None:
        """Someone at the relay uses a remote-forwarded port ``times`` times."""
        self.wait_port("127.0.0.1", port)
        for _ in range(times):
            got = self.net("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                           f"http://127.0.0.1:{port}/")
            if got.stdout != "200":
                raise LabError(f"the forwarded port {port} answered {got.stdout!r}")
            time.sleep(pause)

    # -------------------------------------------------------------- recording

    @contextlib.contextmanager
    def recording(self, name: str = "lab.pcap"):
        """Capture what crosses the task host's interface while the block runs."""
        path = self.dir / name
        # --immediate-mode: each packet to the file at once, so stopping loses none
        proc = self.spawn("host", "tcpdump", "-i", self.host_if, "--immediate-mode", "-U",
                          "-s", "0", "-Z", "root",
                          "-w", path, log="tcpdump.log")
        deadline = time.monotonic() + 10
        while "listening on" not in (self.dir / "tcpdump.log").read_text(errors="replace"):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise LabError("tcpdump did not start: "
                               + (self.dir / "tcpdump.log").read_text(errors="replace"))
            time.sleep(0.05)
        try:
            yield path
        finally:
            time.sleep(0.3)                     # let the last packets reach the file
            self.stop(proc, signal.SIGINT)

    # ---------------------------------------------------------------- teardown

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()
        for kind, what in reversed(self._made):
            if kind == "netns":
                self._sh("ip", "netns", "del", what, check=False)
            elif kind == "dir":
                shutil.rmtree(what, ignore_errors=True)
            elif kind == "cgroup":
                with contextlib.suppress(OSError):
                    for pid in (what / "cgroup.procs").read_text().split():
                        os.kill(int(pid), signal.SIGKILL)
                    time.sleep(0.1)
                    what.rmdir()
            elif kind == "file":
                with contextlib.suppress(FileNotFoundError):
                    what.unlink()
            elif kind == "empty-dir":
                with contextlib.suppress(OSError):
                    what.rmdir()             # only if no other lab still uses it
        self._made.clear()
