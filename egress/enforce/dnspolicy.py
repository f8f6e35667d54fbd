"""What the task's resolver decides, without any I/O: which names a purpose
lets the task look up, which answer addresses it may learn, and how an
upstream answer is rewritten before the task sees it.

The resolver (egress.enforce.resolver) does the sockets and callbacks; all
judgement lives here so it can be tested on hand-built messages.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
from dns.rdtypes.svcbbase import IPv4HintParam, IPv6HintParam, MandatoryParam, ParamKey

from tagging.rules import host_matches, normalize_name

# Listed explicitly: Python's ``is_private`` also covers the documentation
# ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32), which
# are public for us (the labs serve from them) (KERNEL.md).
PRIVATE_NETWORKS: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(net), why) for net, why in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "rfc1918"),
        ("100.64.0.0/10", "rfc6598"),       # carrier-grade NAT; 100.100.100.200 is Alibaba metadata
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),   # 169.254.169.254 and 169.254.170.2 are metadata
        ("172.16.0.0/12", "rfc1918"),
        ("192.168.0.0/16", "rfc1918"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),        # and 255.255.255.255, broadcast
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fc00::/7", "ula"),                # fd00:ec2::254 is AWS metadata
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    ))

ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
SVCB_TYPES = (dns.rdatatype.SVCB, dns.rdatatype.HTTPS)
MAX_CHAIN = 16
"""CNAME hops followed from the query name; an upstream loop ends here."""

_HOST_LABEL = re.compile(rb"^[A-Za-z0-9_-]{1,63}$")


def query_name(name: dns.name.Name) -> str | None:
    """A wire name as rules compare it, or None when it is not a host name.

    Built from the labels, never from the text form: a label holding a dot
    (``evil.allowed`` under ``org``) prints as ``evil\\.allowed.org`` and would
    pass a suffix test for ``*.allowed.org`` while the upstream asks org's
    servers. Only letters, digits, ``-`` and ``_`` pass; clients send IDNs as
    A-labels (``xn--``), which do.
    """
    labels = [label for label in name.labels if label != b""]
    if not labels or not all(_HOST_LABEL.match(label) for label in labels):
        return None
    try:
        return normalize_name(b".".join(labels).decode("ascii"))
    except ValueError:
        return None


def display_name(name: dns.name.Name) -> str:
    """The name for an event: normalised when it is a host name, else its escaped text."""
    return query_name(name) or name.to_text(omit_final_dot=True)


def private_reason(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address must not be learnt from DNS (``rfc1918``, ``loopback``, ...), or None.

    An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) reaches its IPv4 address
    on Linux, so it is judged as that address.
    """
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    for net, why in PRIVATE_NETWORKS:
        if address.version == net.version and address in net:
            return why
    return None


class NamePolicy:
    """A purpose's view for DNS: host rules decide names, cidr rules re-admit addresses."""

    def __init__(self, purpose, host_addresses=()):
        self.hosts = tuple(r.host for r in purpose.rules if r.host is not None)
        self.networks = tuple(r.network for r in purpose.rules if r.cidr is not None)
        self.own = frozenset(_plain(ipaddress.ip_address(a)) for a in host_addresses)

    def allows(self, name: str | None) -> bool:
        """Some host rule covers the normalised name (any port or transport: the
        name alone is what the lookup reveals)."""
        return name is not None and any(host_matches(h, name) for h in self.hosts)

    def refusal(self, address: str) -> str | None:
        """Why an answer address is dropped, or None when the task may learn it.

        Private, special and the host's own addresses are dropped unless a
        cidr rule names them: a public name pointing inside (DNS rebinding,
        metadata) must not open the inside to the task.
        """
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return "unparsable"
        plain = _plain(ip)
        why = private_reason(ip) or ("host-address" if plain in self.own else None)
        if why is None:
            return None
        if any((ip.version == n.version and ip in n) or (plain.version == n.version and plain in n)
               for n in self.networks):
            return None
        return why


def _plain(ip):
    """An IPv4-mapped IPv6 address as its IPv4 address; others unchanged."""
    return getattr(ip, "ipv4_mapped", None) or ip


@dataclass
class Rewrite:
    """What rewriting an answer found and did."""

    chain: list[dns.name.Name] = field(default_factory=list)
    """The query name and the CNAME targets followed from it, in order."""
    addresses: dict[str, int] = field(default_factory=dict)
    """Every address the task may learn (A, AAAA, SVCB hints) -> seconds the kernel keeps it."""
    dropped: dict[str, str] = field(default_factory=dict)
    """Addresses removed from the answer -> why."""
    ech_stripped: int = 0
    """SVCB/HTTPS records whose ``ech`` parameter was removed."""
    changed: bool = False

    def names(self) -> list[str]:
        """The chain's names as rules and bindings spell them."""
        out = []
        for n in self.chain:
            text = display_name(n)
            if text not in out:
                out.append(text)
        return out


def cname_chain(answer: list[dns.rrset.RRset], qname: dns.name.Name) -> list[dns.name.Name]:
    """The query name and the CNAME targets that follow from it in the answer section."""
    cnames = {rrset.name: rrset[0].target for rrset in answer
              if rrset.rdtype == dns.rdatatype.CNAME and len(rrset)}
    chain = [qname]
    while chain[-1] in cnames and len(chain) <= MAX_CHAIN:
        target = cnames[chain[-1]]
        if target in chain:
            break
        chain.append(target)
    return chain


def rewrite(message: dns.message.Message, qname: dns.name.Name, policy: NamePolicy,
            min_ttl: int) -> Rewrite:
    """Rewrite an upstream answer in place; returns the addresses to admit.

    - A/AAAA records of the query's CNAME chain stay when ``policy.refusal``
      says nothing; the others are dropped. Address records of other names, and
      every A/AAAA of the authority and additional sections, are dropped too:
      everything the task learns from us went through these checks and into
      the kernel's sets, and a client asks again by name for what is missing.
    - SVCB/HTTPS: ``ech`` is removed everywhere (it would hide the real server
      name from our SNI checks); ipv4hint/ipv6hint are checked like A/AAAA
      on the chain and removed elsewhere.
    - When the checks leave no address, the answer goes out as it remains
      (NOERROR, possibly empty: "no address of this type"). NXDOMAIN would lie
      that the name does not exist, and a client caches that for every type;
      SERVFAIL makes clients retry and try other resolvers.

    Each kept address is kept by the kernel for ``max(ttl, min_ttl)`` seconds.
    """
    out = Rewrite(chain=cname_chain(message.answer, qname))
    on_chain = set(out.chain)

    def admit(address: str, ttl: int) -> bool:
        why = policy.refusal(address)
        if why is not None:
            out.dropped[address] = why
            return False
        out.addresses[address] = max(out.addresses.get(address, 0), max(ttl, min_ttl))
        return True

    new_answer = []
    for rrset in message.answer:
        if rrset.rdtype in ADDRESS_TYPES:
            kept = [rd for rd in rrset if rrset.name in on_chain and admit(rd.address, rrset.ttl)]
            if len(kept) != len(rrset):
                out.changed = True
                if rrset.name not in on_chain:
                    out.dropped.update({rd.address: "off-chain" for rd in rrset})
                rrset = dns.rrset.from_rdata_list(rrset.name, rrset.ttl, kept) if kept else None
        elif rrset.rdtype in SVCB_TYPES:
            rrset = _rewrite_svcb(rrset, out, admit if rrset.name in on_chain else None)
        if rrset is not None:
            new_answer.append(rrset)
    message.answer = new_answer

    for section in ("authority", "additional"):
        kept = []
        for rrset in getattr(message, section):
            if rrset.rdtype in ADDRESS_TYPES:
                out.changed = True
                continue
            if rrset.rdtype in SVCB_TYPES:
                rrset = _rewrite_svcb(rrset, out, None)
            kept.append(rrset)
        setattr(message, section, kept)
    if out.changed:
        message.flags &= ~dns.flags.AD   # no longer what the signer signed
    return out


def _rewrite_svcb(rrset: dns.rrset.RRset, out: Rewrite, admit) -> dns.rrset.RRset:
    """``rrset`` without ech, with hints checked by ``admit`` (all removed when None)."""
    rdatas, changed = [], False
    for rd in rrset:
        new = _strip_svcb(rd, out, lambda a: admit is not None and admit(a, rrset.ttl))
        changed |= new is not rd
        rdatas.append(new)
    if not changed:
        return rrset
    out.changed = True
    return dns.rrset.from_rdata_list(rrset.name, rrset.ttl, rdatas)


def _strip_svcb(rd, out: Rewrite, keep):
    params = dict(rd.params)
    if ParamKey.ECH in params:
        del params[ParamKey.ECH]
        out.ech_stripped += 1
    for key, cls in ((ParamKey.IPV4HINT, IPv4HintParam), (ParamKey.IPV6HINT, IPv6HintParam)):
        hint = params.get(key)
        if hint is None:
            continue
        kept = [a for a in hint.addresses if keep(a)]
        for a in hint.addresses:
            if a not in kept:
                out.dropped.setdefault(a, "off-chain")
        if len(kept) != len(hint.addresses):
            if kept:
                params[key] = cls(kept)
            else:
                del params[key]
    mandatory = params.get(ParamKey.MANDATORY)
    if mandatory is not None:
        keys = [k for k in mandatory.keys if k in params]
        if len(keys) != len(mandatory.keys):
            if keys:
                params[ParamKey.MANDATORY] = MandatoryParam(keys)
            else:
                del params[ParamKey.MANDATORY]
    if params == dict(rd.params):
        return rd
    return rd.replace(params=params)
