"""dns-tunnel: a task's DNS queries shaped like a tunnel (iodine, dnscat2, dns2tcp, ...).

A DNS tunnel carries its payload in the query names, encoded (base32, hex,
base64, base128) into labels under one domain whose name server is the far
end; answers carry the way back in NULL, TXT, private or CNAME/MX records.
No single query proves it, so this is a task detector: it sees each ended
DNS flow of a task once, groups the query names by their registrable domain
and looks, per task and domain, at the names of the last ``WINDOW_S``
seconds (by flow start). It raises one ``dns-tunnel`` task event per task
and domain, the first time the window's shape says tunnel:

- many distinct names, most of them payload-shaped (a long label, or labels
  of high entropy), or
- NULL or private-use query types for a few distinct payload-shaped names, or
- TXT queries for many distinct payload-shaped names.

The entropy of one label of 16 to 40 characters says little by itself (a
readable host name of 30 characters scores like base32 of that length), so
it never fires alone: it needs many distinct names or an odd query type.

Names are read as the DNS identifier renders them (lower case, dig's
``\\DDD`` escapes), and the escapes are undone, so label lengths and
entropies are those of the bytes on the wire.

State is bounded: at most ``MAX_TASKS`` tasks, ``MAX_DOMAINS_PER_TASK``
domains per task (least recently queried dropped first), and per domain only
the window's queries (at most ``MAX_QUERIES_PER_DOMAIN``). A domain that has
fired is remembered (bounded too) and no longer counted.
"""

from __future__ import annotations

import math
import re
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Iterable

from egress.detectors import Context, Window
from egress.identify import MAX_DNS_QUERIES
from egress.records import DnsTunnelEvidence, Finding, FlowRecord, TaskEvent

# --------------------------------------------------------------------------
# Thresholds

WINDOW_S = 60
"""Seconds of queries looked at together: a tunnel moves data every second; a minute
holds hundreds of its names, while a task's ordinary lookups of one domain stay few."""
WINDOW_US = WINDOW_S * 1_000_000

MANY_NAMES = 30
"""Distinct names under one domain in the window: a tunnel needs a fresh name per
packet; a build or install rarely resolves 30 hosts of one domain in a minute."""
PAYLOAD_SHARE = 0.5
"""Of those, the share that must be payload-shaped: a tunnel's names nearly all carry
data; one long legitimate name among many short hosts is not a tunnel."""
LONG_LABEL = 40
"""Bytes in a label that make a name payload-shaped: encoders fill labels towards the
63-byte limit (iodine 57, dnscat2 and dns2tcp 63); host names rarely pass 40."""
MIN_ENTROPY_LABEL = 16
"""Shortest label whose entropy is counted: a label of n bytes scores at most log2(n)
bits per byte, so shorter ones (CDN hashes, host names) say nothing."""
HIGH_ENTROPY = 3.5
"""Mean bits per byte, over a name's labels of at least MIN_ENTROPY_LABEL, that make it
payload-shaped: random base32/base64 of 16 bytes averages 3.6, and more when longer."""
MIN_ODD_TYPE_NAMES = 3
"""Distinct payload-shaped names asked with NULL or a private-use type: these types have
no everyday use, so a few suffice; one alone may be a stray probe."""
MANY_TXT = 10
"""Distinct payload-shaped names asked with TXT: DKIM, DMARC and SPF lookups are a few
short names per domain; a tunnel answers in TXT for every packet."""

PRIVATE_TYPES = range(65280, 65535)
"""RFC 6895's private-use query types (65280-65534), rendered ``TYPE65280`` and up."""

# --------------------------------------------------------------------------
# Bounds

MAX_TASKS = 1024
"""Tasks tracked at once; the least recently seen is dropped (a shared host's old tasks)."""
MAX_DOMAINS_PER_TASK = 256
"""Domains tracked per task; the least recently queried is dropped first."""
MAX_QUERIES_PER_DOMAIN = 512
"""Queries kept per domain's window; far above every threshold, so dropping the oldest
past it changes no decision, only caps the memory a flood can take."""
MAX_FIRED_PER_TASK = 256
"""Domains remembered per task as already raised (never raised twice while remembered)."""

REVERSE_ZONES = ((b"in-addr", b"arpa"), (b"ip6", b"arpa"))
"""Reverse lookups: many distinct names by nature (one per address), never a tunnel's."""

# Second-level labels under which registrations happen one level deeper (co.uk, com.au).
# A small list of the common ones: the full Public Suffix List is not shipped, so a
# rarer suffix groups its sites together, which can only add names to one domain.
TWO_LABEL_SUFFIXES = frozenset((sld.encode(), tld.encode()) for sld, tld in (
    s.split(".") for s in (
        "co.uk org.uk ac.uk gov.uk me.uk net.uk ltd.uk plc.uk "
        "com.au net.au org.au edu.au gov.au id.au "
        "co.nz net.nz org.nz govt.nz ac.nz "
        "co.jp ne.jp or.jp ac.jp go.jp "
        "co.kr or.kr ac.kr "
        "co.in net.in org.in ac.in gov.in "
        "co.za org.za ac.za gov.za "
        "com.br net.br org.br gov.br "
        "com.cn net.cn org.cn gov.cn edu.cn "
        "com.tw org.tw edu.tw com.hk org.hk edu.hk "
        "com.sg edu.sg com.my com.mx org.mx com.ar com.tr org.tr "
        "co.il org.il ac.il co.id or.id ac.id com.ua co.th ac.th "
        "com.pl net.pl org.pl com.ru").split()))


class DnsTunnel:
    """Raises ``dns-tunnel`` once per task and domain whose query names look like a tunnel."""

    name = "dns-tunnel"
    window = Window(packets=MAX_DNS_QUERIES, bytes=MAX_DNS_QUERIES * 512)
    """Every query a DNS flow's record keeps (identify keeps at most MAX_DNS_QUERIES), each
    within 512 bytes: the questions are all this detector reads."""

    def __init__(self) -> None:
        self._tasks: OrderedDict[str | None, _TaskState] = OrderedDict()

    def observe(self, flow: FlowRecord, ctx: Context) -> Iterable[TaskEvent]:
        if flow.dns is None or not flow.dns.queries:
            return []
        state = self._task(flow.task)
        touched: dict[str, _DomainWindow] = {}
        for query in flow.dns.queries:
            labels = wire_labels(query.name)
            if not labels or _reverse(labels):
                continue
            cut = len(labels) - domain_label_count(labels)
            domain = render(labels[cut:])
            if domain in state.fired:
                continue
            window = state.window(domain)
            if window.add(_seen(flow.start, query.name.lower(), query.type, labels[:cut])):
                touched[domain] = window
        events = []
        for domain, window in touched.items():
            evidence = window.tunnel_shape(domain)
            if evidence is None:
                continue
            state.fire(domain)
            events.append(TaskEvent(task=flow.task,
                                    time=flow.end if flow.end is not None else flow.start,
                                    event="dns-tunnel",
                                    findings=[Finding.make("dns-tunnel", evidence)]))
        return events

    # ------------------------------------------------------------ state

    def tracked_tasks(self) -> int:
        """Tasks with state kept (bounded by MAX_TASKS)."""
        return len(self._tasks)

    def tracked_domains(self, task: str | None) -> int:
        """Domains whose window is kept for ``task`` (bounded by MAX_DOMAINS_PER_TASK)."""
        state = self._tasks.get(task)
        return len(state.domains) if state else 0

    def tracked_queries(self, task: str | None) -> int:
        """Queries kept in all of ``task``'s windows."""
        state = self._tasks.get(task)
        return sum(len(w.seen) for w in state.domains.values()) if state else 0

    def _task(self, task: str | None) -> "_TaskState":
        state = self._tasks.get(task)
        if state is None:
            state = self._tasks[task] = _TaskState()
            if len(self._tasks) > MAX_TASKS:
                self._tasks.popitem(last=False)
        else:
            self._tasks.move_to_end(task)
        return state


# --------------------------------------------------------------------------
# Per task and domain


@dataclass(frozen=True, slots=True)
class _Seen:
    """One query as the window keeps it."""

    time: int
    """The flow's start, microseconds since the epoch."""
    name: str
    qtype: str
    longest: int
    """The longest label below the domain, in bytes (0 when none)."""
    entropies: tuple[float, ...]
    """Entropy of each label below the domain of at least MIN_ENTROPY_LABEL bytes."""
    payload: bool
    """A long label, or high mean entropy over its long-enough labels."""


def _seen(time: int, name: str, qtype: str, below: list[bytes]) -> _Seen:
    longest = max((len(label) for label in below), default=0)
    entropies = tuple(entropy(label) for label in below if len(label) >= MIN_ENTROPY_LABEL)
    payload = longest >= LONG_LABEL or bool(
        entropies and sum(entropies) / len(entropies) >= HIGH_ENTROPY)
    return _Seen(time, name, qtype.upper(), longest, entropies, payload)


class _DomainWindow:
    """The queries of one domain in the last WINDOW_S seconds (by flow start)."""

    __slots__ = ("seen", "newest")

    def __init__(self) -> None:
        self.seen: deque[_Seen] = deque(maxlen=MAX_QUERIES_PER_DOMAIN)
        self.newest: int | None = None

    def add(self, seen: _Seen) -> bool:
        """Keep ``seen`` and slide; False when it is older than the window already is."""
        if self.newest is not None and seen.time < self.newest - WINDOW_US:
            return False   # flows arrive roughly in order; a straggler this late is not counted
        self.seen.append(seen)
        self.newest = seen.time if self.newest is None else max(self.newest, seen.time)
        start = self.newest - WINDOW_US
        while self.seen and self.seen[0].time < start:
            self.seen.popleft()
        return True

    def tunnel_shape(self, domain: str) -> DnsTunnelEvidence | None:
        """The evidence when the window looks like a tunnel, else None."""
        # Cheap first: every rule needs a few payload-shaped names in the window.
        if sum(1 for s in self.seen if s.payload) < MIN_PAYLOAD_NAMES:
            return None
        seen = [s for s in self.seen if s.time >= self.newest - WINDOW_US]  # stragglers too
        names = {s.name for s in seen}
        payload = {s.name for s in seen if s.payload}
        odd = {s.name for s in seen if s.payload and _odd_type(s.qtype)}
        txt = {s.name for s in seen if s.payload and s.qtype == "TXT"}
        many = len(names) >= MANY_NAMES and len(payload) >= PAYLOAD_SHARE * len(names)
        if not (many or len(odd) >= MIN_ODD_TYPE_NAMES or len(txt) >= MANY_TXT):
            return None
        entropies = [e for s in seen for e in s.entropies]
        return DnsTunnelEvidence(
            domain=domain, distinct_names=len(names), window_s=float(WINDOW_S),
            max_label_length=max(s.longest for s in seen),
            entropy=round(sum(entropies) / len(entropies), 2) if entropies else None,
            qtypes=sorted({s.qtype for s in seen}))


class _TaskState:
    __slots__ = ("domains", "fired")

    def __init__(self) -> None:
        self.domains: OrderedDict[str, _DomainWindow] = OrderedDict()
        self.fired: OrderedDict[str, None] = OrderedDict()

    def window(self, domain: str) -> _DomainWindow:
        window = self.domains.get(domain)
        if window is None:
            window = self.domains[domain] = _DomainWindow()
            if len(self.domains) > MAX_DOMAINS_PER_TASK:
                self.domains.popitem(last=False)
        else:
            self.domains.move_to_end(domain)
        return window

    def fire(self, domain: str) -> None:
        self.domains.pop(domain, None)   # raised once: its window is no longer needed
        self.fired[domain] = None
        if len(self.fired) > MAX_FIRED_PER_TASK:
            self.fired.popitem(last=False)


# --------------------------------------------------------------------------
# Names

_DIGITS = frozenset("0123456789")
_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
_PRIVATE = re.compile(r"TYPE(\d{1,5})")
# dig's rendering, as egress.identify.dns writes names (to print a domain back).
_SPECIAL = b'.\\"();@$'
_ESCAPED = tuple("\\" + chr(b) if b in _SPECIAL
                 else chr(b) if 0x21 <= b <= 0x7E
                 else f"\\{b:03d}" for b in range(256))


def wire_labels(name: str) -> list[bytes]:
    """The labels of a rendered name as bytes (dig's ``\\DDD`` and ``\\X`` undone), lower case.

    Empty labels (the root, a trailing dot) are dropped.
    """
    if "\\" not in name:
        return [label.encode("utf-8", "replace").translate(_LOWER)
                for label in name.split(".") if label]
    labels: list[bytes] = []
    label = bytearray()
    i, n = 0, len(name)
    while i < n:
        ch = name[i]
        if ch == "\\" and i + 1 < n:
            digits = name[i + 1:i + 4]
            if len(digits) == 3 and all(d in _DIGITS for d in digits):
                label.append(min(int(digits), 255))
                i += 4
            else:
                label += name[i + 1].encode("utf-8", "replace")
                i += 2
            continue
        if ch == ".":
            if label:
                labels.append(bytes(label).translate(_LOWER))
            label = bytearray()
        else:
            label += ch.encode("utf-8", "replace")
        i += 1
    if label:
        labels.append(bytes(label).translate(_LOWER))
    return labels


def domain_label_count(labels: list[bytes]) -> int:
    """How many of the last labels make the registrable domain (2, or 3 under co.uk and
    the like; all of them for a shorter name)."""
    if len(labels) >= 3 and (labels[-2], labels[-1]) in TWO_LABEL_SUFFIXES:
        return 3
    return min(2, len(labels))


def render(labels: list[bytes]) -> str:
    """Labels written back the way the DNS identifier writes a name."""
    return ".".join("".join(_ESCAPED[b] for b in label) for label in labels)


def entropy(label: bytes) -> float:
    """Shannon entropy of a label's bytes, in bits per byte."""
    n = len(label)
    if not n:
        return 0.0
    return -sum(c / n * math.log2(c / n) for c in Counter(label).values())


def _reverse(labels: list[bytes]) -> bool:
    return len(labels) >= 2 and (labels[-2], labels[-1]) in REVERSE_ZONES


MIN_PAYLOAD_NAMES = min(MIN_ODD_TYPE_NAMES, MANY_TXT, int(PAYLOAD_SHARE * MANY_NAMES))
"""No rule fires with fewer payload-shaped names in the window than this."""


def _odd_type(qtype: str) -> bool:
    if qtype == "NULL":
        return True
    m = _PRIVATE.fullmatch(qtype)
    return m is not None and int(m.group(1)) in PRIVATE_TYPES
