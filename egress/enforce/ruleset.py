"""The one rule generator: a task's declared purpose as nftables (and iptables) rules.

Every live task gets chains and sets of its own in the table ``inet egress``,
reached from three shared base chains through verdict maps, so adding or
removing a task touches nothing else:

    forward_filter (hook forward)  iifname vmap @dispatch_forward      interface tasks
    input_filter   (hook input)    iifname vmap @dispatch_input        interface tasks
    output_filter  (hook output)   meta skuid vmap @dispatch_uid       uid tasks
                                   socket cgroupv2 level L vmap @dispatch_cgroup_lL

A task's objects are named from ``names(task)`` (``t_fix_1234_d6a723b4``):
chains ``<p>_egress`` (forward or output) and ``<p>_input`` (interface tasks);
sets ``<p>_live`` (dead-man's switch), ``<p>_h4``/``<p>_h6`` (address . proto
. port, timeouts), ``<p>_r4_N``/``<p>_r6_N`` (addresses for the Nth port range),
``<p>_i4``/``<p>_i6`` (ICMP), ``<p>_c4_N``/``<p>_c6_N`` (CIDR rules, static).

A task's egress chain, in order (a task's traffic never skips a step):

    0. dead-man's switch: the task's key must be in its ``live`` set, whose
       element times out unless the auditor re-arms it; else drop everything
    -  interface tasks: only the task's own source addresses (anti-spoofing)
    1. conntrack mark & mask == block value: reject (TCP reset)
    2. established, related: accept
    3. DNS (udp and tcp 53) only to the task's resolver; all other DNS rejected
       (in audit mode too: live, names bind only through our resolver)
    4. new flows to allowed (address, transport, port): accept
    5. the rest: NFLOG, then reject (enforce) or accept (audit)

Interface tasks also get an input chain: from the task's veth only DNS to the
resolver and neighbour discovery reach the host (after the same switch and
anti-spoofing); the rest is logged and dropped.

Why the allow sets hold no intervals: nft accepts ``flags interval, timeout``
on a concatenation here (checked on 6.18), but such a set refuses an element
that overlaps another partially or lies inside one ("File exists"), failing
the whole batch. Two names at one CDN address, or one name earning 443 and
"1-1024" from two rules, would then fail the resolver's update. So names'
single ports go to a hash set of ``address . proto . port``; each distinct
port range of the purpose's host rules gets its own address set, matched by
a rule with that range; ICMP gets an address set. None can overlap.
CIDR rules are static: one interval set of collapsed networks per
(family, transport, ports), matched by one rule with the merged ports.

Refreshes and the dead-man's switch use add, delete, add in one batch
(KERNEL.md: before Linux 6.12 a plain add does not refresh a timeout, and
deleting an absent element fails the batch; nft 1.0.6 has no ``destroy``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable

from tagging.manifest import Purpose
from tagging.rules import AllowRule, host_matches, normalize_name

TABLE = "inet egress"
PRIORITY = -180
"""Base chains run after conntrack (-200) and before mangle (-150), where the
iptables-nft gate sits: our L3/L4 verdict first, then the gate (KERNEL.md)."""
NFLOG_GROUP = 0x6567
MARK_MASK = 0x00F00000
BLOCK_MARK = 0x00100000
DEADMAN_SECONDS = 5
MAX_CGROUP_LEVEL = 8
"""One dispatch map per cgroup depth; deeper task cgroups are refused."""
CGROUP_ROOT = "/sys/fs/cgroup"
"""Where nft resolves ``socket cgroupv2`` paths (in the caller's mount namespace)."""
ICMP = ("icmp", 0, 0)
"""What an ICMP rule earns: ports do not apply."""

_IFNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
_CGROUP_PART = re.compile(r"^[A-Za-z0-9_.@:+-]+$")
_TASK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


# --------------------------------------------------------------------- match

@dataclass(frozen=True)
class Match:
    """Which traffic is the task's: from an interface (forwarded), or a uid's or a
    cgroup's sockets (local). A cgroup is kept as its cgroup2 path (``egress/t1``)."""

    kind: str
    value: str | int

    def __post_init__(self):
        if self.kind not in ("interface", "cgroup", "uid"):
            raise ValueError(f"{self.kind!r} is not interface, cgroup or uid")

    @classmethod
    def parse(cls, text: str) -> "Match":
        """``interface:NAME``, ``uid:UID`` or ``cgroup:PATH``; ValueError in one line.

        A cgroup PATH is a cgroup2 path as /proc/PID/cgroup shows it
        (``/egress/t1``), or the directory itself (``/sys/fs/cgroup/unified/egress/t1``).
        """
        kind, sep, value = (text or "").partition(":")
        if not sep or not value:
            raise ValueError(f"{text!r}: expected interface:NAME, uid:UID or cgroup:PATH")
        if kind == "interface":
            if not _IFNAME.match(value):
                raise ValueError(f"{text!r}: {value!r} is not an interface name "
                                 "(1-15 letters, digits, '_', '.', '-')")
            return cls("interface", value)
        if kind == "uid":
            if not value.isdigit() or int(value) > 0xFFFFFFFE:
                raise ValueError(f"{text!r}: {value!r} is not a numeric uid")
            if int(value) == 0:
                raise ValueError(f"{text!r}: uid 0 would match root, the auditor itself; "
                                 "run the task as a dedicated uid")
            return cls("uid", int(value))
        if kind == "cgroup":
            return cls("cgroup", _cgroup_path(text, value))
        raise ValueError(f"{text!r}: {kind!r} is not interface, uid or cgroup")

    @property
    def local(self) -> bool:
        """uid and cgroup traffic is the host's own (hook output); interface is forwarded."""
        return self.kind != "interface"

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


def _cgroup_path(text: str, value: str) -> str:
    mount = cgroup2_mount()
    path = value
    if mount and (path == mount or path.startswith(mount.rstrip("/") + "/")):
        path = path[len(mount.rstrip("/")):]
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise ValueError(f"{text!r}: the cgroup2 root would match every process")
    for part in parts:
        if part in (".", "..") or not _CGROUP_PART.match(part):
            raise ValueError(f"{text!r}: {part!r} is not a plain cgroup name")
    if len(parts) > MAX_CGROUP_LEVEL:
        raise ValueError(f"{text!r}: deeper than {MAX_CGROUP_LEVEL} levels")
    return "/".join(parts)


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where cgroup2 is mounted here (``/sys/fs/cgroup/unified`` on hybrid hosts)."""
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split()[4]
    except OSError:
        pass
    return None


def nft_cgroup_path(path: str, mount: str | None = None) -> str:
    """A cgroup2 path as nft's ``socket cgroupv2`` wants it: relative to /sys/fs/cgroup
    (``unified/egress/t1`` on hybrid hosts, ``egress/t1`` on pure cgroup2 ones)."""
    mount = mount if mount is not None else cgroup2_mount()
    if not mount:
        raise ValueError("no cgroup2 mount here: cgroup matches need cgroup2")
    rel = os.path.relpath(mount, CGROUP_ROOT)
    if rel.startswith(".."):
        raise ValueError(f"cgroup2 is mounted at {mount}, outside {CGROUP_ROOT} where nft "
                         "resolves cgroup paths")
    return path if rel == "." else f"{rel}/{path}"


# --------------------------------------------------------------------- rules

@dataclass
class TaskRules:
    """Everything the generator needs to know about one live task."""

    task: str
    purpose: Purpose
    match: Match
    mode: str = "enforce"
    resolver4: str | None = None
    """The task resolver's IPv4 address: the only DNS server the task may use."""
    resolver6: str | None = None
    task_addr4: str | None = None
    """The task's own address, for anti-spoofing (interface matches); None: not checked."""
    task_addr6: str | None = None
    nflog_group: int = NFLOG_GROUP
    mark_mask: int = MARK_MASK
    block_mark: int = BLOCK_MARK
    deadman_seconds: int = DEADMAN_SECONDS
    """Seconds the task stays live without a re-arm; 0: no dead-man's switch."""
    dns_redirected: bool = False
    """The host agent redirects the task's IPv4 DNS (port 53, any server) to the task's
    resolver by nat, which runs after these chains: such DNS is let through here."""
    deny_mark: int | None = None
    """With an inline gate (egress run): enforce mode marks a refused TCP or UDP first
    packet with this value and lets the gate refuse it, after it has found the socket's
    process (the socket is gone once the task sees the reset). None: refused here."""
    priority: int = PRIORITY
    """Of the shared base chains: the same for every task of a host."""
    cgroup_mount: str | None = field(default=None, repr=False)
    """cgroup2's mount point; None: read from /proc/self/mountinfo when needed."""

    def __post_init__(self):
        self.mode = str(getattr(self.mode, "value", self.mode))
        if self.mode not in ("audit", "enforce"):
            raise ValueError(f"mode {self.mode!r} is not audit or enforce")
        if not isinstance(self.task, str) or not _TASK.match(self.task):
            raise ValueError(f"{self.task!r} is not a task id")
        for name, version in (("resolver4", 4), ("task_addr4", 4),
                              ("resolver6", 6), ("task_addr6", 6)):
            value = getattr(self, name)
            if value is not None:
                try:
                    address = ipaddress.ip_address(value)
                except ValueError:
                    raise ValueError(f"{name}: {value!r} is not an address") from None
                if address.version != version:
                    raise ValueError(f"{name}: {value} is not an IPv{version} address")
                setattr(self, name, str(address))
        if not 0 <= self.nflog_group <= 0xFFFF:
            raise ValueError(f"nflog group {self.nflog_group} is not 0-65535")
        if not self.mark_mask or self.block_mark & ~self.mark_mask or not self.block_mark:
            raise ValueError(f"block mark {self.block_mark:#x} must be a non-zero value "
                             f"inside the mark mask {self.mark_mask:#x}")
        if self.deadman_seconds < 0:
            raise ValueError("deadman_seconds must be 0 (off) or more")
        if self.deny_mark is not None and (self.deny_mark & ~self.mark_mask or not self.deny_mark
                                           or self.deny_mark == self.block_mark):
            raise ValueError(f"deny mark {self.deny_mark:#x} must be a non-zero value inside "
                             f"the mark mask {self.mark_mask:#x}, not the block mark")


def names(task: str) -> str:
    """The prefix of a task's chains and sets: a plain nft identifier, unique per task id.

    ``fix-1234`` -> ``t_fix_1234_d6a723b4`` (sanitised, cut short, and a hash of the id).
    """
    clean = re.sub(r"[^A-Za-z0-9]+", "_", task)[:24].strip("_")
    digest = hashlib.sha256(task.encode()).hexdigest()[:8]
    return f"t_{clean}_{digest}" if clean else f"t_{digest}"


# ----------------------------------------------------------- what names earn

def elements_for_name(purpose: Purpose, name: str) -> list[tuple[str, int, int]]:
    """The (transport, port_lo, port_hi) a resolved name earns from the host rules.

    ICMP is ``("icmp", 0, 0)``: ports do not apply.
    """
    try:
        name = normalize_name(name)
    except ValueError:
        return []
    out: set[tuple[str, int, int]] = set()
    for rule in purpose.rules:
        if rule.host is None or not host_matches(rule.host, name):
            continue
        for transport in rule.transports:
            if transport == "icmp" or rule.ports is None:
                out.add(ICMP)
            else:
                out.update((transport, lo, hi) for lo, hi in rule.ports)
    return sorted(out)


def _host_ranges(purpose: Purpose) -> list[tuple[str, int, int]]:
    """Every distinct port range (lo < hi) of the host rules: one address set each."""
    ranges = {(t, lo, hi) for rule in purpose.rules if rule.host is not None
              for t in rule.transports if t != "icmp" and rule.ports is not None
              for lo, hi in rule.ports if lo < hi}
    return sorted(ranges)


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Port ranges as disjoint sorted ranges (nft refuses overlapping interval elements)."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def _ports_text(ranges) -> str:
    items = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in _merge(ranges)]
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


@dataclass(frozen=True)
class _CidrGroup:
    family: int
    transport: str
    ports: tuple[tuple[int, int], ...]        # merged; () for icmp
    networks: tuple[str, ...]                 # collapsed


def _cidr_groups(purpose: Purpose) -> list[_CidrGroup]:
    """CIDR rules grouped by (family, transport, ports), their networks collapsed."""
    groups: dict[tuple, list] = {}
    for rule in purpose.rules:
        if rule.cidr is None:
            continue
        net = ipaddress.ip_network(rule.cidr)
        for transport in rule.transports:
            ports = () if transport == "icmp" or rule.ports is None else \
                tuple(_merge(rule.ports))
            groups.setdefault((net.version, transport, ports), []).append(net)
    return [_CidrGroup(v, t, p, tuple(str(n) for n in ipaddress.collapse_addresses(nets)))
            for (v, t, p), nets in sorted(groups.items())]


# ----------------------------------------------------------------------- nft

def _key(r: TaskRules) -> tuple[str, str, str]:
    """(the packet expression, the task's value, the set type) of the task's match."""
    m = r.match
    if m.kind == "interface":
        return "iifname", f'"{m.value}"', "type ifname"
    if m.kind == "uid":
        return "meta skuid", str(m.value), "type uid"
    level = str(m.value).count("/") + 1
    expr = f"socket cgroupv2 level {level}"
    return expr, f'"{nft_cgroup_path(str(m.value), r.cgroup_mount)}"', f"typeof {expr}"


def _dispatch_maps(r: TaskRules) -> list[str]:
    """The maps a task's key goes into: (forward, input) or (output)."""
    m = r.match
    if m.kind == "interface":
        return ["dispatch_forward", "dispatch_input"]
    if m.kind == "uid":
        return ["dispatch_uid"]
    return [f"dispatch_cgroup_l{str(m.value).count('/') + 1}"]


def _base(r: TaskRules) -> list[str]:
    """The table, base chains and dispatch maps; rewritten whole each time, so idempotent."""
    t, prio = TABLE, r.priority
    lines = [f"add table {t}"]
    for chain, hook in (("forward_filter", "forward"), ("input_filter", "input"),
                        ("output_filter", "output")):
        lines.append(f"add chain {t} {chain} {{ type filter hook {hook} priority {prio}; "
                     "policy accept; }")
    lines += [f"add map {t} dispatch_forward {{ type ifname : verdict; }}",
              f"add map {t} dispatch_input {{ type ifname : verdict; }}",
              f"add map {t} dispatch_uid {{ type uid : verdict; }}"]
    lines += [f"add map {t} dispatch_cgroup_l{n} {{ typeof socket cgroupv2 level {n} : "
              "verdict; }" for n in range(1, MAX_CGROUP_LEVEL + 1)]
    lines += [f"flush chain {t} forward_filter",
              f"add rule {t} forward_filter iifname vmap @dispatch_forward",
              f"flush chain {t} input_filter",
              f"add rule {t} input_filter iifname vmap @dispatch_input",
              f"flush chain {t} output_filter",
              f"add rule {t} output_filter meta skuid vmap @dispatch_uid"]
    lines += [f"add rule {t} output_filter socket cgroupv2 level {n} vmap @dispatch_cgroup_l{n}"
              for n in range(1, MAX_CGROUP_LEVEL + 1)]
    return lines


def _sets(r: TaskRules) -> list[tuple[str, str]]:
    """(name, definition) of every set of the task."""
    p = names(r.task)
    _, _, key_type = _key(r)
    out = []
    if r.deadman_seconds:
        out.append((f"{p}_live", f"{key_type}; flags timeout;"))
    out += [(f"{p}_h4", "type ipv4_addr . inet_proto . inet_service; flags timeout;"),
            (f"{p}_h6", "type ipv6_addr . inet_proto . inet_service; flags timeout;"),
            (f"{p}_i4", "type ipv4_addr; flags timeout;"),
            (f"{p}_i6", "type ipv6_addr; flags timeout;")]
    for i, _ in enumerate(_host_ranges(r.purpose)):
        out += [(f"{p}_r4_{i}", "type ipv4_addr; flags timeout;"),
                (f"{p}_r6_{i}", "type ipv6_addr; flags timeout;")]
    for i, g in enumerate(_cidr_groups(r.purpose)):
        out.append((f"{p}_c{g.family}_{i}", f"type ipv{g.family}_addr; flags interval;"))
    return out


def _log(r: TaskRules, prefix: str) -> str:
    return f'counter log prefix "{prefix}" group {r.nflog_group}'


def _reject(r: TaskRules, match: str, prefix: str) -> list[str]:
    """Log the packet to NFLOG, then reject it: a TCP reset for TCP, else ICMP
    admin-prohibited, so the task fails fast instead of waiting for a timeout."""
    m = f"{match} " if match else ""
    return [f"{m}meta l4proto tcp {_log(r, prefix)} reject with tcp reset",
            f"{m}{_log(r, prefix)} reject with icmpx type admin-prohibited"]


def _antispoof(r: TaskRules) -> list[str]:
    out = []
    if r.task_addr4:
        out.append(f"ip saddr != {r.task_addr4} counter drop")
    if r.task_addr6:
        out.append(f"ip6 saddr != {{ {r.task_addr6}, fe80::/10, :: }} counter drop")
    return out


def _no_inbound() -> list[str]:
    """The task answers no connection it did not open: a reply-direction packet from it
    belongs to a flow someone else started (from the uplink, or the host), which no purpose
    declares and the gate and the record never see; an invalid one has no flow at all."""
    return ["ct state invalid counter drop", "ct direction reply counter drop"]


def _egress_rules(r: TaskRules) -> list[str]:
    p, tag = names(r.task), r.task[:100]
    expr, _, _ = _key(r)
    rules = []
    if r.deadman_seconds:                                                    # 0
        rules.append(f"{expr} != @{p}_live counter drop")
    if r.match.kind == "interface":
        rules += _antispoof(r)
    else:
        rules.append('oifname "lo" accept')     # the host's own loopback is not egress
    rules += _no_inbound()
    mark = f"ct mark and {r.mark_mask:#010x} == {r.block_mark:#010x}"          # 1
    rules += _reject(r, mark, f"egress block {tag}")
    rules.append("ct state established,related accept")                     # 2
    if r.dns_redirected:                                                     # 3
        # the host agent's nat rewrites the task's IPv4 DNS to its resolver, after this
        # chain (nf_nat's dstnat runs at -100): any IPv4 server here, none over IPv6
        rules.append("meta nfproto ipv4 meta l4proto { tcp, udp } th dport 53 counter accept")
    for family, resolver in (("ip", r.resolver4), ("ip6", r.resolver6)):
        if resolver:
            rules.append(f"{family} daddr {resolver} meta l4proto {{ tcp, udp }} "
                         "th dport 53 counter accept")
    rules += [f"tcp dport 53 {_log(r, f'egress dns {tag}')} reject with tcp reset",
              f"udp dport 53 {_log(r, f'egress dns {tag}')} reject with icmpx type "
              "admin-prohibited"]
    rules += [f"ip daddr . meta l4proto . th dport @{p}_h4 counter accept",      # 4
              f"ip6 daddr . meta l4proto . th dport @{p}_h6 counter accept"]
    for i, (transport, lo, hi) in enumerate(_host_ranges(r.purpose)):
        rules += [f"ip daddr @{p}_r4_{i} {transport} dport {lo}-{hi} counter accept",
                  f"ip6 daddr @{p}_r6_{i} {transport} dport {lo}-{hi} counter accept"]
    rules += [f"ip daddr @{p}_i4 icmp type echo-request counter accept",
              f"ip6 daddr @{p}_i6 icmpv6 type echo-request counter accept"]
    for i, g in enumerate(_cidr_groups(r.purpose)):
        family = "ip" if g.family == 4 else "ip6"
        if g.transport == "icmp":
            what = "icmp type echo-request" if g.family == 4 else "icmpv6 type echo-request"
        else:
            what = f"{g.transport} dport {_ports_text(g.ports)}"
        rules.append(f"{family} daddr @{p}_c{g.family}_{i} {what} counter accept")
    if r.mode == "enforce" and r.deny_mark:                                  # 5
        rules.append(f"meta l4proto {{ tcp, udp }} {_log(r, f'egress deny {tag}')} "
                     f"meta mark set meta mark | {r.deny_mark:#010x} accept")
        rules += _reject(r, "", f"egress deny {tag}")
    elif r.mode == "enforce":
        rules += _reject(r, "", f"egress deny {tag}")
    else:
        rules.append(f"{_log(r, f'egress audit {tag}')} accept")
    return rules


def _input_rules(r: TaskRules) -> list[str]:
    """From the task's interface to the host: its resolver and neighbour discovery only."""
    p, tag = names(r.task), r.task[:100]
    rules = [f"iifname != @{p}_live counter drop"] if r.deadman_seconds else []
    rules += _antispoof(r)
    rules += _no_inbound()
    rules.append("ct state established,related accept")
    for family, resolver in (("ip", r.resolver4), ("ip6", r.resolver6)):
        if resolver:
            rules.append(f"{family} daddr {resolver} meta l4proto {{ tcp, udp }} "
                         "th dport 53 counter accept")
    rules.append("icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } "
                 "ip6 hoplimit 255 counter accept")
    rules.append(f"{_log(r, f'egress host {tag}')} drop")
    return rules


def _chains(r: TaskRules) -> list[tuple[str, str]]:
    """(chain, dispatch map) pairs of the task."""
    p = names(r.task)
    if r.match.kind == "interface":
        return [(f"{p}_egress", "dispatch_forward"), (f"{p}_input", "dispatch_input")]
    return [(f"{p}_egress", _dispatch_maps(r)[0])]


def generate_nft(r: TaskRules) -> str:
    """One transaction: the table and base chains (idempotently), then this task's
    sets, chains and dispatch entries. Loading it again rewrites the task's chains and
    static sets and keeps what the resolver put in its dynamic sets."""
    t, p = TABLE, names(r.task)
    _, key_value, _ = _key(r)
    lines = [f"# egress: task {r.task}, {r.match}, {r.mode}", *_base(r)]
    for name, definition in _sets(r):
        lines.append(f"add set {t} {name} {{ {definition} }}")
    for i, g in enumerate(_cidr_groups(r.purpose)):
        name = f"{p}_c{g.family}_{i}"
        lines += [f"flush set {t} {name}",
                  f"add element {t} {name} {{ {', '.join(g.networks)} }}"]
    if r.deadman_seconds:
        lines += arm_deadman(r).splitlines()
    body = {f"{p}_egress": _egress_rules(r), f"{p}_input": _input_rules(r)}
    for chain, _ in _chains(r):
        lines += [f'add chain {t} {chain} {{ comment "task {r.task[:100]}"; }}',
                  f"flush chain {t} {chain}"]
        lines += [f"add rule {t} {chain} {rule}" for rule in body[chain]]
    for chain, vmap in _chains(r):
        lines.append(f"add element {t} {vmap} {{ {key_value} : jump {chain} }}")
    return "\n".join(lines) + "\n"


def remove_nft(r: TaskRules) -> str:
    """One transaction removing this task's dispatch entries, chains and sets, nothing else.

    Each object is added before it is deleted, so removal works whether or not the
    task (or part of it) is there; the table and base chains stay.
    """
    t = TABLE
    _, key_value, _ = _key(r)
    lines = [f"# egress: remove task {r.task}", *_base(r)]
    lines += [f"add chain {t} {chain}" for chain, _ in _chains(r)]
    for chain, vmap in _chains(r):
        lines += [f"add element {t} {vmap} {{ {key_value} : jump {chain} }}",
                  f"delete element {t} {vmap} {{ {key_value} }}"]
    for chain, _ in _chains(r):
        lines += [f"flush chain {t} {chain}", f"delete chain {t} {chain}"]
    for name, definition in _sets(r):
        lines += [f"add set {t} {name} {{ {definition} }}", f"delete set {t} {name}"]
    return "\n".join(lines) + "\n"


def _refresh(t: str, setname: str, element: str, timeout_s: int) -> list[str]:
    return [f"add element {t} {setname} {{ {element} timeout {timeout_s}s }}",
            f"delete element {t} {setname} {{ {element} }}",
            f"add element {t} {setname} {{ {element} timeout {timeout_s}s }}"]


def refresh_elements(r: TaskRules, address: str, pairs, timeout_s: int) -> str:
    """Allow ``address`` for ``pairs`` (from ``elements_for_name``) for ``timeout_s``
    seconds: add, delete and add each element in one batch, so it works whether the
    element is new, live or expired."""
    if timeout_s < 1:
        raise ValueError(f"timeout {timeout_s}s: at least 1s")
    ip = ipaddress.ip_address(address)
    v, p = ip.version, names(r.task)
    ranges = _host_ranges(r.purpose)
    lines = []
    for transport, lo, hi in sorted(set(pairs)):
        if transport == "icmp":
            lines += _refresh(TABLE, f"{p}_i{v}", str(ip), timeout_s)
        elif transport not in ("tcp", "udp"):
            raise ValueError(f"{transport!r} is not tcp, udp or icmp")
        elif lo == hi:
            lines += _refresh(TABLE, f"{p}_h{v}", f"{ip} . {transport} . {lo}", timeout_s)
        elif (transport, lo, hi) in ranges:
            i = ranges.index((transport, lo, hi))
            lines += _refresh(TABLE, f"{p}_r{v}_{i}", str(ip), timeout_s)
        else:
            raise ValueError(f"{transport} {lo}-{hi} is no port range of the purpose's "
                             "host rules")
    return "\n".join(lines) + ("\n" if lines else "")


def arm_deadman(r: TaskRules) -> str:
    """(Re)arm the dead-man's switch for ``deadman_seconds``, also after it expired."""
    if not r.deadman_seconds:
        return ""
    _, key_value, _ = _key(r)
    return "\n".join(_refresh(TABLE, f"{names(r.task)}_live", key_value,
                              r.deadman_seconds)) + "\n"


# ------------------------------------------------------------------ iptables

def _ipt_names(task: str) -> tuple[str, str]:
    """(iptables chain prefix, ipset prefix): short, as both tools limit names (28, 31)."""
    digest = hashlib.sha256(task.encode()).hexdigest()[:10]
    return f"EGR-{digest}", f"egr-{digest}"


def generate_iptables(r: TaskRules, resolve: Callable[[str], list[str]] | None = None,
                      dynamic_timeout: int = 300) -> tuple[str, str]:
    """(``ipset restore`` text, ``iptables-restore --noflush`` text): the same policy, IPv4.

    Names are matched through ``hash:ip,port`` sets (plus one ``hash:ip`` set per
    port range and one for ICMP) that the resolver fills with timeouts, or, when
    ``resolve`` is given, by rules for the addresses it returns now (the time is in
    each rule's comment; wildcard names cannot be resolved and are left out). The
    dead-man's switch is a ``hash:net`` set of 0.0.0.0/1 and 128.0.0.0/1 with a
    timeout: every source matches while it is armed (``ipset add ... -exist``
    re-arms it). IPv6 is not covered: use the nft ruleset, or block IPv6 for the task.
    The jump rules are appended: load once per task (remove with ``iptables -D``).
    """
    chain, sp = _ipt_names(r.task)
    tag = r.task[:40]
    ipset = [f"# egress: task {r.task}, {r.match}, {r.mode} (ipset restore)"]
    live = f"{sp}-live4"
    if r.deadman_seconds:
        ipset.append(f"create {live} hash:net family inet timeout {r.deadman_seconds} -exist")
        ipset += [f"add {live} {half} timeout {r.deadman_seconds} -exist"
                  for half in ("0.0.0.0/1", "128.0.0.0/1")]
    ranges = _host_ranges(r.purpose)
    if resolve is None:
        ipset.append(f"create {sp}-h4 hash:ip,port family inet timeout {dynamic_timeout} -exist")
        ipset.append(f"create {sp}-i4 hash:ip family inet timeout {dynamic_timeout} -exist")
        ipset += [f"create {sp}-r4-{i} hash:ip family inet timeout {dynamic_timeout} -exist"
                  for i in range(len(ranges))]
    groups = [g for g in _cidr_groups(r.purpose) if g.family == 4]
    for i, g in enumerate(groups):
        ipset += [f"create {sp}-c4-{i} hash:net family inet -exist", f"flush {sp}-c4-{i}"]
        ipset += [f"add {sp}-c4-{i} {net} -exist" for net in g.networks]

    def log(prefix: str) -> str:
        return f'-j NFLOG --nflog-group {r.nflog_group} --nflog-prefix "{prefix} {tag}"'

    def reject(match: str, prefix: str, proto: str | None = None) -> list[str]:
        """NFLOG, then a TCP reset for TCP and admin-prohibited for the rest."""
        m = f"{match} " if match else ""
        out = []
        for p in ([proto] if proto else ["tcp", None]):
            how = "tcp-reset" if p == "tcp" else "icmp-admin-prohibited"
            pm = f"-p {p} " if p else ""
            out += [f"-A {chain} {pm}{m}{log(prefix)}",
                    f"-A {chain} {pm}{m}-j REJECT --reject-with {how}"]
        return out

    rules = [f"-A {chain} -m set ! --match-set {live} src -j DROP"] if r.deadman_seconds else []
    m = r.match
    if m.kind == "interface" and r.task_addr4:
        rules.append(f"-A {chain} ! -s {r.task_addr4} -j DROP")
    mark = f"-m connmark --mark {r.block_mark:#x}/{r.mark_mask:#x}"
    rules += reject(mark, "egress block")
    rules.append(f"-A {chain} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")
    if r.resolver4:
        rules += [f"-A {chain} -d {r.resolver4} -p {t} --dport 53 -j ACCEPT"
                  for t in ("udp", "tcp")]
    for t in ("tcp", "udp"):
        rules += reject("--dport 53", "egress dns", proto=t)
    if resolve is None:
        rules.append(f"-A {chain} -m set --match-set {sp}-h4 dst,dst -j ACCEPT")
        rules += [f"-A {chain} -p {t} --dport {lo}:{hi} -m set --match-set {sp}-r4-{i} dst "
                  "-j ACCEPT" for i, (t, lo, hi) in enumerate(ranges)]
        rules.append(f"-A {chain} -p icmp --icmp-type echo-request "
                     f"-m set --match-set {sp}-i4 dst -j ACCEPT")
    else:
        rules += _resolved_rules(r, chain, resolve)
    for i, g in enumerate(groups):
        whats = ["-p icmp --icmp-type echo-request"] if g.transport == "icmp" else \
            _multiport(g.transport, g.ports)
        rules += [f"-A {chain} {what} -m set --match-set {sp}-c4-{i} dst -j ACCEPT"
                  for what in whats]
    if r.mode == "enforce":
        rules += reject("", "egress deny")
    else:
        rules += [f"-A {chain} {log('egress audit')}", f"-A {chain} -j ACCEPT"]

    jumps, extra_chains = _ipt_dispatch(r, chain, log)
    ipt = [f"# egress: task {r.task}, {r.match}, {r.mode} (iptables-restore --noflush)",
           "# IPv4 only: IPv6 is not covered by these rules", "*filter",
           f":{chain} - [0:0]", *[f":{c} - [0:0]" for c, _ in extra_chains],
           *rules, *[line for _, body in extra_chains for line in body], *jumps, "COMMIT"]
    return "\n".join(ipset) + "\n", "\n".join(ipt) + "\n"


def _ipt_dispatch(r: TaskRules, chain: str, log) -> tuple[list[str], list]:
    """The jump rules, and for interface tasks the input chain (resolver only)."""
    m = r.match
    if m.kind == "uid":
        return [f"-A OUTPUT -m owner --uid-owner {m.value} -j {chain}"], []
    if m.kind == "cgroup":
        return [f"-A OUTPUT -m cgroup --path /{m.value} -j {chain}"], []
    inp = f"{chain}-IN"
    body = []
    if r.deadman_seconds:
        body.append(f"-A {inp} -m set ! --match-set {_ipt_names(r.task)[1]}-live4 src -j DROP")
    if r.task_addr4:
        body.append(f"-A {inp} ! -s {r.task_addr4} -j DROP")
    body.append(f"-A {inp} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")
    if r.resolver4:
        body += [f"-A {inp} -d {r.resolver4} -p {t} --dport 53 -j ACCEPT"
                 for t in ("udp", "tcp")]
    body += [f"-A {inp} {log('egress host')}", f"-A {inp} -j DROP"]
    return [f"-A FORWARD -i {m.value} -j {chain}", f"-A INPUT -i {m.value} -j {inp}"], \
        [(inp, body)]


def _resolved_rules(r: TaskRules, chain: str, resolve) -> list[str]:
    """Host rules as rules for the addresses ``resolve`` gives now (IPv4 ones)."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = []
    for rule in r.purpose.rules:
        if rule.host is None or rule.host.startswith("*."):
            continue
        addresses = sorted({a for a in resolve(rule.host)
                            if ipaddress.ip_address(a).version == 4},
                           key=ipaddress.ip_address)
        comment = f'-m comment --comment "{rule.host} resolved {now}"'
        for address in addresses:
            out += [f"-A {chain} -d {address} {what} {comment} -j ACCEPT"
                    for what in _ipt_ports(rule)]
    return out


def _multiport(transport: str, ranges) -> list[str]:
    """``-p tcp -m multiport --dports ...`` matches; multiport takes 15 ports a rule
    (a range counts two), so long lists are split."""
    out, chunk, weight = [], [], 0
    for lo, hi in _merge(ranges):
        w = 1 if lo == hi else 2
        if weight + w > 15:
            out.append(chunk)
            chunk, weight = [], 0
        chunk.append(str(lo) if lo == hi else f"{lo}:{hi}")
        weight += w
    out.append(chunk)
    return [f"-p {transport} -m multiport --dports {','.join(c)}" for c in out]


def _ipt_ports(rule: AllowRule) -> list[str]:
    out = []
    for t in rule.transports:
        if t == "icmp" or rule.ports is None:
            out.append("-p icmp --icmp-type echo-request")
        else:
            out += _multiport(t, rule.ports)
    return out
