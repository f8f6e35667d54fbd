"""Identification by payload, never by port: which app protocol a flow speaks.

The flow table calls ``Identifier.update`` each time a flow's first bytes
grow; the parsers (one module each) are tried cheapest test first. Once a
flow's protocol and the details its record needs are known, the flow stops
collecting payload, so bulk transfers cost only their counters. HTTP
CONNECT and SOCKS tunnels are followed: once the tunnel is set up,
identification starts again on the tunnelled bytes.

Which parser follows which, in one place:

    TCP client first:  tls | ssh | http (CONNECT -> tunnel) | socks (-> tunnel) | stratum | dns/tcp
    TCP server first:  ssh banner | stratum notification
    UDP:               dns | quic
    ICMP echo:         payloads kept for the echo-shape detector
"""

from __future__ import annotations

from typing import Callable

from egress.identify import dns, http, icmp, quic, socks, ssh, stratum, tls
from egress.identify.common import NEED_MORE
from egress.records import (DnsInfo, DnsQuery, HttpInfo, QuicInfo, SshInfo, StratumInfo,
                            TlsInfo, Tunnel)

TCP, UDP = 6, 17
WATCHED = ("ssh",)
"""Apps whose packets' sizes and times are kept for the watch step (reverse tunnels)."""
KEX_WAIT_UPDATES = 4
"""Packets after both KEXINITs in which to find NEWKEYS (the key exchange takes two or three)."""
MIN_PREFIX = 8
"""Client bytes below which no parser can say no yet ("GE" may become "GET ")."""
MAX_DNS_QUERIES = 64
"""Queries kept per DNS flow (a tunnel can send thousands; the detector counts names)."""

OnAnswer = Callable[[object, DnsQuery, int], None]


class _State:
    """What identification knows of one flow so far."""

    __slots__ = ("app", "tls", "http", "ssh", "stratum", "quic", "dns", "tunnel",
                 "coff", "soff", "dns_pending", "dns_seen", "kex_end", "kex_waits",
                 "ssh_reversed")

    def __init__(self):
        self.app = None
        self.tls = self.http = self.ssh = self.stratum = self.quic = self.tunnel = None
        self.dns: list[DnsQuery] | None = None
        self.coff = self.soff = 0          # where the (tunnelled) protocol starts
        self.dns_pending: dict[int, DnsQuery] = {}
        self.dns_seen = [0, 0]             # DNS-over-TCP messages handled per direction
        self.kex_end: tuple | None = None  # SSH: where each side's key exchange ends
        self.kex_waits = 0                 # SSH: updates since both KEXINITs were seen
        self.ssh_reversed: bool | None = None  # SSH: the initiator acted as the server


class Identifier:
    def __init__(self, on_answer: OnAnswer):
        self.on_answer = on_answer

    # ------------------------------------------------------------------ update

    def update(self, flow, is_orig: bool) -> None:
        st = flow.ident
        if st is None:
            st = flow.ident = _State()
        if flow.proto == TCP:
            self._tcp(flow, st, final=False)
            if st.app is not None and st.app not in WATCHED:
                flow.watch = None        # only SSH is watched: its shape over time matters
        elif flow.proto == UDP:
            self._udp(flow, st)
        elif flow.icmp is not None:
            st.app = "icmp"
        else:
            flow.collecting = False

    def _tcp(self, flow, st: _State, final: bool) -> None:
        c = bytes(flow.cstream.data[st.coff:]) if flow.cstream else b""
        s = bytes(flow.sstream.data[st.soff:]) if flow.sstream else b""
        if st.app is None:
            self._tcp_first(flow, st, c, s, final)
        elif st.app == "ssh":
            self._ssh(flow, st, c, s)
        elif st.app == "dns":
            self._dns_tcp(flow, st, c, s, final)
        elif st.app == "http" and st.http is not None and st.http.method == "CONNECT":
            self._connect(flow, st, s)
        elif st.app == "socks":
            self._socks(flow, st, c, s)

    def _tcp_first(self, flow, st: _State, c: bytes, s: bytes, final: bool) -> None:
        waiting = False
        if c:
            if tls.is_tls_client_start(c):
                hello = tls.client_hello(c)
                if hello is NEED_MORE and not final:
                    return
                if hello:
                    st.app = "tls"
                    st.tls = TlsInfo(sni=hello.sni.lower() if hello.sni else None,
                                     alpn=hello.alpn, ja3=hello.ja3, ja4=hello.ja4("t"),
                                     ech=hello.ech)
                    flow.collecting = False
                    return
            if ssh.looks_like_ssh(c):
                st.app = "ssh"
                return self._ssh(flow, st, c, s)
            if http.looks_like_request(c):
                req = http.request(c, final=final)
                if req is NEED_MORE:
                    return
                if req:
                    st.app = "http"
                    if req.method == "CONNECT":
                        st.http = HttpInfo(method="CONNECT",
                                           host=f"{req.connect_host}:{req.connect_port}")
                        st.tunnel = Tunnel(kind="http-connect", host=req.connect_host,
                                           port=req.connect_port)
                        return self._connect(flow, st, s)
                    st.http = HttpInfo(method=req.method, host=req.host)
                    flow.collecting = False
                    return
            if socks.looks_like_socks(c):
                st.app = "socks"
                return self._socks(flow, st, c, s)
            if stratum.looks_like_stratum(c):
                hit = stratum.identify(c)
                if hit is NEED_MORE and not final:
                    return
                if hit:
                    return self._stratum(flow, st, hit)
            if dns.is_plausible_dns(c, tcp=True, partial=True):
                msgs = dns.tcp_stream(c)
                if msgs.messages:
                    st.app, st.dns = "dns", []
                    return self._dns_tcp(flow, st, c, s, final)
                waiting = not msgs.malformed
        elif s:
            # Server speaks first: an SSH server banner, or a pool's notification.
            if ssh.looks_like_ssh(s) or s.startswith(b"SSH-"):
                st.app = "ssh"
                return self._ssh(flow, st, c, s)
            if stratum.looks_like_stratum(s):
                hit = stratum.identify(s)
                if hit:
                    return self._stratum(flow, st, hit)
            waiting = True
        if final or self._full(flow) or (c and not waiting and len(c) >= MIN_PREFIX):
            st.app = "unknown" if (c or s) else None
            flow.collecting = False

    @staticmethod
    def _full(flow) -> bool:
        return bool(flow.cstream and flow.cstream.full)

    def _ssh(self, flow, st: _State, c: bytes, s: bytes) -> None:
        sess = ssh.session(c, s)
        st.ssh = SshInfo(client=sess.client_banner, server=sess.server_banner,
                         hassh=sess.hassh, hassh_server=sess.hassh_server)
        # Collect until both sides' key exchange ends: the watch feed is read from there.
        st.kex_end = (None if sess.client_newkeys_end is None else st.coff + sess.client_newkeys_end,
                      None if sess.server_newkeys_end is None else st.soff + sess.server_newkeys_end)
        if sess.hassh and sess.hassh_server:
            st.kex_waits += 1
        # Both KEXINITs seen: NEWKEYS follows within a few packets; a stream that never
        # shows it (not OpenSSH-shaped, or damaged) stops being read soon after.
        if None not in st.kex_end or self._full(flow) or st.kex_waits > KEX_WAIT_UPDATES:
            flow.collecting = False
            if sess.client_kexinit_end is not None:
                # The initiator sending a server-only key-exchange reply: roles reversed.
                st.ssh_reversed = any(m in ssh.SERVER_KEX_MESSAGES
                                      for m in ssh.kex_messages(c, sess.client_kexinit_end))

    def _stratum(self, flow, st: _State, hit) -> None:
        st.app = "stratum"
        st.stratum = StratumInfo(method=hit.method, agent=hit.agent)
        flow.collecting = False

    def _connect(self, flow, st: _State, s: bytes) -> None:
        off = http.connect_response(s)
        if off is NEED_MORE:
            return
        if off is None:                       # refused: nothing went through
            flow.collecting = False
            return
        self._enter_tunnel(flow, st, st.coff + _head_len(flow, st), st.soff + off)

    def _socks(self, flow, st: _State, c: bytes, s: bytes) -> None:
        t = socks.tunnel(c, s)
        if t is NEED_MORE:
            return
        if t is None:
            st.app = "unknown"
            flow.collecting = False
            return
        st.tunnel = Tunnel(kind=f"socks{t.version}", host=t.host, port=t.port)
        if t.granted is None:
            return
        if not t.granted:
            flow.collecting = False
            return
        self._enter_tunnel(flow, st, st.coff + t.client_offset, st.soff + t.server_offset)

    def _enter_tunnel(self, flow, st: _State, coff: int, soff: int) -> None:
        """Identify again on the tunnelled bytes; the tunnel stays on the record."""
        http_info, tunnel = st.http, st.tunnel
        st.app, st.coff, st.soff = None, coff, soff
        st.http, st.tunnel = http_info, tunnel
        self._tcp(flow, st, final=False)

    # -------------------------------------------------------------------- DNS

    def _dns_tcp(self, flow, st: _State, c: bytes, s: bytes, final: bool) -> None:
        for side, data in enumerate((c, s)):
            msgs = dns.tcp_stream(data).messages   # short streams: parse again, handle the new
            for msg in msgs[st.dns_seen[side]:]:
                self._dns_message(flow, st, msg, from_client=side == 0)
            st.dns_seen[side] = max(st.dns_seen[side], len(msgs))
        if len(st.dns) >= MAX_DNS_QUERIES or self._full(flow):
            flow.collecting = False

    def _udp(self, flow, st: _State) -> None:
        if st.app is None:
            first = flow.cgrams[0] if flow.cgrams else None
            if first is None:
                return                        # the responder spoke first: wait for the client
            if dns.is_plausible_dns(first):
                st.app, st.dns = "dns", []
            elif quic.is_quic_initial_start(first):
                st.app = "quic"
            else:
                st.app = "unknown"
                flow.collecting = False
                return
        if st.app == "dns":
            for grams, from_client in ((flow.cgrams, True), (flow.sgrams, False)):
                while grams:
                    msg = dns.message(grams.pop(0))
                    if msg is not None:
                        self._dns_message(flow, st, msg, from_client)
            if len(st.dns) >= MAX_DNS_QUERIES:
                flow.collecting = False
        elif st.app == "quic":
            got = quic.initial(flow.cgrams)
            if got is NEED_MORE:
                return
            if got:
                st.quic = _quic_info(got)
            flow.collecting = False

    def _dns_message(self, flow, st: _State, msg, from_client: bool) -> None:
        """Record a message; an answer binds names only when it is the responder's answer
        to a query the task asked (same id, same name), never a forged or stray one."""
        query = dns.as_query(msg)
        if query is None:
            return
        if not msg.is_response:
            if len(st.dns) < MAX_DNS_QUERIES:
                st.dns.append(query)
                if from_client:
                    st.dns_pending[msg.id] = query
            flow.closed_at = None
            return
        asked = st.dns_pending.get(msg.id) if not from_client else None
        if asked is not None and asked.name == query.name:
            del st.dns_pending[msg.id]
            asked.answers, asked.ttl, asked.rcode = query.answers, query.ttl, query.rcode
            if asked.answers:
                self.on_answer(flow, asked, flow.last)
        elif len(st.dns) < MAX_DNS_QUERIES:
            st.dns.append(query)              # an answer to nothing we saw asked: kept, not bound
        if flow.proto == UDP and not st.dns_pending:
            # Every query answered: the lookup is over. It ends after the close delay
            # (a query more in that time reopens it), not a minute of idle later.
            flow.closed_at = flow.last

    # ----------------------------------------------------------------- record

    def fields(self, flow) -> dict:
        """The record's app fields for a finished flow."""
        st = flow.ident
        if st is None:
            return {}
        if flow.collecting and flow.proto == TCP and st.app is None:
            self._tcp(flow, st, final=True)
        elif flow.collecting and st.app == "quic" and st.quic is None:
            got = quic.initial(flow.cgrams, final=True)
            if got:
                st.quic = _quic_info(got)
        return {"app": st.app, "tls": st.tls, "http": st.http, "ssh": st.ssh,
                "kex_end": (st.kex_end, st.ssh_reversed),
                "stratum": st.stratum, "quic": st.quic, "tunnel": st.tunnel,
                "dns": DnsInfo(queries=st.dns) if st.dns is not None else None}


def _quic_info(got) -> QuicInfo:
    return QuicInfo(version=got.version, sni=got.sni.lower() if got.sni else None,
                    ech=got.ech if got.complete else None)


def _head_len(flow, st: _State) -> int:
    req = http.request(bytes(flow.cstream.data[st.coff:]))
    return req.body_offset if req else 0
