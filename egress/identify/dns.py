"""DNS messages from payload bytes: RFC 1035, AAAA (RFC 3596), EDNS (RFC 6891).

Identification by content, never by port: ``message`` returns a message only
when the bytes are exactly one well-formed DNS message, and ``None`` for
anything else. It never raises on arbitrary bytes. Strict where real
resolvers are strict:

- header: opcode QUERY, NOTIFY or UPDATE; one question (none only in a
  response with an error or with EDNS, as RFC 7873 cookies allow); section
  counts that fit the bytes present; no bytes after the last record.
- names: labels of at most 63 bytes, 255 bytes in all, no extended label
  types; compression pointers must point before the run of labels they
  appear in and never into the header, so every jump goes strictly backwards
  and a pointer loop cannot exist; the number of jumps is bounded as well.
- records: rdata that fits its length and its type (an A record is 4 bytes,
  a CNAME one name, a TXT a sequence of strings); one OPT record at most, in
  the additional section, owned by the root.

Names are lower-cased (ASCII only), without the trailing dot (the root is
``"."``), and escaped like dig prints them: ``\\.`` for a dot inside a label,
``\\DDD`` for bytes outside printable ASCII, so that a tunnel detector still
sees every byte of a label.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from egress.records import DnsQuery

# --------------------------------------------------------------------------
# Names of codes

TYPE_NAMES: dict[int, str] = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 10: "NULL", 12: "PTR", 13: "HINFO",
    15: "MX", 16: "TXT", 17: "RP", 18: "AFSDB", 24: "SIG", 25: "KEY", 28: "AAAA",
    29: "LOC", 33: "SRV", 35: "NAPTR", 36: "KX", 37: "CERT", 39: "DNAME", 41: "OPT",
    42: "APL", 43: "DS", 44: "SSHFP", 45: "IPSECKEY", 46: "RRSIG", 47: "NSEC",
    48: "DNSKEY", 49: "DHCID", 50: "NSEC3", 51: "NSEC3PARAM", 52: "TLSA",
    53: "SMIMEA", 55: "HIP", 59: "CDS", 60: "CDNSKEY", 61: "OPENPGPKEY",
    62: "CSYNC", 63: "ZONEMD", 64: "SVCB", 65: "HTTPS", 99: "SPF", 108: "EUI48",
    109: "EUI64", 249: "TKEY", 250: "TSIG", 251: "IXFR", 252: "AXFR", 253: "MAILB",
    254: "MAILA", 255: "ANY", 256: "URI", 257: "CAA",
}
"""Record types by number; others are named ``TYPE<n>`` (RFC 3597)."""

CLASS_NAMES: dict[int, str] = {1: "IN", 3: "CH", 4: "HS", 254: "NONE", 255: "ANY"}
"""Classes by number; others are named ``CLASS<n>`` (RFC 3597)."""

RCODE_NAMES: dict[int, str] = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
    5: "REFUSED", 6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH",
    10: "NOTZONE", 11: "DSOTYPENI", 16: "BADVERS", 17: "BADKEY", 18: "BADTIME",
    19: "BADMODE", 20: "BADNAME", 21: "BADALG", 22: "BADTRUNC", 23: "BADCOOKIE",
}
"""Response codes (with the EDNS extension); others are named ``RCODE<n>``."""

OPCODE_NAMES: dict[int, str] = {0: "QUERY", 4: "NOTIFY", 5: "UPDATE"}
"""The opcodes a message may carry; IQUERY (obsolete), STATUS and DSO are refused."""

QUERY, NOTIFY, UPDATE = 0, 4, 5

_TYPE_A, _TYPE_NS, _TYPE_CNAME, _TYPE_SOA = 1, 2, 5, 6
_TYPE_PTR, _TYPE_MX, _TYPE_TXT, _TYPE_AAAA = 12, 15, 16, 28
_TYPE_SRV, _TYPE_DNAME, _TYPE_OPT, _TYPE_SPF = 33, 39, 41, 99
_NAME_TYPES = frozenset({_TYPE_NS, _TYPE_CNAME, _TYPE_PTR, _TYPE_DNAME,
                         3, 4, 7, 8, 9})  # MD, MF, MB, MG, MR: obsolete, one name each

HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")
_QUESTION_FIXED = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_SOA_TAIL = struct.Struct("!IIIII")
_SRV_HEAD = struct.Struct("!HHH")

MAX_NAME_WIRE = 255
"""RFC 1035: a name is at most 255 bytes on the wire."""
MAX_LABEL = 63
MAX_JUMPS = 127
"""Compression jumps followed in one name; each goes strictly backwards anyway."""

_FLAG_BITS = (("qr", 0x8000), ("aa", 0x0400), ("tc", 0x0200), ("rd", 0x0100),
              ("ra", 0x0080), ("z", 0x0040), ("ad", 0x0020), ("cd", 0x0010))


def type_name(code: int) -> str:
    """A record type's mnemonic, or ``TYPE<n>``."""
    return TYPE_NAMES.get(code) or f"TYPE{code}"


def class_name(code: int) -> str:
    """A class's mnemonic, or ``CLASS<n>``."""
    return CLASS_NAMES.get(code) or f"CLASS{code}"


def rcode_name(code: int) -> str:
    """A response code's name, or ``RCODE<n>``."""
    return RCODE_NAMES.get(code) or f"RCODE{code}"


# --------------------------------------------------------------------------
# The message


@dataclass(frozen=True, slots=True, kw_only=True)
class Question:
    name: str
    """The name asked for: lower case, no trailing dot, dig escapes (root is ``.``)."""
    qtype: str
    """The query type's mnemonic (A, AAAA, TXT, NULL, HTTPS, ...) or ``TYPE<n>``."""
    qclass: str
    """The class (IN, CH, ...) or ``CLASS<n>``; mDNS's unicast bit makes ``CLASS32769``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    name: str
    """The owner name, written like ``Question.name``."""
    type: str
    """The record type's mnemonic or ``TYPE<n>``."""
    rclass: str
    """The class (IN, ...) or ``CLASS<n>``."""
    ttl: int
    """Seconds; a TTL with the top bit set counts as 0 (RFC 2181)."""
    data: str
    """A/AAAA: the address; CNAME/DNAME/NS/PTR: the target name; TXT/SPF: each
    string in double quotes, dig style; MX ``pref name``; SRV ``prio weight port
    name``; SOA ``mname rname serial refresh retry expire minimum``; others: hex
    (``""`` for empty rdata)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Edns:
    udp_size: int
    """The requestor's UDP payload size (the OPT record's class)."""
    version: int
    """The EDNS version (0 today)."""
    dnssec_ok: bool
    """The DO bit."""
    options: tuple[int, ...]
    """Option codes in order (10 cookie, 12 padding, 8 client subnet, ...)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsMessage:
    id: int
    """The transaction id."""
    is_response: bool
    """The QR bit."""
    opcode: int
    """0 QUERY, 4 NOTIFY or 5 UPDATE (``OPCODE_NAMES``)."""
    rcode: str
    """NOERROR, NXDOMAIN, ...; with EDNS the extended code (BADVERS, BADCOOKIE)."""
    flags: tuple[str, ...]
    """Set header flags, dig's names and order: qr aa tc rd ra z ad cd."""
    questions: tuple[Question, ...]
    """The question section (for UPDATE: the zone)."""
    answers: tuple[Record, ...]
    """The answer section in order (UPDATE: prerequisites)."""
    authorities: tuple[Record, ...]
    """The authority section (UPDATE: the updates)."""
    additionals: tuple[Record, ...]
    """The additional section without the OPT record."""
    edns: Edns | None
    """The OPT record's contents; None without EDNS."""
    size: int
    """Bytes of the message (without a TCP length prefix)."""

    @property
    def question(self) -> Question | None:
        """The first question; None when the message has none."""
        return self.questions[0] if self.questions else None

    @property
    def truncated(self) -> bool:
        """The TC bit: a UDP answer cut short; the full one comes over TCP."""
        return "tc" in self.flags


class _Malformed(Exception):
    """Internal: the bytes are not a well-formed message."""


# --------------------------------------------------------------------------
# Names

# dig's escapes: the label separator and master-file specials get a backslash,
# anything outside printable ASCII its decimal value.
_SPECIAL = b'.\\"();@$'
_ESCAPED = tuple("\\" + chr(b) if b in _SPECIAL
                 else chr(b) if 0x21 <= b <= 0x7E
                 else f"\\{b:03d}" for b in range(256))
_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
_PLAIN = bytes(b for b in range(0x21, 0x7F) if b not in _SPECIAL)


def _label_text(label: bytes) -> str:
    label = label.translate(_LOWER)
    if not label.translate(None, _PLAIN):
        return label.decode("ascii")
    return "".join(_ESCAPED[b] for b in label)


def _read_name(data: bytes, pos: int) -> tuple[str, int]:
    """The name at ``pos`` and the position after it in the message."""
    labels = []
    wire = 1  # the root's zero byte
    jumps = 0
    end = -1
    run_start = pos  # a pointer must point before the run it appears in
    n = len(data)
    while True:
        if pos >= n:
            raise _Malformed("name runs past the end")
        length = data[pos]
        if length == 0:
            if end < 0:
                end = pos + 1
            break
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= n:
                raise _Malformed("pointer cut short")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if end < 0:
                end = pos + 2
            if target < HEADER.size or target >= run_start:
                raise _Malformed("compression pointer not backwards")
            jumps += 1
            if jumps > MAX_JUMPS:
                raise _Malformed("too many compression jumps")
            pos = run_start = target
            continue
        if kind:
            raise _Malformed("extended label type")
        stop = pos + 1 + length
        if stop > n:
            raise _Malformed("label runs past the end")
        wire += length + 1
        if wire > MAX_NAME_WIRE:
            raise _Malformed("name longer than 255 bytes")
        labels.append(_label_text(data[pos + 1:stop]))
        pos = stop
    return (".".join(labels) if labels else "."), end


# --------------------------------------------------------------------------
# Records


def _quoted(raw: bytes) -> str:
    out = []
    for b in raw:
        if b == 0x22 or b == 0x5C:
            out.append("\\" + chr(b))
        elif 0x20 <= b <= 0x7E:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return '"' + "".join(out) + '"'


def _rdata_text(data: bytes, rtype: int, start: int, end: int) -> str:
    rdata = data[start:end]
    if rtype == _TYPE_A:
        if len(rdata) != 4:
            raise _Malformed("A record not 4 bytes")
        return socket.inet_ntop(socket.AF_INET, rdata)
    if rtype == _TYPE_AAAA:
        if len(rdata) != 16:
            raise _Malformed("AAAA record not 16 bytes")
        return socket.inet_ntop(socket.AF_INET6, rdata)
    if rtype in _NAME_TYPES:
        name, after = _read_name(data, start)
        if after != end:
            raise _Malformed("name does not fill rdata")
        return name
    if rtype == _TYPE_TXT or rtype == _TYPE_SPF:
        strings = []
        pos = start
        while pos < end:
            stop = pos + 1 + data[pos]
            if stop > end:
                raise _Malformed("TXT string runs past rdata")
            strings.append(_quoted(data[pos + 1:stop]))
            pos = stop
        return " ".join(strings)
    if rtype == _TYPE_MX:
        if end - start < 3:
            raise _Malformed("MX too short")
        (pref,) = _U16.unpack_from(data, start)
        name, after = _read_name(data, start + 2)
        if after != end:
            raise _Malformed("MX name does not fill rdata")
        return f"{pref} {name}"
    if rtype == _TYPE_SRV:
        if end - start < 7:
            raise _Malformed("SRV too short")
        prio, weight, port = _SRV_HEAD.unpack_from(data, start)
        name, after = _read_name(data, start + 6)
        if after != end:
            raise _Malformed("SRV name does not fill rdata")
        return f"{prio} {weight} {port} {name}"
    if rtype == _TYPE_SOA:
        mname, pos = _read_name(data, start)
        rname, pos = _read_name(data, pos)
        if pos + _SOA_TAIL.size != end:
            raise _Malformed("SOA does not fill rdata")
        numbers = " ".join(str(v) for v in _SOA_TAIL.unpack_from(data, pos))
        return f"{mname} {rname} {numbers}"
    return rdata.hex()


def _edns(rclass: int, ttl: int, data: bytes, start: int, end: int) -> tuple[Edns, int]:
    options = []
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise _Malformed("EDNS option cut short")
        code, length = struct.unpack_from("!HH", data, pos)
        pos += 4 + length
        if pos > end:
            raise _Malformed("EDNS option runs past rdata")
        options.append(code)
    edns = Edns(udp_size=rclass, version=(ttl >> 16) & 0xFF, dnssec_ok=bool(ttl & 0x8000),
                options=tuple(options))
    return edns, ttl >> 24


# --------------------------------------------------------------------------
# Messages


def _parse(data: bytes) -> DnsMessage:
    n = len(data)
    if n < HEADER.size:
        raise _Malformed("shorter than a header")
    ident, bits, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data, 0)
    opcode = (bits >> 11) & 0xF
    if opcode not in OPCODE_NAMES:
        raise _Malformed("opcode")
    if qdcount > 1 or (opcode != QUERY and qdcount != 1):
        raise _Malformed("question count")
    truncated = bool(bits & 0x0200)
    rr_count = ancount + nscount + arcount
    if not truncated and qdcount * 5 + rr_count * 11 > n - HEADER.size:
        raise _Malformed("counts do not fit")

    pos = HEADER.size
    questions = []
    for _ in range(qdcount):
        name, pos = _read_name(data, pos)
        if pos + 4 > n:
            raise _Malformed("question cut short")
        qtype, qclass = _QUESTION_FIXED.unpack_from(data, pos)
        pos += 4
        questions.append(Question(name=name, qtype=type_name(qtype), qclass=class_name(qclass)))
    if opcode == UPDATE and questions[0].qtype != "SOA":
        raise _Malformed("UPDATE zone type is not SOA")

    sections: list[list[Record]] = [[], [], []]
    edns = None
    ext_rcode = 0
    for section, count in ((0, ancount), (1, nscount), (2, arcount)):
        for _ in range(count):
            if pos == n and truncated:
                break  # a truncated answer may stop at a record boundary
            name, pos = _read_name(data, pos)
            if pos + _RR_FIXED.size > n:
                raise _Malformed("record header cut short")
            rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, pos)
            start = pos + _RR_FIXED.size
            end = start + rdlength
            if end > n:
                raise _Malformed("rdata runs past the end")
            pos = end
            if rtype == _TYPE_OPT:
                if section != 2 or edns is not None or name != ".":
                    raise _Malformed("misplaced OPT record")
                edns, ext_rcode = _edns(rclass, ttl, data, start, end)
                continue
            if rdlength == 0 and opcode == UPDATE:
                text = ""  # RFC 2136 deletions carry no rdata
            else:
                text = _rdata_text(data, rtype, start, end)
            sections[section].append(Record(
                name=name, type=type_name(rtype), rclass=class_name(rclass),
                ttl=ttl if ttl < 0x80000000 else 0, data=text))
    if pos != n:
        raise _Malformed("bytes after the last record")

    is_response = bool(bits & 0x8000)
    rcode = (ext_rcode << 4) | (bits & 0xF)
    if qdcount == 0 and edns is None and not (is_response and rcode):
        raise _Malformed("no question")
    return DnsMessage(
        id=ident, is_response=is_response, opcode=opcode, rcode=rcode_name(rcode),
        flags=tuple(flag for flag, mask in _FLAG_BITS if bits & mask),
        questions=tuple(questions), answers=tuple(sections[0]),
        authorities=tuple(sections[1]), additionals=tuple(sections[2]),
        edns=edns, size=n)


def _as_bytes(data) -> bytes | None:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    return None


def message(data: bytes) -> DnsMessage | None:
    """One DNS message (a UDP payload, or one TCP message without its prefix); None if not."""
    data = _as_bytes(data)
    if data is None:
        return None
    try:
        return _parse(data)
    except (_Malformed, IndexError, struct.error, ValueError, OSError):
        return None


def is_plausible_dns(data: bytes, *, tcp: bool = False, partial: bool = False) -> bool:
    """A cheap look at the first bytes: could this be a DNS message?

    ``tcp``: the bytes start a TCP stream (a length prefix first). ``partial``:
    a UDP payload cut short (a capture's snap length), so the section counts
    cannot be checked against its size. Looks at the header and the first
    question's labels only; ``message`` decides, this only rules out.
    """
    data = _as_bytes(data)
    if data is None:
        return False
    size = len(data) if not partial else 0xFFFF
    if tcp:
        if len(data) < 2:
            return False
        (size,) = _U16.unpack_from(data, 0)
        data = data[2:2 + size]
    if size < HEADER.size or len(data) < HEADER.size:
        return False
    _, bits, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data, 0)
    opcode = (bits >> 11) & 0xF
    if opcode not in OPCODE_NAMES or qdcount > 1 or (opcode != QUERY and qdcount != 1):
        return False
    if not bits & 0x0200 and qdcount * 5 + (ancount + nscount + arcount) * 11 > size - HEADER.size:
        return False
    if qdcount == 0:
        return bool(arcount) or bool(bits & 0x8000 and bits & 0xF)
    # The first name can hold no pointer: nothing precedes it.
    pos, wire = HEADER.size, 1
    while pos < len(data):
        length = data[pos]
        if length == 0:
            return True
        if length > MAX_LABEL:
            return False
        wire += length + 1
        if wire > MAX_NAME_WIRE:
            return False
        pos += length + 1
    return True  # the name goes on past the bytes we have


# --------------------------------------------------------------------------
# DNS over TCP (and DoT once decrypted): two-byte length, then a message


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpMessages:
    messages: list[DnsMessage]
    """The whole, well-formed messages from the stream's start, in order."""
    complete: bool
    """True when the stream ends exactly after the last of them (nothing pending)."""
    malformed: bool
    """True when the bytes after ``consumed`` are not DNS: waiting will not help."""
    consumed: int
    """Stream bytes the messages take, prefixes included."""


def tcp_stream(stream: bytes) -> TcpMessages:
    """The messages of one direction's TCP byte stream, and where it stopped."""
    stream = _as_bytes(stream)
    if stream is None:
        return TcpMessages(messages=[], complete=False, malformed=True, consumed=0)
    out = []
    pos, n = 0, len(stream)
    while pos < n:
        if pos + 2 > n:
            return TcpMessages(messages=out, complete=False, malformed=False, consumed=pos)
        (length,) = _U16.unpack_from(stream, pos)
        body = stream[pos + 2:pos + 2 + length]
        if length < HEADER.size:
            return TcpMessages(messages=out, complete=False, malformed=True, consumed=pos)
        if len(body) < length:
            # Partial: refuse early what can never become DNS.
            bad = len(body) >= HEADER.size and not is_plausible_dns(stream[pos:], tcp=True)
            return TcpMessages(messages=out, complete=False, malformed=bad, consumed=pos)
        msg = message(body)
        if msg is None:
            return TcpMessages(messages=out, complete=False, malformed=True, consumed=pos)
        out.append(msg)
        pos += 2 + length
    return TcpMessages(messages=out, complete=True, malformed=False, consumed=pos)


def tcp_messages(stream: bytes) -> tuple[list[DnsMessage], bool]:
    """The messages in a TCP stream and whether it ends on a message boundary.

    ``complete`` is False when the last message is still partial, and also when
    the stream stops being DNS (``tcp_stream`` tells the two apart).
    """
    found = tcp_stream(stream)
    return found.messages, found.complete


# --------------------------------------------------------------------------
# Answers as the flow record wants them


def chain_answers(msg: DnsMessage) -> tuple[list[str], int | None]:
    """The question name's CNAME chain then its addresses, and the smallest TTL.

    Follows the chain through the answer section (in order, loop-safe), then
    takes the A and AAAA records of the chain's last name: the form of
    ``DnsQuery.answers``, e.g. ``["dualstack.python.map.fastly.net",
    "151.101.0.223"]``. The TTL is the smallest of the records used; None when
    none was.
    """
    q = msg.question
    if q is None:
        return [], None
    current = q.name
    names: list[str] = []
    ttls: list[int] = []
    seen = {current}
    used: set[int] = set()
    looped = False
    while not looped:
        for i, rr in enumerate(msg.answers):
            if i not in used and rr.type == "CNAME" and rr.name == current:
                used.add(i)
                ttls.append(rr.ttl)
                current = rr.data
                if current in seen:
                    looped = True  # a CNAME loop resolves to nothing
                else:
                    seen.add(current)
                    names.append(current)
                break
        else:
            break
    addresses = []
    if not looped:
        for rr in msg.answers:
            if rr.name == current and rr.type in ("A", "AAAA"):
                addresses.append(rr.data)
                ttls.append(rr.ttl)
    return names + addresses, (min(ttls) if ttls else None)


def as_query(msg: DnsMessage) -> DnsQuery | None:
    """The flow record's ``DnsQuery`` for a message's first question; None without one.

    A query gives the name and type only; a response adds its answers, TTL and rcode.
    """
    q = msg.question
    if q is None:
        return None
    if not msg.is_response:
        return DnsQuery(name=q.name, type=q.qtype)
    answers, ttl = chain_answers(msg)
    return DnsQuery(name=q.name, type=q.qtype, answers=answers, ttl=ttl, rcode=msg.rcode)
