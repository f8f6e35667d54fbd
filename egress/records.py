"""The vocabulary: flow records, findings, task events and verdicts.

DESIGN.md's contracts in code. Everything else in egress depends on this
module and it depends on nothing of ours. Conventions:

- ``None`` is unknown; ``0``, ``False`` and ``""`` are known values.
- Times are integer microseconds since the Unix epoch, UTC; JSON renders
  them as ISO 8601 with ``Z`` and microseconds.
- ``to_json`` gives the contract's JSON object; ``from_json`` reads one back.
  Reading is forward-compatible by default (unknown keys are ignored, as
  the contract asks of readers); ``strict=True`` refuses unknown keys, for
  our own on-disk formats.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import time as _clock
import types
import typing
from dataclasses import dataclass, field

SCHEMA = 1
"""Version of the JSON flow record and task event contract."""


class RecordError(ValueError):
    """A record that does not fit the contract; the message names the field."""


# --------------------------------------------------------------------------
# Enumerations


class Severity(enum.StrEnum):
    """How bad a finding is; ordered from info to critical."""

    INFO = "info"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _SEVERITY_ORDER.index(self)


_SEVERITY_ORDER = list(Severity)


class Verdict(enum.StrEnum):
    """What the judge decided for a flow."""

    ALLOW = "allow"
    FLAG = "flag"
    BLOCK = "block"


class Mode(enum.StrEnum):
    """Audit records what would be blocked; enforce blocks it."""

    AUDIT = "audit"
    ENFORCE = "enforce"


class Step(enum.StrEnum):
    """When in a flow's life the judge decides, in order."""

    START = "start"
    """On addresses, ports and DNS bindings, before any payload."""
    GATE = "gate"
    """On the first payload bytes of each direction."""
    WATCH = "watch"
    """On what a watched flow does later (sizes, directions, times)."""
    END = "end"
    """On the flow's totals, when it ended."""

    @property
    def rank(self) -> int:
        return _STEP_ORDER.index(self)


_STEP_ORDER = list(Step)


class Action(enum.StrEnum):
    """What the kernel did with the flow (live only)."""

    PASSED = "passed"
    REJECTED = "rejected"
    DROPPED = "dropped"
    KILLED = "killed"


def verdict_for(severity: Severity | None, mode: Mode) -> Verdict:
    """DESIGN.md's verdict table: the highest counted severity and the mode."""
    if severity is None or severity.rank <= Severity.LOW.rank:
        return Verdict.ALLOW
    if severity is Severity.MEDIUM or mode is Mode.AUDIT:
        return Verdict.FLAG
    return Verdict.BLOCK


# --------------------------------------------------------------------------
# Evidence: one typed object per finding id


@dataclass(kw_only=True)
class UndeclaredDestinationEvidence:
    name: str | None = None
    """The name the flow was made to (DNS, SNI or Host); None when it had none."""
    address: str
    """The destination address."""
    port: int | None = None
    """The destination port; None for ICMP."""
    transport: str
    """tcp, udp or icmp."""
    via: str | None = None
    """The proxy the flow went through (``socks5 192.0.2.8:1080``); None when direct."""


@dataclass(kw_only=True)
class ProtocolMismatchEvidence:
    seen: str
    """The app protocol identified from payload (``unknown`` when none matched)."""
    expected: list[str]
    """The protocols the matching rules allow for this destination and port."""
    rule: str
    """The rule whose destination and port matched."""


@dataclass(kw_only=True)
class SshEgressEvidence:
    client_banner: str | None = None
    """The client's SSH identification string; None before it was seen."""
    declared_for_ssh: list[str]
    """Destinations the purpose declares for SSH (empty when none)."""


@dataclass(kw_only=True)
class ReverseSshTunnelEvidence:
    source: str
    """``traffic`` (from the packets) or ``process`` (from the command line)."""
    cmdline_flag: str | None = None
    """The forwarding option seen on the command line (-R, RemoteForward, autossh)."""
    server_first_exchanges: int | None = None
    """Exchanges after key exchange that the server side started."""
    keepalive_interval_s: float | None = None
    """The regular interval of keepalive-sized packets, in seconds."""
    role_reversal: bool | None = None
    """True when the TCP initiator spoke as the SSH server."""


@dataclass(kw_only=True)
class MiningStratumEvidence:
    method: str
    """The JSON-RPC method seen (login, mining.subscribe, eth_submitLogin, ...)."""
    agent: str | None = None
    """The miner's user agent, when it sent one."""


@dataclass(kw_only=True)
class MiningPoolEvidence:
    name: str | None = None
    """The pool name seen in DNS or SNI; None when matched by port and shape."""
    port: int | None = None
    """The destination port."""
    reason: str
    """``known-pool`` or ``mining-port-and-shape``."""


@dataclass(kw_only=True)
class DnsTunnelEvidence:
    domain: str
    """The domain under which the queries were made."""
    distinct_names: int | None = None
    """Distinct names queried under the domain in the window."""
    window_s: float | None = None
    """The window over which names were counted, in seconds."""
    max_label_length: int | None = None
    """The longest label seen."""
    entropy: float | None = None
    """Shannon entropy of the labels, bits per character."""
    qtypes: list[str] = field(default_factory=list)
    """Query types seen (NULL, TXT, PRIVATE, ...)."""


@dataclass(kw_only=True)
class DnsRefusedEvidence:
    name: str
    """The name looked up."""
    qtype: str | None = None
    """The query type."""


@dataclass(kw_only=True)
class EncryptedDnsEvidence:
    kind: str
    """doh, dot or doq."""
    resolver: str
    """The resolver's name or address."""


@dataclass(kw_only=True)
class IcmpTunnelEvidence:
    packets: int
    """Echo packets examined."""
    max_payload: int | None = None
    """The largest echo payload, in bytes."""
    entropy: float | None = None
    """Mean payload entropy, bits per byte."""
    embedded_ip: bool | None = None
    """True when payloads carry IP headers."""


@dataclass(kw_only=True)
class DirectIpEvidence:
    address: str
    """The address connected to, which no DNS answer gave the task."""


@dataclass(kw_only=True)
class SniMismatchEvidence:
    seen: str
    """The SNI or HTTP Host sent."""
    source: str
    """``sni`` or ``http-host``."""
    resolved_names: list[str]
    """The names the task resolved to this address."""


@dataclass(kw_only=True)
class EncryptedClientHelloEvidence:
    outer_sni: str | None = None
    """The public (outer) name; the real one is hidden."""


@dataclass(kw_only=True)
class MetadataEndpointEvidence:
    address: str
    """The cloud metadata address connected to."""


@dataclass(kw_only=True)
class SpendEndpointEvidence:
    name: str
    """The endpoint's name."""
    category: str
    """cloud-control-plane, payment or exchange."""


@dataclass(kw_only=True)
class BudgetExceededEvidence:
    limit: str
    """The limit passed: ``bytes_out`` or ``connections``."""
    allowed: int
    """The purpose's limit."""
    total: int
    """The task's total when it was passed."""


@dataclass(kw_only=True)
class UntaggedEvidence:
    source: str
    """The initiator's address."""
    reason: str
    """Why no task owns the flow (no task at that time, address fits none, ...)."""


@dataclass(kw_only=True)
class InternalErrorEvidence:
    stage: str
    """The judge's step, or the component, that failed."""
    component: str
    """The detector or part of the judge that raised."""
    error: str
    """The exception's type and message."""


@dataclass(kw_only=True)
class EventsLostEvidence:
    count: int
    """How many events were lost."""
    reason: str
    """Why (socket overrun, queue full, sequence gap, ...)."""


@dataclass(frozen=True)
class FindingKind:
    """A finding id of DESIGN.md with its fixed severity."""

    id: str
    severity: Severity
    meaning: str
    evidence: type
    waivable: bool = True
    """A purpose's ``waive`` may list it (never critical, internal-error, undeclared)."""
    task_level: bool = False
    """Raised on a task event rather than one flow."""


def _kind(id, severity, meaning, evidence, **kw) -> tuple[str, FindingKind]:
    waivable = severity is not Severity.CRITICAL and id not in (
        "internal-error", "undeclared-destination")
    return id, FindingKind(id, severity, meaning, evidence, waivable=waivable, **kw)


S = Severity
FINDINGS: dict[str, FindingKind] = dict([
    _kind("undeclared-destination", S.HIGH, "no allow rule of the purpose matches",
          UndeclaredDestinationEvidence),
    _kind("protocol-mismatch", S.HIGH,
          "the flow speaks another protocol than its rule or port says",
          ProtocolMismatchEvidence),
    _kind("ssh-egress", S.HIGH, "SSH to a destination not declared for SSH",
          SshEgressEvidence),
    _kind("reverse-ssh-tunnel", S.CRITICAL, "SSH with remote forwarding",
          ReverseSshTunnelEvidence),
    _kind("mining-stratum", S.CRITICAL,
          "Stratum or mining JSON-RPC (cleartext dialects) on any port",
          MiningStratumEvidence),
    _kind("mining-pool", S.CRITICAL,
          "a known mining pool by name, or a mining port with mining-shaped traffic",
          MiningPoolEvidence),
    _kind("dns-tunnel", S.HIGH, "queries shaped like a tunnel", DnsTunnelEvidence,
          task_level=True),
    _kind("dns-refused", S.HIGH, "a name the purpose does not allow was looked up",
          DnsRefusedEvidence, task_level=True),
    _kind("encrypted-dns", S.HIGH,
          "DoH, DoT or DoQ to a resolver the purpose did not declare",
          EncryptedDnsEvidence),
    _kind("icmp-tunnel", S.HIGH, "ICMP echo carrying payloads that are not ping-shaped",
          IcmpTunnelEvidence),
    _kind("direct-ip", S.MEDIUM, "a connection to an address no DNS answer gave the task",
          DirectIpEvidence),
    _kind("sni-mismatch", S.HIGH,
          "SNI or HTTP Host disagrees with the name the address was resolved from",
          SniMismatchEvidence),
    _kind("encrypted-client-hello", S.HIGH, "ECH hides the real server name",
          EncryptedClientHelloEvidence),
    _kind("metadata-endpoint", S.CRITICAL, "a cloud instance metadata address",
          MetadataEndpointEvidence),
    _kind("spend-endpoint", S.HIGH,
          "a cloud control plane, payment or exchange API the purpose did not declare",
          SpendEndpointEvidence),
    _kind("budget-exceeded", S.HIGH, "the task passed a limit of its purpose",
          BudgetExceededEvidence, task_level=True),
    _kind("untagged", S.HIGH, "an outbound flow no task owns", UntaggedEvidence),
    _kind("internal-error", S.HIGH, "a detector or the judge failed on this flow",
          InternalErrorEvidence),
    _kind("events-lost", S.MEDIUM, "the recorder lost events", EventsLostEvidence,
          task_level=True),
])
del S


@dataclass(kw_only=True)
class Finding:
    """One finding on a flow or task event, with evidence a person can check."""

    id: str
    """A finding id of DESIGN.md's table (stable, never renamed)."""
    severity: Severity
    """The id's severity (fixed by the id)."""
    evidence: typing.Any
    """The id's evidence object (see FINDINGS[id].evidence)."""
    waived: bool = False
    """True when the purpose waived this id: recorded, but not counted."""

    @classmethod
    def make(cls, id: str, evidence: typing.Any = None, *, waived: bool = False,
             **fields) -> "Finding":
        """A finding of a known id; evidence given as an object or as fields."""
        kind = FINDINGS.get(id)
        if kind is None:
            raise RecordError(f"findings.id: unknown finding id {id!r}")
        if evidence is None:
            evidence = kind.evidence(**fields)
        elif not isinstance(evidence, kind.evidence):
            raise RecordError(f"findings.evidence: {id} takes {kind.evidence.__name__}")
        return cls(id=id, severity=kind.severity, evidence=evidence, waived=waived)

    def to_json(self) -> dict:
        out = {"id": self.id, "severity": str(self.severity),
               "evidence": _encode(self.evidence)}
        if self.waived:
            out["waived"] = True
        return out

    def to_checked_json(self, where: str = "findings") -> dict:
        """``to_json``, refusing what strict reading would refuse (our own store's check)."""
        kind = FINDINGS.get(self.id)
        if kind is None:
            raise RecordError(f"{where}.id: unknown finding id {self.id!r}")
        if self.severity is not kind.severity:
            raise RecordError(f"{where}.severity: {kind.id} is {kind.severity}")
        if not isinstance(self.evidence, kind.evidence):
            raise RecordError(f"{where}.evidence: {kind.id} takes {kind.evidence.__name__}")
        if not isinstance(self.waived, bool):
            raise RecordError(f"{where}.waived: expected bool")
        out = {"id": self.id, "severity": str(self.severity),
               "evidence": _plan(kind.evidence).encode_checked(self.evidence, f"{where}.evidence")}
        if self.waived:
            out["waived"] = True
        return out

    @classmethod
    def from_json(cls, data: typing.Any, *, strict: bool = False,
                  where: str = "findings") -> "Finding":
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected an object")
        known = {"id", "severity", "evidence", "waived"}
        _check_keys(data, known, strict, where)
        kind = FINDINGS.get(data.get("id"))
        if kind is None:
            if strict:
                raise RecordError(f"{where}.id: unknown finding id {data.get('id')!r}")
            # A newer writer's id: keep it readable, evidence as given.
            return cls(id=str(data.get("id")), severity=Severity(data["severity"]),
                       evidence=data.get("evidence") or {})
        if data.get("severity") != str(kind.severity):
            raise RecordError(f"{where}.severity: {kind.id} is {kind.severity}, "
                              f"not {data.get('severity')!r}")
        evidence = _decode(kind.evidence, data.get("evidence") or {}, strict,
                           f"{where}.evidence")
        return cls(id=kind.id, severity=kind.severity, evidence=evidence,
                   waived=_decode(bool, data.get("waived", False), strict, f"{where}.waived"))


# --------------------------------------------------------------------------
# Flow record parts


@dataclass(kw_only=True)
class Nat:
    """The tuple after our NAT, as perimeter tools see it."""

    src: str
    """The source address after NAT."""
    sport: int | None = None
    """The source port after NAT; None for ICMP."""


@dataclass(kw_only=True)
class TlsInfo:
    sni: str | None = None
    """Server Name Indication from the ClientHello; None when absent."""
    alpn: list[str] | None = None
    """ALPN protocols offered, in order; None when the extension is absent."""
    ja3: str | None = None
    """JA3 hash of the ClientHello."""
    ja4: str | None = None
    """JA4 fingerprint of the ClientHello."""
    ech: bool | None = None
    """True when the ClientHello carries encrypted_client_hello."""


@dataclass(kw_only=True)
class HttpInfo:
    method: str | None = None
    """The request method of the first request (GET, CONNECT, ...)."""
    host: str | None = None
    """The Host header (or CONNECT target) of the first request."""


@dataclass(kw_only=True)
class SshInfo:
    client: str | None = None
    """The client's identification string (banner)."""
    server: str | None = None
    """The server's identification string (banner)."""
    hassh: str | None = None
    """HASSH of the client's KEXINIT."""
    hassh_server: str | None = None
    """HASSH of the server's KEXINIT."""


@dataclass(kw_only=True)
class StratumInfo:
    method: str | None = None
    """The first mining JSON-RPC method seen."""
    agent: str | None = None
    """The miner's agent string, when sent."""


@dataclass(kw_only=True)
class DnsQuery:
    name: str
    """The name asked for, lower case, no trailing dot."""
    type: str
    """The query type (A, AAAA, TXT, ...)."""
    answers: list[str] = field(default_factory=list)
    """Answer data in order: addresses, and names for CNAME records."""
    ttl: int | None = None
    """The smallest TTL among the answers, in seconds; None without answers."""
    rcode: str | None = None
    """The response code (NOERROR, NXDOMAIN, ...); None when no response was seen."""


@dataclass(kw_only=True)
class DnsInfo:
    queries: list[DnsQuery] = field(default_factory=list)
    """The queries of the flow, in order."""


@dataclass(kw_only=True)
class QuicInfo:
    version: str | None = None
    """The QUIC version of the Initial packets (hex, e.g. 0x00000001)."""
    sni: str | None = None
    """The SNI from the decrypted ClientHello, where known."""
    ech: bool | None = None
    """True when the decrypted ClientHello carries encrypted_client_hello."""


@dataclass(kw_only=True)
class Tunnel:
    """A proxy tunnel the flow carries (HTTP CONNECT, SOCKS): where it really goes."""

    kind: str
    """http-connect, socks4 or socks5."""
    host: str | None = None
    """The inner target's name or address, as the client asked for it."""
    port: int | None = None
    """The inner target's port."""


@dataclass(kw_only=True)
class ProcessInfo:
    pid: int | None = None
    """Process id in the host's PID namespace."""
    ppid: int | None = None
    """Parent's process id."""
    uid: int | None = None
    """The process's real uid."""
    exe: str | None = None
    """Path of the executable."""
    cmdline: str | None = None
    """Command line, with secrets redacted."""


@dataclass
class Observation:
    """What was seen of a flow besides its record, for detectors; never stored or printed.

    The observation window: what the live recorder provides and what replay
    hands over (payloads and packet sizes are not part of the flow record).
    """

    echo: list[tuple[str, bytes]] | None = None
    """ICMP echo payloads in order, as ("out" from the initiator or "in", bytes)."""
    watch: list[tuple[int, bool, int]] | None = None
    """(time, from the initiator, payload bytes) of the packets with payload, up to a cap."""
    ssh_kex_end: tuple[int | None, int | None] | None = None
    """SSH: the stream offsets (initiator's, responder's) where key exchange ended."""
    ssh_role_reversed: bool | None = None
    """SSH: True when the TCP initiator sent the server's key-exchange reply."""


def _time():
    return field(metadata={"time": True})


@dataclass(kw_only=True)
class FlowRecord:
    """One flow, oriented from its initiator, as judged (DESIGN.md's flow record)."""

    event: str = "final"
    """``interim`` (periodic, cumulative counters) or ``final``."""
    flow_id: str
    """Ours, unique in a store (``f-`` and 8 base62 characters)."""
    task: str | None = None
    """The owning task; None for untagged flows."""
    mode: Mode | None = None
    """The mode the flow was judged in; None when not judged yet."""
    community_id: str | None = None
    """Community ID v1 of the pre-NAT tuple; None where not computable."""
    proto: str
    """tcp, udp, icmp, icmp6 or another IP protocol's name or number."""
    ip_version: int
    """4 or 6."""
    direction: str = "outbound"
    """``outbound`` (the task side initiated) or ``inbound``."""
    src: str
    """The initiator's address."""
    sport: int | None = None
    """The initiator's port; None for ICMP and other portless protocols."""
    dst: str
    """The responder's address."""
    dport: int | None = None
    """The responder's port; None for ICMP and other portless protocols."""
    nat: Nat | None = None
    """The tuple after our NAT; None without NAT."""
    start: int = _time()
    """First packet, microseconds since the epoch (UTC)."""
    end: int | None = field(default=None, metadata={"time": True})
    """Last packet so far (equal to start for a one-packet flow); None when not known."""
    conn_state: str | None = None
    """Zeek's conn_state code (S0, SF, REJ, RSTO, ...); None when not tracked."""
    observed: str = "full"
    """What we saw: full, first-packets, first-packets+watch, conntrack-only."""
    weird: list[str] = field(default_factory=list)
    """Anomalies, as Zeek's weird.log names them: ``midstream`` (picked up after its
    start), ``overlap-conflict`` (retransmitted bytes that differ); empty when none."""
    app: str | None = None
    """tls, http, ssh, dns, quic, stratum, icmp or unknown; None before any payload."""
    server_name: str | None = None
    """The name the flow was made to; None when no name is known."""
    name_source: str | None = None
    """Where server_name came from: dns, sni, http-host; None without a name."""
    tls: TlsInfo | None = None
    """TLS details; None unless app is tls."""
    http: HttpInfo | None = None
    """HTTP details; None unless app is http or the flow is an HTTP CONNECT tunnel."""
    ssh: SshInfo | None = None
    """SSH details; None unless app is ssh."""
    stratum: StratumInfo | None = None
    """Stratum details; None unless app is stratum."""
    dns: DnsInfo | None = None
    """DNS queries and answers; None unless app is dns."""
    quic: QuicInfo | None = None
    """QUIC details; None unless app is quic."""
    tunnel: Tunnel | None = None
    """The inner target of an HTTP CONNECT or SOCKS tunnel; None when the flow is none.
    ``app`` and its sub-record then describe the tunnelled protocol."""
    bytes_out: int = 0
    """IP bytes the initiator sent (as conntrack counts them)."""
    bytes_in: int = 0
    """IP bytes the responder sent."""
    packets_out: int = 0
    """Packets the initiator sent; live, offload can make them fewer than a capture."""
    packets_in: int = 0
    """Packets the responder sent."""
    verdict: Verdict | None = None
    """allow, flag or block; None before the judge decided."""
    decided_at: Step | None = None
    """The step at which the current verdict was reached."""
    action: Action | None = None
    """What the kernel did; None in replay."""
    rule: str | None = None
    """The allow rule that matched, as text; None when none did."""
    findings: list[Finding] = field(default_factory=list)
    """Findings on this flow, in the order raised."""
    process: ProcessInfo | None = None
    """The owning process; None where unknown."""
    observation: Observation | None = field(default=None, compare=False, repr=False,
                                            metadata={"transient": True})
    """What detectors may look at beyond the record (not part of the JSON or the store)."""

    def to_json(self) -> dict:
        out = {"schema": SCHEMA, "kind": "flow"}
        out.update(_encode(self))
        return out

    def to_checked_json(self) -> dict:
        """``to_json``, refusing any value strict reading would refuse (RecordError names it):
        what our own store writes must read back."""
        out = {"schema": SCHEMA, "kind": "flow"}
        out.update(_plan(FlowRecord).encode_checked(self, "flow"))
        self.check()            # ranges, once the types are known to be right
        return out

    @classmethod
    def from_json(cls, data: typing.Any, *, strict: bool = False) -> "FlowRecord":
        record = _read_top(cls, data, "flow", strict)
        record.check()
        return record

    def check(self) -> None:
        """Refuse values no flow can have (RecordError naming the field)."""
        def bad(name, why):
            raise RecordError(f"flow.{name}: {why}")
        if self.event not in ("interim", "final"):
            bad("event", f"{self.event!r} is not interim or final")
        if self.ip_version not in (4, 6):
            bad("ip_version", f"{self.ip_version} is not 4 or 6")
        if self.direction not in ("outbound", "inbound"):
            bad("direction", f"{self.direction!r} is not outbound or inbound")
        if self.observed not in OBSERVED:
            bad("observed", f"{self.observed!r} is not one of {', '.join(OBSERVED)}")
        for name in ("sport", "dport"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                bad(name, f"{port} is not a port")
        for name in ("bytes_out", "bytes_in", "packets_out", "packets_in"):
            value = getattr(self, name)
            if not 0 <= value < 2 ** 63:
                bad(name, f"{value} is not a count")
        if self.end is not None and self.end < self.start:
            bad("end", "before start")


@dataclass(kw_only=True)
class TaskEvent:
    """A finding or happening that belongs to a task rather than one flow."""

    task: str | None
    """The task; None for host-wide events (events-lost of an untagged source)."""
    time: int = _time()
    """When it happened, microseconds since the epoch (UTC)."""
    event: str
    """task-started, task-ended, task-killed (``--kill-on``: the findings that ended it),
    dns-refused, dns-tunnel, budget-exceeded, events-lost."""
    findings: list[Finding] = field(default_factory=list)
    """The findings of the event (none for task-started and task-ended)."""

    def to_json(self) -> dict:
        out = {"schema": SCHEMA, "kind": "task-event"}
        out.update(_encode(self))
        return out

    @classmethod
    def from_json(cls, data: typing.Any, *, strict: bool = False) -> "TaskEvent":
        return _read_top(cls, data, "task-event", strict)


@dataclass(frozen=True)
class NameBinding:
    """A DNS answer seen by a task: a name bound to an address from ``time`` on."""

    task: str | None
    """The task that resolved the name."""
    name: str
    """A name of the answer's chain (the query name or a CNAME target)."""
    address: str
    """An address of the answer."""
    ttl: int
    """The answer's TTL in seconds."""
    time: int
    """When the answer was seen, microseconds since the epoch."""
    flow_id: str | None = None
    """The DNS flow that carried the answer; None when not recorded as a flow."""
    resolver: str | None = None
    """The address of the resolver that answered; None when not known."""
    resolver_port: int | None = None
    """The port the resolver answered from; None when not known."""


OBSERVED = ("full", "first-packets", "first-packets+watch", "conntrack-only")

TASK_EVENTS = ("task-started", "task-ended", "task-killed", "dns-refused", "dns-tunnel",
               "budget-exceeded", "events-lost")


def read_record(data: typing.Any, *, strict: bool = False) -> FlowRecord | TaskEvent:
    """A flow record or task event from its JSON object, by its ``kind``."""
    if not isinstance(data, dict):
        raise RecordError("record: expected a JSON object")
    kind = data.get("kind")
    if kind == "flow":
        return FlowRecord.from_json(data, strict=strict)
    if kind == "task-event":
        return TaskEvent.from_json(data, strict=strict)
    raise RecordError(f"kind: expected 'flow' or 'task-event', not {kind!r}")


# --------------------------------------------------------------------------
# Times


def format_time(us: int) -> str:
    """Microseconds since the epoch as ISO 8601 UTC with ``Z``."""
    seconds, micro = divmod(us, 1_000_000)
    return _clock.strftime("%Y-%m-%dT%H:%M:%S", _clock.gmtime(seconds)) + f".{micro:06d}Z"


def parse_time(text: str) -> int:
    """ISO 8601 (a zone required, ``Z`` or an offset) to microseconds since the epoch."""
    try:
        t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except (ValueError, AttributeError):
        raise RecordError(f"not an ISO 8601 time: {text!r}") from None
    if t.tzinfo is None:
        raise RecordError(f"time without a zone (add Z for UTC): {text!r}")
    delta = t - _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


# --------------------------------------------------------------------------
# Encoding of the dataclasses above: one plan per class, built once.
#
# Flow records are written and read in bulk (a replay writes thousands a second),
# so each class's fields are turned once into a list of small converter
# functions, instead of inspecting types for every value.


def _identity(v, strict=False, where=""):
    return v


def _encoder(tp) -> typing.Callable | None:
    """A function turning a value of type ``tp`` into JSON data, or None for 'as is'."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = _encoder([a for a in typing.get_args(tp) if a is not type(None)][0])
        return None if inner is None else (lambda v: None if v is None else inner(v))
    if origin is list:
        (item,) = typing.get_args(tp)
        inner = _encoder(item)
        return list if inner is None else (lambda v: [inner(x) for x in v])
    if tp is Finding:
        return Finding.to_json
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return lambda v: v.value if isinstance(v, enum.Enum) else v
    if dataclasses.is_dataclass(tp):
        return lambda v: _plan(type(v)).encode(v)
    if tp is typing.Any:
        return lambda v: _plan(type(v)).encode(v) if dataclasses.is_dataclass(v) else v
    return None


def _decoder(tp) -> typing.Callable:
    """A function ``(value, strict, where)`` checking JSON data against ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = _decoder([a for a in typing.get_args(tp) if a is not type(None)][0])
        return lambda v, strict, where: None if v is None else inner(v, strict, where)

    def not_null(v, where):
        if v is None:
            raise RecordError(f"{where}: must not be null")

    if origin is list:
        (item,) = typing.get_args(tp)
        inner = _decoder(item)

        def decode_list(v, strict, where):
            if not isinstance(v, list):
                not_null(v, where)
                raise RecordError(f"{where}: expected a list")
            return [inner(x, strict, f"{where}[{i}]") for i, x in enumerate(v)]
        return decode_list
    if tp is Finding:
        def decode_finding(v, strict, where):
            not_null(v, where)
            return Finding.from_json(v, strict=strict, where=where)
        return decode_finding
    if tp is typing.Any:
        return _identity
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        members = {m.value: m for m in tp}
        choices = ", ".join(members)

        def decode_enum(v, strict, where):
            try:
                return members[v]
            except (KeyError, TypeError):
                not_null(v, where)
                raise RecordError(f"{where}: {v!r} is not one of {choices}") from None
        return decode_enum
    if dataclasses.is_dataclass(tp):
        return lambda v, strict, where: _plan(tp).decode(v, strict, where)
    if tp is float:
        def decode_float(v, strict, where):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                not_null(v, where)
                raise RecordError(f"{where}: expected a number")
            return float(v)
        return decode_float

    def decode_plain(v, strict, where):
        if type(v) is not tp and (not isinstance(v, tp) or isinstance(v, bool) and tp is int):
            not_null(v, where)
            raise RecordError(f"{where}: expected {tp.__name__}, not {type(v).__name__}")
        return v
    return decode_plain


def _checker(tp) -> typing.Callable:
    """A function ``(value, where)`` that raises RecordError unless the value fits ``tp``
    (what decoding would accept), then returns its JSON form: checking while encoding."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = _checker([a for a in typing.get_args(tp) if a is not type(None)][0])
        return lambda v, where: None if v is None else inner(v, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        inner = _checker(item)

        def check_list(v, where):
            if not isinstance(v, list):
                raise RecordError(f"{where}: expected a list")
            return [inner(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return check_list
    if tp is Finding:
        def check_finding(v, where):
            if not isinstance(v, Finding):
                raise RecordError(f"{where}: expected a finding")
            return v.to_checked_json(where)
        return check_finding
    if tp is typing.Any:
        return lambda v, where: _encode(v)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        members = {m.value: m for m in tp}

        def check_enum(v, where):
            value = v.value if isinstance(v, enum.Enum) else v
            if value not in members or (isinstance(v, enum.Enum) and not isinstance(v, tp)):
                raise RecordError(f"{where}: {v!r} is not one of {', '.join(members)}")
            return value
        return check_enum
    if dataclasses.is_dataclass(tp):
        def check_dataclass(v, where):
            if not isinstance(v, tp):
                raise RecordError(f"{where}: expected {tp.__name__}")
            return _plan(tp).encode_checked(v, where)
        return check_dataclass
    if tp is float:
        def check_float(v, where):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RecordError(f"{where}: expected a number")
            return v
        return check_float

    def check_plain(v, where):
        if not isinstance(v, tp) or (tp is int and isinstance(v, bool)):
            raise RecordError(f"{where}: expected {tp.__name__}, not {type(v).__name__}")
        return v
    return check_plain


def _check_time(optional: bool):
    def check_time(v, where):
        if v is None:
            if optional:
                return None
            raise RecordError(f"{where}: must not be null")
        if isinstance(v, bool) or not isinstance(v, int):
            raise RecordError(f"{where}: expected integer microseconds")
        return format_time(v)
    return check_time


def _time_decoder(optional: bool):
    def decode_time(v, strict, where):
        if v is None:
            if optional:
                return None
            raise RecordError(f"{where}: must not be null")
        if not isinstance(v, str):
            raise RecordError(f"{where}: expected an ISO 8601 time")
        try:
            return parse_time(v)
        except RecordError as e:
            raise RecordError(f"{where}: {e}") from None
    return decode_time


class _Plan:
    """How one dataclass becomes JSON and back."""

    def __init__(self, cls: type):
        hints = typing.get_type_hints(cls)
        self.cls = cls
        self.names = frozenset(f.name for f in contract_fields(cls))
        self.fields = []          # (name, encoder or None, decoder, required)
        self.checkers = []        # (name, checking encoder)
        for f in contract_fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if f.metadata.get("time"):
                optional = typing.get_origin(hints[f.name]) in (typing.Union, types.UnionType)
                enc = (lambda v: None if v is None else format_time(v))
                dec = _time_decoder(optional)
                chk = _check_time(optional)
            else:
                enc, dec = _encoder(hints[f.name]), _decoder(hints[f.name])
                chk = _checker(hints[f.name])
            self.fields.append((f.name, enc, dec, required))
            self.checkers.append((f.name, chk))

    def encode(self, value) -> dict:
        out = {}
        for name, enc, _, _ in self.fields:
            v = getattr(value, name)
            out[name] = v if enc is None else enc(v)
        return out

    def encode_checked(self, value, where: str) -> dict:
        """JSON of ``value``, refusing any field a strict decode would refuse."""
        return {name: chk(getattr(value, name), f"{where}.{name}") for name, chk in self.checkers}

    def decode(self, data, strict: bool, where: str):
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected an object")
        if strict:
            _check_keys(data, self.names, strict, where)
        kwargs = {}
        for name, _, dec, required in self.fields:
            if name in data:
                kwargs[name] = dec(data[name], strict, f"{where}.{name}")
            elif required:
                raise RecordError(f"{where}.{name}: missing")
        return self.cls(**kwargs)


def contract_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a record class that are part of its JSON (not the transient ones)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("transient")]


_PLANS: dict[type, _Plan] = {}


def _plan(cls: type) -> _Plan:
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = _Plan(cls)
    return plan


def _encode(value: typing.Any) -> typing.Any:
    if isinstance(value, Finding):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plan(type(value)).encode(value)
    return value


def _decode(tp: typing.Any, value: typing.Any, strict: bool, where: str) -> typing.Any:
    return _decoder(tp)(value, strict, where)


def _check_keys(data: dict, known, strict: bool, where: str) -> None:
    if strict:
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise RecordError(f"{where}: unknown field {unknown[0]!r}")


def _read_top(cls: type, data: typing.Any, kind: str, strict: bool):
    if not isinstance(data, dict):
        raise RecordError(f"{kind}: expected a JSON object")
    if data.get("kind") != kind:
        raise RecordError(f"kind: expected {kind!r}, not {data.get('kind')!r}")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise RecordError(f"schema: this reader knows schema {SCHEMA}, not {schema!r}")
    body = {k: v for k, v in data.items() if k not in ("schema", "kind")}
    return _plan(cls).decode(body, strict, kind)


_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def new_flow_id() -> str:
    """A fresh flow id: ``f-`` and 8 random base62 characters (47 bits)."""
    import secrets
    return "f-" + "".join(secrets.choice(_BASE62) for _ in range(8))


def stable_flow_id(*identity) -> str:
    """A flow id derived from what identifies the flow (its tuple and first packet's time).

    Replaying the same capture again gives the same ids, so a second replay
    into a store supersedes the first instead of doubling every flow.
    """
    import hashlib
    n = int.from_bytes(hashlib.sha256("|".join(map(str, identity)).encode()).digest()[:8], "big")
    chars = []
    for _ in range(8):
        n, r = divmod(n, 62)
        chars.append(_BASE62[r])
    return "f-" + "".join(chars)
