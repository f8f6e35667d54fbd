"""Learn a least-privilege purpose manifest from what a task did (like audit2allow).

Pure: the task's judged flow records (and, optionally, its task events) in,
manifest text out. ``egress rules learn`` (cli/learn.py) reads them from the
store, or replays captures under ``CAPTURE_PURPOSE`` first.

What becomes policy, and what never does:

- Names over addresses. A flow's ``server_name`` (DNS, SNI or Host, as the
  judge settled it) becomes a ``host`` rule. A DNS flow to a resolver with no
  name becomes a ``cidr`` /32 or /128 rule. Any other flow with no name was
  reached by a bare address: it is listed at the end, and becomes a /32 or
  /128 rule (commented "reached by address") only with ``addresses=True``.
- Never learned: a flow with a finding of high or critical severity that the
  purpose it ran under did not waive (a miner, a reverse tunnel, a fronted
  name, a spend endpoint, DoH...), listed in a comment block at the end.
  Findings that only say the purpose in force did not declare something
  (``RELATIVE``: undeclared-destination, protocol-mismatch, budget-exceeded) do
  not count: the learned purpose replaces that one. ``ssh-egress`` does: SSH is
  learned only where the purpose in force declared SSH for the destination
  (from a capture: the built-in profiles' SSH endpoints, github.com:22 ...).
- Not rules: DNS to the task's own resolver (egress run's, which answers by a
  rule of its own), inbound flows and link-scoped destinations (not egress),
  other tasks' flows.
- Wildcards: ``*.S`` only where at least ``WILDCARD_MIN`` (3) distinct names
  strictly below one suffix S were used. S is the longest suffix with that
  many names below it that is at or below every such name's registrable
  domain (its public suffix, from the short built-in list ``PUBLIC_SUFFIXES``
  or else its last label, plus one label): so never ``*.com``, ``*.co.uk`` or
  ``*.github.io``. Taken longest first, greedily; the names it covers leave
  the pool.
- Ports as seen, merged into ``"lo-hi"`` only where contiguous; the transport
  is written only when not the protocol's default (icmp always); ``protocol`` is the app
  seen (``any`` when none was identified), omitted when every port of the rule
  implies it (443 tls, 80 http, 22 ssh). DNS rules always say
  ``protocol = "dns"`` (the form that covers UDP and TCP).
- Names from SNI or Host alone (no DNS answer seen, e.g. the lookup came
  before the capture) make host rules too, commented so: live, the task
  resolves them through egress's resolver; in a replay of the same capture the
  judge still finds them undeclared (it matches only names the task resolved).
- A wildcard rule stands for all its names: the ports of each protocol seen on
  any of them.
- Built-in profiles: one is used when it fully covers (destination, port,
  transport, protocol) at least one learned flow and every learned flow to a
  destination it names; the flows it covers then need no rules of their own.
- ``PUBLIC_SUFFIXES`` is a short list, not the Public Suffix List: a name under
  a public suffix it lacks may be grouped under that suffix, so read the
  wildcards (each lists its names) before use.
- The manifest says ``mode = "enforce"``, carries over the ids that the
  purpose in force waived on learned flows, and is checked before it is
  returned: it parses, and its rules cover every learned flow.

Output is deterministic: sorted, times in UTC to the second, no generation time.
"""

from __future__ import annotations

import ipaddress
import time as _clock
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from egress.records import FINDINGS, Finding, FlowRecord, Severity, TaskEvent
from tagging import manifest, profiles as profiles_mod
from tagging.rules import (PORT_PROTOCOLS, AllowRule, RuleError,
                           normalize_host_pattern, normalize_name)

WILDCARD_MIN = 3
"""Distinct names below one suffix before they become ``*.suffix``."""

RELATIVE = frozenset({"undeclared-destination", "protocol-mismatch", "budget-exceeded"})
"""High findings that judge a flow only against the purpose in force (a destination or
protocol it did not declare, its limits): the learned purpose replaces that purpose, so
they do not exclude. Not ssh-egress: SSH to a destination nobody declared for SSH is the
incident this tool exists for, and is never learned; declare SSH by hand."""

PUBLIC_SUFFIXES = frozenset({
    # Hosting suffixes where every name below belongs to someone else (the Public Suffix
    # List's private section, the ones agents meet most).
    "github.io", "githubusercontent.com", "gitlab.io", "pages.dev", "workers.dev",
    "vercel.app", "netlify.app", "herokuapp.com", "appspot.com", "web.app",
    "firebaseapp.com", "azurewebsites.net", "blob.core.windows.net", "cloudfront.net",
    "s3.amazonaws.com", "compute.amazonaws.com", "elb.amazonaws.com", "ngrok.io",
    "ngrok-free.app", "trycloudflare.com", "blogspot.com", "readthedocs.io", "fly.dev",
    "onrender.com", "repl.co", "glitch.me", "duckdns.org", "no-ip.org", "ddns.net",
})
"""Multi-label public suffixes, beyond the generic rule (see ``public_suffix``)."""

_SECOND_LEVEL = frozenset({"ac", "co", "com", "edu", "gov", "go", "mil", "ne", "net", "or",
                           "org", "gob", "nic", "ltd", "plc", "sch"})
"""Second-level labels that, under a two-letter country code, are public (co.uk, com.au)."""

CAPTURE_PURPOSE = '''version = 1
purpose = "Learning: every resolver's answers bind names; nothing else is declared"
mode = "audit"

[[allow]]
cidr = "0.0.0.0/0"
protocol = "dns"

[[allow]]
cidr = "::/0"
protocol = "dns"
'''
"""The head of the purpose a capture is replayed under before learning (see
``capture_purpose``): DNS answers from any resolver bind names (so flows get their
names), and no other destination is declared, so that the detectors see every
destination as undeclared (spend-endpoint and encrypted-dns fire where a declaring rule
would silence them). The undeclared-destination and protocol-mismatch it gives are
RELATIVE and ignored."""

OWN_RESOLVER_RULE = "egress: the task's own resolver"
"""How a live record's ``rule`` names the rule of the task's own resolver (egress.judge)."""

_TRANSPORT = {"tcp": "tcp", "udp": "udp", "icmp": "icmp", "icmp6": "icmp", "ipv6-icmp": "icmp"}
_APPS = ("tls", "http", "ssh", "dns", "quic", "stratum", "icmp")
_LINK_SCOPED = tuple(ipaddress.ip_network(n) for n in (
    "fe80::/10", "ff02::/16", "224.0.0.0/24", "255.255.255.255/32"))
_BAD = (Severity.HIGH, Severity.CRITICAL)


class LearnError(ValueError):
    """Nothing to learn from (no flows of the task), in one line."""


def capture_purpose() -> manifest.Purpose:
    """What to replay a capture under before learning: ``CAPTURE_PURPOSE``, and the SSH
    rules of the built-in profiles (git over SSH to a forge is declared by them; SSH
    anywhere else gets ssh-egress and is not learned)."""
    lines = [CAPTURE_PURPOSE]
    for name in profiles_mod.names():
        for rule in profiles_mod.load(name).rules:
            if rule.ports is None or rule.protocol != "ssh":
                continue
            ports = (p for lo, hi in rule.ports for p in range(lo, hi + 1))
            lines += ["", f"# {rule.origin}", "[[allow]]",
                      f"{'host' if rule.host else 'cidr'} = {_q(rule.destination())}",
                      f"ports = {_ports_toml(ports)}", 'protocol = "ssh"']
    return manifest.parse("\n".join(lines) + "\n", "<learning purpose>")


def blocking(flow: FlowRecord) -> list[Finding]:
    """The findings that keep a flow out of policy: high or critical, not waived, not
    RELATIVE to the purpose it ran under."""
    return [f for f in flow.findings
            if not f.waived and f.severity in _BAD and f.id not in RELATIVE]


@dataclass(frozen=True)
class Learned:
    """A learned manifest and what went into it."""

    text: str
    """The manifest (TOML), comments included."""
    flows: int
    """The task's flows seen (latest record of each)."""
    learned: int
    """Flows the manifest allows (by its own rules or a profile)."""
    rules: int
    """``[[allow]]`` rules written."""
    profiles: tuple[str, ...]
    """Built-in profiles used."""
    excluded: int
    """Flows not learned for their findings (or a transport no rule can name)."""
    by_address: int
    """Flows reached by a bare address and left out (``addresses=False``)."""


# ------------------------------------------------------------------ names

def public_suffix(name: str) -> str:
    """The public suffix of a name: the longest of ``PUBLIC_SUFFIXES`` it ends with, a
    second-level label under a two-letter country code (co.uk, com.au), or its last label."""
    labels = name.split(".")
    for i in range(len(labels)):
        suffix = ".".join(labels[i:])
        if suffix in PUBLIC_SUFFIXES:
            return suffix
        if len(labels) - i == 2 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL:
            return suffix
    return labels[-1]


def registrable(name: str) -> str | None:
    """The public suffix plus one label; None when the name is itself a public suffix."""
    ps = public_suffix(name)
    if name == ps:
        return None
    labels = name.split(".")
    return ".".join(labels[-(len(ps.split(".")) + 1):])


def wildcards(names: Iterable[str], minimum: int = WILDCARD_MIN) -> dict[str, str]:
    """name -> the ``*.suffix`` pattern that covers it, for names grouped under one.

    The suffix must be at or below each name's registrable domain and strictly above the
    name; the longest suffix with ``minimum`` names below it first, ties alphabetically.
    """
    pool = set(names)
    out: dict[str, str] = {}
    while True:
        below: dict[str, set[str]] = defaultdict(set)
        for name in pool:
            reg = registrable(name)
            if reg is None:
                continue
            labels = name.split(".")
            for i in range(1, len(labels)):
                suffix = ".".join(labels[i:])
                if len(suffix) < len(reg):
                    break
                below[suffix].add(name)
        fit = [s for s, ns in below.items() if len(ns) >= minimum]
        if not fit:
            return out
        best = min(fit, key=lambda s: (-s.count("."), s))
        for name in below[best]:
            out[name] = "*." + best
        pool -= below[best]


# ------------------------------------------------------------------ flows to uses

@dataclass
class _Use:
    """One hop of a flow a rule must allow (a tunnel has two: the proxy and its target)."""

    flow: FlowRecord
    name: str | None
    address: str | None
    transport: str
    port: int | None
    app: str | None
    """The app the judge checks at this hop; None when none is checked (no payload)."""
    protocol: str
    """The protocol a learned rule names for it."""

    @property
    def names(self) -> list[str]:
        return [self.name] if self.name else []

    @property
    def by_address(self) -> bool:
        return self.name is None and self.protocol != "dns"

    def where(self) -> str:
        dest = self.name or self.address or "?"
        if self.name and self.address:
            dest += f" {self.address}"
        port = "" if self.port is None or self.transport == "icmp" else f"/{self.port}"
        return f"{dest} {self.transport}{port}"


def _protocol(app: str | None, transport: str, port: int | None) -> str:
    if transport == "icmp":
        return "icmp"
    if app is None:
        return PORT_PROTOCOLS.get(port, "any")
    if app not in _APPS or app == "icmp":
        return "any"
    if (app in ("tls", "http", "ssh") and transport != "tcp") or \
            (app == "quic" and transport != "udp"):
        return "any"
    return app


def _host(name: str | None) -> str | None:
    """A name usable in a host rule, normalised; None for none (or an address)."""
    if not name:
        return None
    try:
        return normalize_host_pattern(normalize_name(name))
    except (RuleError, ValueError):
        return None


def _uses(flow: FlowRecord, transport: str) -> list[_Use]:
    name = _host(flow.server_name)
    tunnel = flow.tunnel
    if tunnel is None:
        return [_Use(flow, name, flow.dst, transport, flow.dport, flow.app,
                     _protocol(flow.app, transport, flow.dport))]
    outer_app = "http" if tunnel.kind == "http-connect" else None
    outer = _Use(flow, name, flow.dst, transport, flow.dport, outer_app,
                 _protocol(outer_app, transport, flow.dport))
    target = tunnel.host or ""
    try:
        inner_address, inner_name = str(ipaddress.ip_address(target)), None
    except ValueError:
        inner_address, inner_name = None, _host(target)
    inner = _Use(flow, inner_name, inner_address, "tcp", tunnel.port, flow.app,
                 _protocol(flow.app, "tcp", tunnel.port))
    return [outer, inner]


def _covers(rule: AllowRule, use: _Use) -> bool:
    """Would the judge allow this hop by this rule (destination, port, protocol)?"""
    if not rule.covers_port(use.transport, use.port):
        return False
    if not rule.covers_destination(use.names, use.address):
        return False
    if use.app is None:
        return True
    if use.app == "ssh":
        return rule.protocol_for(use.port) == "ssh"   # else ssh-egress
    return rule.accepts_app(use.app, use.port)


def _names_destination(rule: AllowRule, use: _Use) -> bool:
    return rule.covers_destination(use.names, use.address)


def _link_scoped(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in _LINK_SCOPED if net.version == ip.version)


def _latest(flows: Iterable[FlowRecord]) -> list[FlowRecord]:
    """The latest record of each flow (a final one over interims)."""
    out: dict[str, FlowRecord] = {}
    for f in flows:
        seen = out.get(f.flow_id)
        if seen is None or f.event == "final" or seen.event != "final":
            out[f.flow_id] = f
    return sorted(out.values(), key=lambda f: (f.start, f.flow_id))


# ------------------------------------------------------------------ rendering helpers

def when(us: int) -> str:
    """UTC, to the second: ``2026-03-11T02:14:07Z``."""
    return _clock.strftime("%Y-%m-%dT%H:%M:%SZ", _clock.gmtime(us // 1_000_000))


def _span(flows: Iterable[FlowRecord]) -> tuple[int, int]:
    flows = list(flows)
    return min(f.start for f in flows), max(f.end or f.start for f in flows)


def _n(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _evidence(flows: Iterable[FlowRecord]) -> str:
    flows = {f.flow_id: f for f in flows}.values()
    first, last = _span(flows)
    return f"{_n(len(flows), 'flow')}, first {when(first)}, last {when(last)}"


def _q(text: str) -> str:
    """A TOML basic string."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def port_ranges(ports: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted ports merged into contiguous (lo, hi) runs."""
    runs: list[list[int]] = []
    for p in sorted(set(ports)):
        if runs and p == runs[-1][1] + 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    return [(lo, hi) for lo, hi in runs]


def _ports_toml(ports: Iterable[int]) -> str:
    items = [str(lo) if lo == hi else _q(f"{lo}-{hi}") for lo, hi in port_ranges(ports)]
    return "[" + ", ".join(items) + "]"


@dataclass
class _Rule:
    kind: str                       # host or cidr
    dest: str
    transport: str                  # tcp, udp, icmp, or "dns" (udp and tcp)
    protocol: str
    ports: set[int] = field(default_factory=set)
    uses: list[_Use] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    """For a wildcard: the names it stands for."""

    def sort_key(self):
        if self.kind == "host":
            where = (0, self.dest.removeprefix("*."), self.dest.startswith("*."))
        else:
            net = ipaddress.ip_network(self.dest)
            where = (1, net.version, int(net.network_address), net.prefixlen)
        return (where, self.transport, self.protocol, sorted(self.ports))

    def table(self) -> dict:
        """The rule as the manifest's [[allow]] table (what AllowRule.parse reads)."""
        out: dict = {self.kind: self.dest}
        if self.transport != "icmp":
            out["ports"] = [lo if lo == hi else f"{lo}-{hi}" for lo, hi in
                            port_ranges(self.ports)]
        default_transport = {"quic": "udp", "dns": "dns"}.get(self.protocol, "tcp")
        if self.transport != default_transport:     # icmp is always said
            out["transport"] = self.transport
        if self.protocol == "dns" or (self.transport != "icmp" and any(
                PORT_PROTOCOLS.get(p, "any") != self.protocol for p in self.ports)):
            out["protocol"] = self.protocol
        return out

    def render(self) -> list[str]:
        flows = [u.flow for u in self.uses]
        lines = []
        if self.kind == "host" and self.dest.startswith("*."):
            suffix = self.dest[2:]
            lines.append(f"# {len(self.names)} names under {suffix}: "
                         + ", ".join(sorted(self.names)))
        if self.kind == "cidr":
            lines.append("# " + ("a resolver the task used, " if self.protocol == "dns" else "")
                         + "reached by address (no DNS name)")
        sources = sorted({u.flow.name_source for u in self.uses if u.name and
                          u.flow.name_source and u.flow.tunnel is None})
        note = ""
        if sources and sources != ["dns"]:
            note = (f"; name from {', '.join(sources)} only (no DNS answer seen: allowed "
                    "once the task resolves it)")
        apps = sorted({u.app or "no payload" for u in self.uses})
        if self.protocol == "any":
            note += f"; protocol not identified ({', '.join(apps)})"
        lines.append(f"# {_evidence(flows)}{note}")
        lines.append("[[allow]]")
        table = self.table()
        for key, value in table.items():
            if key == "ports":
                lines.append(f"ports = {_ports_toml(self.ports)}")
            else:
                lines.append(f"{key} = {_q(value)}")
        return lines


# ------------------------------------------------------------------ learn

def learn(flows: Iterable[FlowRecord], task: str, *, events: Iterable[TaskEvent] = (),
          own_resolvers: Iterable[str] = (), addresses: bool = False,
          minimum: int = WILDCARD_MIN) -> Learned:
    """The least-privilege manifest for ``task`` from its judged flow records.

    ``events``: the task's events; those with high or critical findings are listed (a
    refused lookup, a DNS tunnel) but make no rule. ``own_resolvers``: addresses of the
    task's own resolver (egress run's), whose DNS is no rule; live records also say so in
    their ``rule``. ``addresses``: learn flows reached by a bare address as /32 or /128.
    LearnError when the task has no flows.
    """
    manifest.check_task_id(task)
    mine = [f for f in _latest(flows) if f.task == task]
    if not mine:
        raise LearnError(f"no flows of task {task!r} to learn from")
    own = set()
    for a in own_resolvers:
        own.add(str(ipaddress.ip_address(a)))

    uses: list[_Use] = []
    excluded: list[tuple[FlowRecord, list[str], str]] = []     # flow, ids, where
    by_address: list[tuple[FlowRecord, str]] = []
    not_egress = own_dns = 0
    waived: set[str] = set()
    for flow in mine:
        if flow.direction == "inbound" or _link_scoped(flow.dst):
            not_egress += 1
            continue
        if (flow.rule or "").startswith(OWN_RESOLVER_RULE) or (
                flow.dst in own and flow.dport == 53 and flow.app in (None, "dns")):
            own_dns += 1
            continue
        transport = _TRANSPORT.get(flow.proto)
        hops = _uses(flow, transport) if transport else []
        where = hops[0].where() if hops else f"{flow.dst} {flow.proto}"
        bad = blocking(flow)
        if bad or transport is None:
            ids = sorted({f.id for f in bad}) or [f"transport {flow.proto} (no rule names it)"]
            excluded.append((flow, ids, where + (f" {flow.app}" if flow.app else "")))
            continue
        if not addresses and any(u.by_address for u in hops):
            by_address.append((flow, " and ".join(
                u.where() + f" {u.protocol}" for u in hops)))
            continue
        waived |= {f.id for f in flow.findings if f.waived and FINDINGS.get(f.id)
                   and FINDINGS[f.id].waivable}
        uses.extend(hops)

    # Profiles: used when they cover some use, and every use to a destination they name.
    # Decided once per distinct hop (a long task repeats the same few).
    distinct: dict[tuple, list[_Use]] = defaultdict(list)
    for u in uses:
        distinct[(u.name, u.address, u.transport, u.port, u.app)].append(u)
    used_profiles: list[tuple[str, list[_Use]]] = []
    for name in profiles_mod.names():
        rules = profiles_mod.load(name).rules
        covered: list[_Use] = []
        for same in distinct.values():
            u = same[0]
            if any(_covers(r, u) for r in rules):
                covered.extend(same)
            elif any(_names_destination(r, u) for r in rules):
                break       # it names this destination but does not allow what was done
        else:
            if covered:
                used_profiles.append((name, covered))
    in_profile = {id(u) for _, covered in used_profiles for u in covered}
    rest = [u for u in uses if id(u) not in in_profile]

    pattern_of = wildcards(sorted({u.name for u in rest if u.name}), minimum)
    table: dict[tuple, _Rule] = {}
    for u in rest:
        if u.name:
            kind, dest = "host", pattern_of.get(u.name, u.name)
        else:
            ip = ipaddress.ip_address(u.address)
            kind, dest = "cidr", str(ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}"))
        transport = "dns" if u.protocol == "dns" else u.transport
        key = (kind, dest, transport, u.protocol)
        rule = table.get(key)
        if rule is None:
            rule = table[key] = _Rule(kind, dest, transport, u.protocol)
        if u.port is not None and transport != "icmp":
            rule.ports.add(u.port)
        rule.uses.append(u)
        if dest.startswith("*."):
            rule.names.add(u.name)
    rules = sorted(table.values(), key=_Rule.sort_key)

    learned_flows = {u.flow.flow_id for u in uses}
    first, last = _span(mine)
    lines = [
        f"# Learned by `egress rules learn` from the {_n(len(mine), 'flow')} of task {task}:",
        f"#   {len(learned_flows)} allowed by the profiles and rules below,",
        f"#   {len(excluded)} left out for their findings and {len(by_address)} reached by "
        "address (listed at the end),",
        f"#   {own_dns} DNS to egress's own resolver (needs no rule), {not_egress} inbound "
        "or link-local.",
        "# What the task did, not what it should do: review before use.",
        "version = 1",
        f"purpose = {_q(f'Learned from task {task}, {when(first)} to {when(last)}')}",
        f"task = {_q(task)}",
        'mode = "enforce"',
    ]
    if used_profiles:
        lines.append("")
        for name, covered in used_profiles:
            names = sorted({u.name or u.address for u in covered})
            lines.append(f"# {name}: {_evidence(u.flow for u in covered)}; "
                         + ", ".join(names))
        lines.append("profiles = [" + ", ".join(_q(n) for n, _ in used_profiles) + "]")
    if waived:
        lines += ["", "# Waived by the purpose the task ran under, on flows learned here.",
                  "waive = [" + ", ".join(_q(w) for w in sorted(waived)) + "]"]
    for rule in rules:
        lines.append("")
        lines.extend(rule.render())

    lines += _excluded_block(excluded)
    lines += _by_address_block(by_address)
    lines += _events_block(task, events)
    text = "\n".join(lines) + "\n"

    _check(text, [same[0] for same in distinct.values()])
    return Learned(text=text, flows=len(mine), learned=len(learned_flows), rules=len(rules),
                   profiles=tuple(n for n, _ in used_profiles), excluded=len(excluded),
                   by_address=len(by_address))


def _grouped(items: Iterable[tuple[tuple, FlowRecord]]) -> list[tuple[tuple, list[FlowRecord]]]:
    groups: dict[tuple, list[FlowRecord]] = defaultdict(list)
    for key, flow in items:
        groups[key].append(flow)
    return sorted(groups.items())


def _excluded_block(excluded) -> list[str]:
    if not excluded:
        return []
    out = ["", "# Not learned: flows with high or critical findings never become policy.",
           "# destination, app: findings; flows, first and last seen (UTC)"]
    for (where, ids), flows in _grouped(((w, tuple(ids)), f) for f, ids, w in excluded):
        sent = sorted({n for f in flows for n in (f.tls and f.tls.sni, f.http and f.http.host)
                       if n and n != f.server_name and _host(n.rsplit(":", 1)[0]
                                                              if ":" in n and "]" not in n
                                                              else n)})
        extra = f" (sent name {', '.join(sent)})" if sent else ""
        out.append(f"#   {where}{extra}: {', '.join(ids)}; {_evidence(flows)}")
    return out


def _by_address_block(by_address) -> list[str]:
    if not by_address:
        return []
    out = ["", "# Not learned: reached by a bare address, no name (names over addresses).",
           "# Learn them as /32 or /128 rules with --addresses, if the task needs them."]
    for (where,), flows in _grouped(((w,), f) for f, w in by_address):
        out.append(f"#   {where}; {_evidence(flows)}")
    return out


def _events_block(task: str, events: Iterable[TaskEvent]) -> list[str]:
    rows = []
    for e in events:
        if e.task != task:
            continue
        for f in e.findings:
            if f.waived or f.severity not in _BAD:
                continue
            ev = f.evidence
            what = None
            for attr in ("name", "domain", "limit"):
                what = ev.get(attr) if isinstance(ev, dict) else getattr(ev, attr, None)
                if what:
                    break
            rows.append(((f.id, str(what or "")), e.time))
    if not rows:
        return []
    groups: dict[tuple, list[int]] = defaultdict(list)
    for key, t in rows:
        groups[key].append(t)
    out = ["", "# Task events with high or critical findings (no rule was learned from them):"]
    for (fid, what), times in sorted(groups.items()):
        out.append(f"#   {fid}{' ' + what if what else ''}; {_n(len(times), 'event')}, "
                   f"first {when(min(times))}, last {when(max(times))}")
    return out


def _check(text: str, uses: list[_Use]) -> None:
    """The manifest parses, and its rules allow every learned hop (a bug otherwise)."""
    purpose = manifest.parse(text, "<learned manifest>")
    for u in uses:
        if not any(_covers(r, u) for r in purpose.rules):
            raise AssertionError(f"learned manifest does not cover {u.where()} {u.protocol}")
