"""The judge: a task's purpose plus the detectors give each flow a verdict.

It decides in steps (DESIGN.md principle 8): at the flow's start on
addresses, ports and DNS bindings; at the gate on the first payload; on a
watched flow; at its end on totals. Each step sees only what that step
would see live, and may change the verdict; the record keeps the latest and
the step that reached it. In enforce mode a block is final: the kernel has
cut the flow, so later steps do not run.

The purpose's own findings (undeclared-destination, protocol-mismatch,
ssh-egress, direct-ip, sni-mismatch, untagged) are recomputed at every step
from all that is known by then; detector findings stay once raised.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from egress.detectors import (Context, Detector, TaskDetector, default_detectors,
                              default_task_detectors)
from egress.names import DnsBindings, NameBinding, bindings_from, strip_port
from egress.records import (Finding, FlowRecord, Mode, Severity, Step, TaskEvent,
                            verdict_for, Verdict)
from tagging.manifest import Purpose
from tagging.rules import AllowRule, normalize_name

POLICY_IDS = frozenset({"undeclared-destination", "protocol-mismatch", "ssh-egress",
                        "direct-ip", "sni-mismatch", "untagged"})
_NO_CHANGE = object()


ANY_SERVER = "*"
"""In ``own_resolvers``: the task's DNS to any server on port 53 reaches its own resolver
(the host agent redirects it by nat; the record keeps the server the task asked)."""


def own_resolver_rule(address: str) -> AllowRule:
    """The rule a live task's DNS to its own resolver (egress's) goes by."""
    return AllowRule(origin="egress: the task's own resolver", host=None,
                     cidr=str(ipaddress.ip_network(address)), ports=((53, 53),),
                     transports=("udp", "tcp"), protocol="dns")


TRANSPORT_OF = {"tcp": "tcp", "udp": "udp", "icmp": "icmp", "icmp6": "icmp",
                "ipv6-icmp": "icmp"}


@dataclass(frozen=True)
class TaskPolicy:
    """A task as the judge sees it: its purpose and the mode it runs in."""

    task: str
    purpose: Purpose
    mode: Mode
    own_resolvers: frozenset[str] = frozenset()
    """Live: the task's own resolvers (egress's); their answers bind names, whatever the
    purpose's dns rules (which name the resolvers a capture's task may use)."""


@dataclass
class _Totals:
    connections: int = 0
    counted: set[str] = field(default_factory=set)
    """Flows already counted as connections (a live flow is judged again in its interim
    records and at its end)."""
    bytes_out: int = 0
    over: set[str] = field(default_factory=set)
    """Limits already passed (each raises one task event)."""


def steps_for(flow: FlowRecord) -> list[Step]:
    """The steps a whole recorded flow passes through, in order."""
    steps = [Step.START]
    if flow.app is not None:
        steps.append(Step.GATE)
    if flow.observed in ("full", "first-packets+watch"):
        steps.append(Step.WATCH)
    if flow.event == "final":
        steps.append(Step.END)
    return steps


def _step_matters(step: Step, detectors, policy: "TaskPolicy | None") -> bool:
    """Can this step change anything? The purpose's rules look at start and gate only."""
    if step in (Step.START, Step.GATE):
        return True
    if step is Step.END and policy is not None and policy.purpose.limits.bytes_out is not None:
        return True
    return any(step in d.steps for d in detectors)


class Judge:
    """Judges flows of known tasks; keeps each task's DNS bindings and totals."""

    def __init__(self, policies: Iterable[TaskPolicy] = (), *, mode: Mode = Mode.AUDIT,
                 bindings: DnsBindings | None = None,
                 detectors: Sequence[Detector] | None = None,
                 task_detectors: Sequence[TaskDetector] | None = None):
        self.policies = {p.task: p for p in policies}
        self.mode = mode
        """The mode for flows no task owns."""
        self.bindings = bindings if bindings is not None else DnsBindings()
        self.detectors = list(default_detectors() if detectors is None else detectors)
        self.task_detectors = list(default_task_detectors() if task_detectors is None
                                   else task_detectors)
        self._totals: dict[str, _Totals] = {}
        self._events: list[TaskEvent] = []
        self._by_port: dict[tuple, list[AllowRule]] = {}

    # ------------------------------------------------------------------ API

    def learn_names(self, flow: FlowRecord) -> list[NameBinding]:
        """Bind the names a DNS flow's answers give its task (from resolvers it may use)."""
        found = [b for b in bindings_from(flow) if self.admits(b)]
        for b in found:
            self.bindings.add(b)
        return found

    def admits(self, binding: NameBinding) -> bool:
        """Does the binding come from a resolver the task's purpose declares?

        Live, a task's DNS goes only to its own resolver; in a capture, an answer
        from any other server (or on another port) binds nothing, in either mode.
        """
        policy = self.policies.get(binding.task) if binding.task is not None else None
        if policy is None or binding.resolver is None:
            return False
        if binding.resolver in policy.own_resolvers:
            return True
        address = _address(binding.resolver)
        names = [b.name for b in self.bindings.lookup(binding.task, binding.resolver,
                                                      binding.time)]
        port = binding.resolver_port
        for transport in ("udp", "tcp"):
            for rule in self._rules_for_port(policy, transport, port):
                if rule.protocol_for(port) in ("dns", "any") \
                        and rule.covers_destination(names, address):
                    return True
        return False

    def judge_flow(self, flow: FlowRecord) -> FlowRecord:
        """Run a whole recorded flow through every step it reached."""
        policy = self.policies.get(flow.task) if flow.task is not None else None
        for step in steps_for(flow):
            if _step_matters(step, self.detectors, policy):
                self.decide(flow, step)
        if policy is not None and flow.event == "final":
            self._observe_task(flow, policy)
        return flow

    def _observe_task(self, flow: FlowRecord, policy: TaskPolicy) -> None:
        """Hand the ended flow to the task-level detectors; their events join the stream."""
        ctx = Context(step=Step.END, purpose=policy.purpose, names=())
        waive = policy.purpose.waive
        for detector in self.task_detectors:
            try:
                events = list(detector.observe(flow, ctx))
            except Exception as e:
                events = [TaskEvent(task=flow.task, time=flow.end or flow.start,
                                    event=detector.name,
                                    findings=[_internal(Step.END, detector.name, e)])]
            for event in events:
                for f in event.findings:
                    f.waived = f.id in waive
                self._events.append(event)

    def decide(self, flow: FlowRecord, step: Step) -> FlowRecord:
        """Judge ``flow`` at ``step``; updates verdict, findings, rule, names in place."""
        policy = self.policies.get(flow.task) if flow.task is not None else None
        mode = policy.mode if policy else self.mode
        if flow.mode is Mode.ENFORCE and flow.verdict is Verdict.BLOCK:
            return flow  # cut by the kernel: nothing later happens to it
        flow.mode = mode
        if flow.direction == "inbound" or _link_scoped(flow.dst):
            # Another host reached the task's host, or the packets cannot leave the link
            # (neighbour discovery, MLD, link-local multicast): recorded, not egress to judge.
            flow.findings, flow.rule = [], None
            if flow.verdict is None:
                flow.verdict, flow.decided_at = Verdict.ALLOW, step
            return flow
        names = tuple(self.bindings.lookup(flow.task, flow.dst, flow.start)) \
            if flow.task is not None else ()

        kept = [f for f in flow.findings if f.id not in POLICY_IDS]
        if step in (Step.START, Step.GATE) or flow.verdict is None:
            try:
                policy_findings, rule = self._policy(flow, step, policy, names)
            except Exception as e:  # the judge's own failure must not allow silently
                policy_findings, rule = [], None
                _merge(kept, [_internal(step, "judge", e)])
        else:   # later steps add nothing the purpose's own rules look at
            policy_findings = [f for f in flow.findings if f.id in POLICY_IDS]
            rule = _NO_CHANGE
        ctx = Context(step=step, purpose=policy.purpose if policy else None, names=names,
                      rule=None if rule is _NO_CHANGE else rule)
        for detector in self.detectors:
            if step not in detector.steps:
                continue
            try:
                found = list(detector.inspect(flow, ctx))
            except Exception as e:
                found = [_internal(step, detector.name, e)]
            _merge(kept, found)
        _merge(kept, self._budget(flow, step, policy, kept))

        findings = policy_findings + kept
        waive = policy.purpose.waive if policy else frozenset()
        for f in findings:
            f.waived = f.id in waive
        flow.findings = findings
        if rule is not _NO_CHANGE:
            flow.rule = rule.describe() if rule is not None else None

        worst = max((f.severity for f in findings if not f.waived),
                    key=lambda s: s.rank, default=None)
        verdict = verdict_for(worst, mode)
        if verdict is not flow.verdict:
            flow.verdict, flow.decided_at = verdict, step
        return flow

    def events(self) -> list[TaskEvent]:
        """Task events raised since the last call (budget-exceeded, ...)."""
        out, self._events = self._events, []
        return out

    # ------------------------------------------------------------ the purpose

    def _policy(self, flow: FlowRecord, step: Step, policy: TaskPolicy | None,
                names: tuple[NameBinding, ...]) -> tuple[list[Finding], AllowRule | None]:
        if flow.task is None:
            return [Finding.make("untagged", source=flow.src,
                                 reason="no task owns this flow")], None
        if policy is None:
            raise LookupError(f"no purpose is loaded for task {flow.task!r}")
        if (flow.dst in policy.own_resolvers or ANY_SERVER in policy.own_resolvers) \
                and flow.dport == 53 \
                and (step is Step.START or flow.app in (None, "dns")):
            # live: the only DNS the task has (it refuses names itself)
            return [], own_resolver_rule(flow.dst)
        rules = policy.purpose.rules
        at_gate = step is not Step.START
        app = flow.app if at_gate else None
        transport = TRANSPORT_OF.get(flow.proto, flow.proto)
        seen_name, seen_source = _sent_name(flow) if at_gate else (None, None)
        dns_names = [b.name for b in names]
        tunnel = flow.tunnel if at_gate else None

        # Names over addresses: only a name the task resolved to this address makes it
        # a named destination. A name the client sends is evidence, never a declaration
        # (live, the kernel admits resolved addresses only).
        if dns_names:
            flow.server_name = seen_name if seen_name in dns_names else dns_names[0]
            flow.name_source = "dns"
        elif seen_name and _address(seen_name) is None and tunnel is None:
            flow.server_name, flow.name_source = seen_name, seen_source
        else:
            flow.server_name = flow.name_source = None

        findings: list[Finding] = []
        outer_app = app if tunnel is None else ("http" if tunnel.kind == "http-connect" else None)
        rule, covering = self._destination(policy, findings, dns_names, flow.dst, flow.dport,
                                           transport, outer_app)
        if not dns_names and not (app == "dns" or (rule is not None
                                                   and rule.protocol_for(flow.dport) == "dns")):
            findings.append(Finding.make("direct-ip", address=flow.dst))  # resolvers excepted

        if tunnel is not None:
            # Through a proxy: what the tunnel reaches is the destination that counts.
            inner_addr = _address(tunnel.host or "")
            if inner_addr is None:
                inner_names = [_normal(tunnel.host)] if tunnel.host else []
            else:
                inner_names = [b.name for b in self.bindings.lookup(flow.task, str(inner_addr),
                                                                    flow.start)]
                if not inner_names:
                    findings.append(Finding.make("direct-ip", address=str(inner_addr)))
            inner_rule, inner_covering = self._destination(
                policy, findings, inner_names, str(inner_addr) if inner_addr else flow.dst,
                tunnel.port, "tcp", app, via=f"{tunnel.kind} {flow.dst}:{flow.dport}",
                by_address=inner_addr is not None)
            rule = inner_rule if rule is not None else None
            covering, expected_names = inner_covering, inner_names
            port = tunnel.port
        else:
            expected_names, port = dns_names, flow.dport

        if app == "ssh" and not any(r.protocol_for(port) == "ssh" for r in covering):
            findings.append(Finding.make(
                "ssh-egress", client_banner=flow.ssh.client if flow.ssh else None,
                declared_for_ssh=sorted({r.destination() for r in rules
                                         if r.protocol == "ssh" or (r.protocol is None and r.ports
                                             and any(lo <= 22 <= hi for lo, hi in r.ports))})))

        if expected_names and seen_name and seen_name not in expected_names:
            findings.append(Finding.make("sni-mismatch", seen=seen_name, source=seen_source,
                                         resolved_names=sorted(set(expected_names))))
        return findings, rule

    def _destination(self, policy: TaskPolicy, findings: list[Finding], names: list[str],
                     address: str, port, transport: str, app: str | None, *,
                     via: str | None = None, by_address: bool = True):
        """The rule a destination matches (or the finding why none does), and the rules
        covering its name or address and port."""
        addr = _address(address) if by_address else None
        covering = [r for r in self._rules_for_port(policy, transport, port)
                    if r.covers_destination(names, addr)]
        if not covering:
            findings.append(Finding.make(
                "undeclared-destination", name=names[0] if names else None, address=address,
                port=port, transport=transport, via=via))
            return None, covering
        if app is None:
            return covering[0], covering  # provisional: the protocol is judged at the gate
        for r in covering:
            if r.accepts_app(app, port):
                return r, covering
        findings.append(Finding.make(
            "protocol-mismatch", seen=app, rule=covering[0].describe(),
            expected=sorted({r.protocol_for(port) for r in covering})))
        return None, covering

    def _rules_for_port(self, policy: TaskPolicy, transport: str, port) -> list[AllowRule]:
        """The rules covering a transport and port, looked up once per task and port."""
        key = (policy.task, id(policy.purpose), transport, port)
        found = self._by_port.get(key)
        if found is None:
            found = self._by_port[key] = [r for r in policy.purpose.rules
                                          if r.covers_port(transport, port)]
        return found

    # -------------------------------------------------------------- budgets

    def _budget(self, flow: FlowRecord, step: Step, policy: TaskPolicy | None,
                present: list[Finding]) -> list[Finding]:
        if policy is None or step not in (Step.START, Step.END):
            return []
        limits = policy.purpose.limits
        totals = self._totals.setdefault(policy.task, _Totals())
        if step is Step.START:
            if flow.flow_id not in totals.counted:
                totals.counted.add(flow.flow_id)
                totals.connections += 1
        elif flow.event == "final":
            totals.bytes_out += flow.bytes_out
        found = []
        for limit, allowed, total in (("connections", limits.connections, totals.connections),
                                      ("bytes_out", limits.bytes_out, totals.bytes_out)):
            if allowed is None or total <= allowed or any(
                    f.id == "budget-exceeded" and f.evidence.limit == limit for f in present):
                continue
            if limit == "bytes_out" and step is Step.START:
                total = totals.bytes_out  # an earlier flow passed it: this one is over too
            finding = Finding.make("budget-exceeded", limit=limit, allowed=allowed, total=total)
            found.append(finding)
            if limit not in totals.over:
                totals.over.add(limit)
                self._events.append(TaskEvent(
                    task=policy.task, time=flow.start if step is Step.START else (flow.end or flow.start),
                    event="budget-exceeded",
                    findings=[Finding.make("budget-exceeded", limit=limit, allowed=allowed,
                                           total=total)]))
        return found


LINK_SCOPED = tuple(ipaddress.ip_network(n) for n in (
    "fe80::/10", "ff02::/16", "224.0.0.0/24", "255.255.255.255/32"))
"""Destinations no router forwards. Not 169.254.0.0/16: the metadata services live there."""


@functools.lru_cache(maxsize=65536)
def _link_scoped(address: str) -> bool:
    ip = _address(address)
    return ip is not None and any(ip in net for net in LINK_SCOPED if net.version == ip.version)


@functools.lru_cache(maxsize=65536)
def _address(text: str):
    """An address object for rule matching (None when the text is not an address)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _merge(kept: list[Finding], found: Iterable[Finding]) -> None:
    """Add findings once: a detector seeing the same thing at two steps says it once."""
    for f in found:
        if not any(_same(k, f) for k in kept):
            kept.append(f)


def _same(a: Finding, b: Finding) -> bool:
    if a.id == b.id == "internal-error":  # one per failing part, at its first step
        return a.evidence.component == b.evidence.component
    return a.id == b.id and a.evidence == b.evidence


def _sent_name(flow: FlowRecord) -> tuple[str | None, str | None]:
    """The name the client sent (SNI, or HTTP Host without its port), normalised."""
    raw, source = None, None
    if flow.tls is not None and flow.tls.sni:
        raw, source = flow.tls.sni, "sni"
    elif flow.quic is not None and flow.quic.sni:
        raw, source = flow.quic.sni, "sni"
    elif flow.http is not None and flow.http.host and flow.http.method != "CONNECT":
        raw, source = strip_port(flow.http.host), "http-host"
    if raw is None:
        return None, None
    try:
        return normalize_name(raw), source
    except ValueError:
        return raw.lower(), source  # a malformed name still counts as sent, and mismatches


def _normal(name: str) -> str:
    try:
        return normalize_name(name)
    except ValueError:
        return name.lower()


def _internal(step: Step, component: str, error: Exception) -> Finding:
    return Finding.make("internal-error", stage=str(step), component=component,
                        error=f"{type(error).__name__}: {error}")
