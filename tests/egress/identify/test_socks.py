"""SOCKS4/4a/5 tunnels: the inner target and where tunnelled bytes start."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings, strategies as st

from tests.factories import mutated
from scapy.contrib.socks import SOCKS, SOCKS4Request, SOCKS5Request

from egress.identify import http, socks, ssh
from egress.identify.common import NEED_MORE

TLS_HELLO = bytes.fromhex("160301020001000200fc0303") + bytes(32)


def greeting(*methods: int) -> bytes:
    return bytes([5, len(methods), *methods])


def request5(host: str, port: int, command: int = 1) -> bytes:
    """A SOCKS5 request (RFC 1928 §4); the address type follows from ``host``."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode()
        return bytes([5, command, 0, 3, len(name)]) + name + struct.pack(">H", port)
    atyp = 1 if address.version == 4 else 4
    return bytes([5, command, 0, atyp]) + address.packed + struct.pack(">H", port)


def reply5(rep: int = 0) -> bytes:
    return bytes([5, rep, 0, 1]) + bytes([192, 0, 2, 1]) + struct.pack(">H", 40000)


def userpass(user: bytes, password: bytes) -> bytes:
    return bytes([1, len(user)]) + user + bytes([len(password)]) + password


# --------------------------------------------------------------------------
# SOCKS5


def test_socks5_domain_no_auth_and_offsets():
    client = greeting(0) + request5("relay.example", 22)
    server = b"\x05\x00" + reply5()
    found = socks.tunnel(client + b"SSH-2.0-OpenSSH_9.2p1\r\n", server + b"SSH-2.0-x\r\n")
    assert (found.version, found.command, found.host, found.port) == \
        (5, "connect", "relay.example", 22)
    assert found.auth == "none" and found.granted is True
    assert (found.client_offset, found.server_offset) == (len(client), len(server))
    # Identification goes on inside the tunnel.
    inner = (client + b"SSH-2.0-OpenSSH_9.2p1\r\n")[found.client_offset:]
    assert ssh.banner(inner) == "SSH-2.0-OpenSSH_9.2p1"


def test_socks5_ipv4_ipv6_built_with_scapy():
    v4 = bytes(SOCKS() / SOCKS5Request(cd=1, atyp=1, addr="198.51.100.7", port=3333))
    found = socks.tunnel(greeting(0) + v4, b"\x05\x00")
    assert (found.host, found.port, found.granted) == ("198.51.100.7", 3333, None)
    v6 = bytes(SOCKS() / SOCKS5Request(cd=1, atyp=4, addr="2001:db8::10", port=443))
    assert socks.tunnel(greeting(0) + v6).host == "2001:db8::10"


def test_socks5_target_known_before_the_server_answers():
    found = socks.tunnel(greeting(0, 2) + request5("pool.example", 3333), b"")
    assert found.host == "pool.example" and found.auth is None
    assert found.granted is None and found.server_offset is None


def test_socks5_username_password():
    client = greeting(0, 2) + userpass(b"agent", b"s3cret") + request5("10.1.2.3", 80)
    server = b"\x05\x02" + b"\x01\x00" + reply5()
    found = socks.tunnel(client + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", server)
    assert found.auth == "username-password" and found.granted
    assert (found.host, found.port) == ("10.1.2.3", 80)
    assert http.request((client + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")[found.client_offset:]).host == "x"
    assert found.server_offset == len(server)
    assert "s3cret" not in repr(found)


def test_socks5_refusals():
    client = greeting(0) + request5("a.example", 443)
    no_method = socks.tunnel(greeting(2) + userpass(b"u", b"p") + request5("a.example", 1), b"\x05\xff")
    assert no_method.granted is False and no_method.server_offset is None
    bad_login = socks.tunnel(greeting(2) + userpass(b"u", b"p") + request5("a.example", 1),
                             b"\x05\x02\x01\x01")
    assert bad_login.granted is False
    refused = socks.tunnel(client, b"\x05\x00" + reply5(rep=5))
    assert refused.granted is False and refused.server_offset is None


def test_socks5_bind_and_udp_associate():
    assert socks.tunnel(greeting(0) + request5("0.0.0.0", 0, command=3)).command == "udp-associate"
    assert socks.tunnel(greeting(0) + request5("h.example", 21, command=2)).command == "bind"


@pytest.mark.parametrize("client, server", [
    (greeting(0) + request5("a.example", 1), b"\x05\x02"),            # chose a method not offered
    (greeting(0, 2) + request5("a.example", 1), b"\x05\x02"),         # chose auth, client skipped it
    (greeting(0, 2) + userpass(b"u", b"p") + request5("a", 1), b"\x05\x00"),  # the reverse
    (greeting(0) + request5("a.example", 1), b"HTTP/1.1 400 Bad\r\n"),  # not a SOCKS server
    (greeting(0) + request5("a.example", 1), b"\x05\x00\x04\x00"),    # reply of another version
    (greeting(1) + b"\x01\x01\x00\x04abcd", b""),                    # GSSAPI: cannot follow
    (greeting() + request5("a.example", 1), b""),                     # no methods
    (greeting(0) + bytes([5, 9, 0, 3, 1]) + b"a\x00\x01", b""),       # unknown command
    (greeting(0) + bytes([5, 1, 7, 1, 1, 2, 3, 4, 0, 80]), b""),      # reserved byte set
    (greeting(0) + bytes([5, 1, 0, 2, 1, 2, 3, 4, 0, 80]), b""),      # unknown address type
    (greeting(0) + bytes([5, 1, 0, 3, 0, 0, 80]), b""),               # empty domain
    (greeting(0) + bytes([5, 1, 0, 3, 3]) + b"a\nb" + b"\x00\x50", b""),  # control bytes in name
])
def test_socks5_rejects(client, server):
    assert socks.tunnel(client, server) is None


def test_every_unfinished_client_stream_needs_more():
    client = greeting(0, 2) + userpass(b"user", b"pw") + request5("relay.example", 2222)
    for cut in range(len(client)):
        assert socks.tunnel(client[:cut], b"") is NEED_MORE, cut
    assert socks.tunnel(client).client_offset == len(client)


def test_unfinished_server_reply_leaves_granted_open():
    client = greeting(0) + request5("relay.example", 22)
    whole = b"\x05\x00" + reply5()
    for cut in range(len(whole)):
        found = socks.tunnel(client, whole[:cut])
        assert found.server_offset is None
    assert socks.tunnel(client, whole).server_offset == len(whole)


# --------------------------------------------------------------------------
# SOCKS4 and 4a


def test_socks4_built_with_scapy():
    client = bytes(SOCKS() / SOCKS4Request(cd=1, dstport=8333, dst="203.0.113.9", userid=b"miner"))
    found = socks.tunnel(client + TLS_HELLO, b"\x00\x5a" + bytes(6) + b"\x16\x03\x03")
    assert (found.version, found.host, found.port, found.granted) == (4, "203.0.113.9", 8333, True)
    assert found.client_offset == len(client) and found.server_offset == 8
    assert found.auth is None


def test_socks4a_domain():
    client = b"\x04\x01" + struct.pack(">H", 3333) + b"\x00\x00\x00\x01" + b"\x00" + \
        b"xmr.pool.example\x00"
    found = socks.tunnel(client + b'{"id":1}\n', b"\x00\x5b" + bytes(6))
    assert (found.host, found.port, found.granted) == ("xmr.pool.example", 3333, False)
    assert found.client_offset == len(client) and found.server_offset is None
    for cut in range(len(client)):
        assert socks.tunnel(client[:cut]) is NEED_MORE, cut


@pytest.mark.parametrize("client, server", [
    (b"\x04\x03" + bytes(7), b""),                                    # no such command
    (b"\x04\x01\x00\x50\x00\x00\x00\x00user\x00", b""),               # address 0.0.0.0
    (b"\x04\x01\x00\x50" + bytes([1, 2, 3, 4]) + b"u" * 300, b""),    # user id never ends
    (b"\x04\x01\x00\x50" + bytes([1, 2, 3, 4]) + b"\x00", b"\x00\x10" + bytes(6)),  # bad code
    (b"\x04\x01\x00\x50" + bytes([1, 2, 3, 4]) + b"\x00", b"\x05\x00"),  # answered as SOCKS5
])
def test_socks4_rejects(client, server):
    assert socks.tunnel(client, server) is None


@pytest.mark.parametrize("junk", [TLS_HELLO, b"GET / HTTP/1.1\r\n", b"SSH-2.0-x\r\n",
                                  b"\x06\x01\x00"])
def test_other_protocols(junk):
    assert socks.tunnel(junk, b"") is None
    assert not socks.looks_like_socks(junk)


def test_looks_like_socks():
    assert socks.looks_like_socks(b"\x05\x01\x00") and socks.looks_like_socks(b"\x04\x01")
    assert not socks.looks_like_socks(b"\x05\x00") and not socks.looks_like_socks(b"\x04\x09")


# --------------------------------------------------------------------------
# Properties




def check(client: bytes, server: bytes) -> None:
    found = socks.tunnel(client, server)
    assert found is None or found is NEED_MORE or isinstance(found, socks.SocksTunnel)
    if isinstance(found, socks.SocksTunnel):
        assert 0 < found.client_offset <= len(client)
        assert found.server_offset is None or 0 < found.server_offset <= len(server)
        assert 0 <= found.port <= 65535
    assert isinstance(socks.looks_like_socks(client), bool)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=60))
def test_random_bytes_never_raise(client, server):
    check(client, server)
    check(b"\x05" + client, b"\x05" + server)
    check(b"\x04\x01" + client, b"\x00" + server)
    check(greeting(0, 2) + client, b"\x05\x02" + server)


@settings(max_examples=300, deadline=None)
@given(mutated(greeting(0, 2) + userpass(b"u", b"p") + request5("relay.example", 22) + b"SSH-"),
       mutated(b"\x05\x02\x01\x00" + reply5() + b"SSH-"),
       mutated(b"\x04\x01\x00\x50\x00\x00\x00\x07id\x00host.example\x00GET"))
def test_mutations_never_raise(client5, server5, client4):
    check(client5, server5)
    check(client4, b"\x00\x5a" + bytes(6))


HOSTS = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?(\.[a-z]{2,10}){1,4}", fullmatch=True))


@settings(max_examples=200, deadline=None)
@given(HOSTS, st.integers(0, 65535), st.lists(st.integers(0, 254), min_size=1, max_size=5))
def test_generated_socks5_targets_round_trip(host, port, methods):
    methods = sorted(set(methods) | {0})
    client = greeting(*methods) + request5(host, port)
    found = socks.tunnel(client + b"inner", b"\x05\x00" + reply5() + b"inner")
    assert (found.host, found.port) == (host, port)  # addresses come canonical from str()
    assert found.client_offset == len(client) and found.server_offset == 12
