"""A task's network: its own namespace joined to the host by a veth pair, NAT to the uplink.

Made by the auditor as real root (the namespace belongs to the initial user
namespace, so a task that becomes root inside it owns nothing). Every change
to the host is recorded in a state file under ``/run/egress/runs`` before it
is made, so ``egress cleanup`` can undo what a killed auditor left, and so
concurrent runs pick distinct addresses (under a lock) and restore shared
settings (forwarding on the uplink) only when the last of them ends.

iproute2 (``ip``) does the link work: it is what our users read and type, and
a failing step names itself in its own words.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE = Path("/run/egress/runs")
LOCK = Path("/run/egress/lock")

DEFAULT_POOL4 = "10.213.0.0/16"
DEFAULT_POOL6 = "fd65:6772:6573::/48"
"""Where task subnets come from (config keys ``pool4``, ``pool6``): a /30 and a /64 each,
skipping any that overlaps a route of the host or another run."""

NAT_TABLE = "egress_nat"


class NetError(RuntimeError):
    pass


def sh(*cmd: str, input: str | None = None) -> str:
    """Run a host command; a failure raises NetError with its own message, on one line."""
    done = subprocess.run(list(cmd), capture_output=True, text=True, input=input)
    if done.returncode != 0:
        message = " ".join((done.stderr or done.stdout).split())
        raise NetError(f"{' '.join(cmd[:4])}: {message}")
    return done.stdout


def start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(raw[raw.rfind(b")") + 2:].split()[19])


def host_netns_id() -> int:
    return os.stat("/proc/self/ns/net").st_ino


@dataclass
class TaskNet:
    """What one run made, as stored in its state file."""

    task: str
    netns: str
    host_if: str
    uplink: str
    net4: str
    net6: str
    auditor_pid: int
    host_netns: int
    sysctls: dict[str, str] = field(default_factory=dict)
    """Host sysctls this run changed: path -> the value before."""
    task_pid: int | None = None
    """The sandbox's outer process (egress.enforce.taskinit), once started."""
    removal: str = ""
    """The nft transaction that removes the task's rules (for cleanup)."""
    nflog_group: int = 0
    """The run's NFLOG group (first packets); rejections go to the next one."""
    auditor_start: int = 0
    """The auditor's start time (/proc/PID/stat, clock ticks): with its pid, it names the
    process; a reused pid is another."""
    queue: int = 0
    """The run's NFQUEUE number (the gate)."""
    gate: dict = field(default_factory=dict)
    """The gate's queue rules as loaded (gaterules.remove's arguments), for cleanup."""

    @property
    def host4(self) -> str:
        return str(ipaddress.ip_network(self.net4)[1])

    @property
    def task4(self) -> str:
        return str(ipaddress.ip_network(self.net4)[2])

    @property
    def host6(self) -> str:
        return str(ipaddress.ip_network(self.net6)[1])

    @property
    def task6(self) -> str:
        return str(ipaddress.ip_network(self.net6)[2])

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    @property
    def resolv_conf(self) -> Path:
        """The task's resolv.conf, naming its resolver (bound over /etc/resolv.conf)."""
        return STATE / f"{self.netns}.resolv.conf"

    @property
    def state_file(self) -> Path:
        return STATE / f"{self.netns}.json"

    def save(self) -> None:
        STATE.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, path: Path) -> "TaskNet":
        return cls(**json.loads(path.read_text()))


def all_runs() -> list[TaskNet]:
    out = []
    for path in sorted(STATE.glob("*.json")) if STATE.exists() else []:
        with contextlib.suppress(ValueError, TypeError, OSError):
            out.append(TaskNet.load(path))
    return out


@contextlib.contextmanager
def locked():
    """One run at a time picks addresses and changes shared host settings."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def routes(version: int) -> list:
    out = []
    for line in sh("ip", f"-{version}", "route", "show", "table", "all").splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("broadcast", "local", "unreachable", "prohibit", "blackhole", "multicast",
                    "anycast", "unicast"):
            word = line.split()[1]
        if word == "default":
            continue
        with contextlib.suppress(ValueError):
            out.append(ipaddress.ip_network(word, strict=False))
    return out


def pick_subnet(pool: str, prefix: int, taken: list) -> str:
    """The first subnet of ``pool`` that overlaps no route and no other run's subnet."""
    network = ipaddress.ip_network(pool)
    for candidate in network.subnets(new_prefix=prefix):
        if not any(candidate.overlaps(t) for t in taken if t.version == candidate.version):
            return str(candidate)
    raise NetError(f"no free /{prefix} left in the pool {pool} (every one overlaps a route "
                   "or another run; set pool4/pool6 in the configuration)")


def default_uplink() -> str:
    for line in sh("ip", "-4", "route", "show", "default").splitlines():
        words = line.split()
        if "dev" in words:
            return words[words.index("dev") + 1]
    raise NetError("no default route: name the uplink (configuration key uplink)")


def host_addresses() -> list[str]:
    """Every address on the host's interfaces: a DNS answer naming one is refused."""
    out = []
    for entry in json.loads(sh("ip", "-j", "addr", "show") or "[]"):
        out += [a["local"] for a in entry.get("addr_info", []) if "local" in a]
    return out


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def _set_sysctl(net: TaskNet, name: str, value: str, others: list[TaskNet]) -> None:
    """Set a host sysctl, recording first the value to restore: the one before any run
    changed it (another live run may already have)."""
    path = _sysctl_path(name)
    if name not in net.sysctls:
        before = [r.sysctls[name] for r in others if name in r.sysctls]
        net.sysctls[name] = before[0] if before else path.read_text().strip()
        net.save()
    path.write_text(value)


def _in_task(net: TaskNet, *cmd: str) -> str:
    return sh("nsenter", f"--net={net.netns_path}", *cmd)


def _uplink_sysctls(uplink: str) -> list[tuple[str, str]]:
    """Forwarding for replies on the uplink (IPv4 decides per ingress interface); IPv6 per
    interface with force_forwarding where the kernel has it, else globally after
    accept_ra=2 so the uplink keeps its router advertisements."""
    out = [(f"net.ipv4.conf.{uplink}.forwarding", "1")]
    if _sysctl_path(f"net.ipv6.conf.{uplink}.force_forwarding").exists():
        out.append((f"net.ipv6.conf.{uplink}.force_forwarding", "1"))
    else:
        out += [(f"net.ipv6.conf.{uplink}.accept_ra", "2"), ("net.ipv6.conf.all.forwarding", "1")]
    return out


RUNS = 1024
"""Runs at once on a host: each takes a pair of NFLOG groups and a queue from the
configured bases; the host agent's numbers come after all of theirs (``agent_numbers``)."""


def agent_numbers(nflog_base: int, queue_base: int) -> tuple[int, int]:
    """(NFLOG group, first queue) of the host agent, beyond any run's, so the agent and
    runs share a host without sharing a group or a queue."""
    return nflog_base + 2 * RUNS, queue_base + RUNS


def create(task: str, pool4: str = DEFAULT_POOL4, pool6: str = DEFAULT_POOL6,
           uplink: str | None = None, nflog_base: int = 7, queue_base: int = 3) -> TaskNet:
    """The task's namespace, veth, addresses, routes, forwarding and NAT; and a pair of
    NFLOG groups from ``nflog_base`` on that no other run here reads."""
    tag = secrets.token_hex(3)
    with locked():
        me = host_netns_id()
        others = [r for r in all_runs() if r.host_netns == me]
        taken = routes(4) + routes(6) + [ipaddress.ip_network(n) for r in others
                                        for n in (r.net4, r.net6)]
        net = TaskNet(task=task, netns=f"egress-{tag}", host_if=f"egt{tag}",
                      uplink=uplink or default_uplink(), net4=pick_subnet(pool4, 30, taken),
                      net6=pick_subnet(pool6, 64, taken), auditor_pid=os.getpid(),
                      host_netns=me, auditor_start=start_ticks(os.getpid()) or 0)
        used = {r.nflog_group for r in others}
        net.nflog_group = next(g for g in range(nflog_base, nflog_base + 2 * RUNS, 2)
                               if g not in used)
        queues = {r.queue for r in others}
        net.queue = next(q for q in range(queue_base, queue_base + RUNS) if q not in queues)
        net.save()
        try:
            _build(net, others)
        except BaseException:
            _remove_unlocked(net)
            raise
    return net


def _build(net: TaskNet, others: list[TaskNet]) -> None:
    sh("ip", "netns", "add", net.netns)
    sh("ip", "link", "add", net.host_if, "type", "veth", "peer", "name", "eth0",
       "netns", net.netns)
    sh("ip", "addr", "add", f"{net.host4}/30", "dev", net.host_if)
    sh("ip", "addr", "add", f"{net.host6}/64", "dev", net.host_if, "nodad")
    sh("ip", "link", "set", net.host_if, "up")
    _in_task(net, "ip", "link", "set", "lo", "up")
    _in_task(net, "ip", "addr", "add", f"{net.task4}/30", "dev", "eth0")
    _in_task(net, "ip", "addr", "add", f"{net.task6}/64", "dev", "eth0", "nodad")
    _in_task(net, "ip", "link", "set", "eth0", "up")
    _in_task(net, "ip", "route", "add", "default", "via", net.host4)
    _in_task(net, "ip", "-6", "route", "add", "default", "via", net.host6)
    # A SYN may carry data with Fast Open: off, so every first payload is a data packet.
    _in_task(net, "sysctl", "-qw", "net.ipv4.tcp_fastopen=0")
    sh("nft", "-f", "-", input=nat_rules(net, add=True))    # loads conntrack, for the next
    # Counters per flow, which the recorder's "first packets" rule needs, and start times.
    wanted = [("net.netfilter.nf_conntrack_acct", "1"),
              ("net.netfilter.nf_conntrack_timestamp", "1"),
              (f"net.ipv4.conf.{net.host_if}.forwarding", "1")]
    if _sysctl_path(f"net.ipv6.conf.{net.host_if}.force_forwarding").exists():
        wanted.append((f"net.ipv6.conf.{net.host_if}.force_forwarding", "1"))
    for name, value in wanted + _uplink_sysctls(net.uplink):
        _set_sysctl(net, name, value, others)


def nat_rules(net: TaskNet, add: bool) -> str:
    """NAT only for task subnets, out of the uplink (NAT66 too): one element per task."""
    head = f"""table inet {NAT_TABLE} {{
  set tasks4 {{ type ipv4_addr; flags interval; }}
  set tasks6 {{ type ipv6_addr; flags interval; }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
  }}
}}
"""
    verb = "add" if add else "delete"
    body = (f"{verb} element inet {NAT_TABLE} tasks4 {{ {net.net4} }}\n"
            f"{verb} element inet {NAT_TABLE} tasks6 {{ {net.net6} }}\n")
    if add:
        rules = sh("nft", "list", "chain", "inet", NAT_TABLE, "postrouting") \
            if _nat_exists() else ""
        for family, set_name in (("ip", "tasks4"), ("ip6", "tasks6")):
            rule = f'{family} saddr @{set_name} oifname "{net.uplink}" masquerade'
            if rule not in rules:
                body += f"add rule inet {NAT_TABLE} postrouting {rule}\n"
        return head + body
    return body


def _nat_exists() -> bool:
    return subprocess.run(["nft", "list", "table", "inet", NAT_TABLE],
                          capture_output=True).returncode == 0


def _remove_unlocked(net: TaskNet) -> list[str]:
    """Undo everything the state file records; the problems met, each on one line."""
    problems = []

    def attempt(step, *args, **kw):
        try:
            step(*args, **kw)
        except (NetError, OSError) as e:
            problems.append(str(e))

    # The link first: a namespace that still holds a process outlives `ip netns del`, and
    # its veth with it, with no rules left in front of the host.
    if Path(f"/sys/class/net/{net.host_if}").exists():
        attempt(sh, "ip", "link", "del", net.host_if)
    if Path(net.netns_path).exists():
        attempt(sh, "ip", "netns", "del", net.netns)
    if _nat_exists():
        for line in nat_rules(net, add=False).splitlines():
            with contextlib.suppress(NetError):              # absent: never added
                sh("nft", line)
    still = [r for r in all_runs() if r.netns != net.netns and r.host_netns == net.host_netns]
    shared = {name for r in still for name in r.sysctls}
    for name, before in net.sysctls.items():
        if name in shared or not _sysctl_path(name).exists():
            continue                        # another run needs it; or the veth is gone
        attempt(_sysctl_path(name).write_text, before)
    if not still and _nat_exists():
        attempt(sh, "nft", "delete", "table", "inet", NAT_TABLE)     # the last run here
    for made in (net.resolv_conf, net.state_file):
        with contextlib.suppress(FileNotFoundError):
            made.unlink()
    return problems


def remove(net: TaskNet) -> list[str]:
    with locked():
        return _remove_unlocked(net)
