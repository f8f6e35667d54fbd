"""TLS ClientHello parsing, JA3 and JA4: public corpora, scapy-built hellos, fuzzing."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.tls.extensions import (ProtocolName, ServerName, TLS_Ext_ALPN,
                                         TLS_Ext_ServerName, TLS_Ext_SignatureAlgorithms,
                                         TLS_Ext_SupportedGroups, TLS_Ext_SupportedPointFormat,
                                         TLS_Ext_SupportedVersion_CH, TLS_Ext_Unknown)
from scapy.layers.tls.handshake import TLSClientHello
from scapy.layers.tls.keyexchange_tls13 import KeyShareEntry, TLS_Ext_KeyShare_CH
from scapy.packet import Raw
from scapy.utils import rdpcap

from egress.identify import tls
from egress.identify.common import NEED_MORE

SHARED = Path(__file__).resolve().parents[3].parent / "shared"
JA3 = SHARED / "corpora" / "ja3"
JA4 = SHARED / "corpora" / "ja4"
JA4_CAPTURES = ["tls-sni.pcapng", "tls12.pcap", "tls-alpn-h2.pcap", "tls-non-ascii-alpn.pcapng",
                "latest.pcapng", "single-packets.pcap"]


# --------------------------------------------------------------------------
# Reading captures: each TCP direction's payload, reassembled in sequence order


def _ip(packet):
    for layer in (IP, IPv6):
        if layer in packet:
            return packet[layer]
    if Raw in packet:  # link types scapy leaves undecoded, as BSD loopback with IPv6
        raw = bytes(packet[Raw])
        return {4: IP, 6: IPv6}.get(raw[0] >> 4, lambda _: None)(raw) if raw else None
    return None


@functools.lru_cache(maxsize=None)
def tcp_streams(path: Path) -> dict[tuple[str, int, str, int], bytes]:
    """(src, sport, dst, dport) -> the bytes that side sent, in order, up to the first gap."""
    sides: dict[tuple, dict] = {}
    for packet in rdpcap(str(path)):
        ip = _ip(packet)
        if ip is None or TCP not in ip:
            continue
        segment = ip[TCP]
        side = sides.setdefault((ip.src, segment.sport, ip.dst, segment.dport),
                                {"isn": None, "segments": []})
        if segment.flags.S:
            side["isn"] = segment.seq
        payload = bytes(segment.payload)
        if payload:
            side["segments"].append((segment.seq, payload))
    streams = {}
    for key, side in sides.items():
        if not side["segments"]:
            continue
        base = (side["isn"] + 1 if side["isn"] is not None
                else min(seq for seq, _ in side["segments"]))
        data = bytearray()
        for seq, payload in sorted(side["segments"], key=lambda s: (s[0] - base) % 2**32):
            offset = (seq - base) % 2**32
            if offset > len(data):
                break
            data += payload[len(data) - offset:]
        streams[key] = bytes(data)
    return streams


def _ja4_expectations():
    cases = []
    for capture in JA4_CAPTURES:
        for entry in json.loads((JA4 / f"{capture}.json").read_text()):
            cases.append(pytest.param(capture, entry, id=f"{capture}-{entry['stream']}"))
    return cases


# --------------------------------------------------------------------------
# Corpora


@pytest.mark.parametrize("expected", json.loads((JA3 / "expected.json").read_text()),
                         ids=lambda e: e["file"])
def test_ja3_corpus(expected):
    hellos = [tls.client_hello(data) for data in tcp_streams(JA3 / expected["file"]).values()]
    hellos = [h for h in hellos if isinstance(h, tls.ClientHello)]
    assert [(h.sni, h.ja3) for h in hellos] == [(expected["server_name"], expected["ja3"])]


@pytest.mark.parametrize("capture,entry", _ja4_expectations())
def test_ja4_corpus(capture, entry):
    data = tcp_streams(JA4 / capture).get(
        (entry["src"], int(entry["srcport"]), entry["dst"], int(entry["dstport"])), b"")
    hello = tls.client_hello(data)
    if "JA4.1" not in entry:  # HTTP and SSH streams of the same corpora
        assert hello is None
        assert not tls.is_tls_client_start(data)
        return
    assert tls.is_tls_client_start(data)
    assert isinstance(hello, tls.ClientHello)
    assert hello.ja4_raw() == entry["JA4_r.1"]
    assert hello.ja4() == entry["JA4.1"]
    assert hello.sni == entry["domain"]


def test_non_ascii_alpn_corpus_value():
    data, = [d for d in tcp_streams(JA4 / "tls-non-ascii-alpn.pcapng").values()
             if tls.is_tls_client_start(d)]
    hello = tls.client_hello(data)
    assert hello.alpn_raw == [b"\xba\xad", b"http/1.1"]
    assert hello.alpn == ["\\xba\\xad", "http/1.1"]


# --------------------------------------------------------------------------
# Hand-built ClientHellos


def make_hello(*, sni: str | None = "example.org", alpn: list[bytes] | None = (b"h2", b"http/1.1"),
               ciphers=(0x1A1A, 0x1301, 0x1302, 0xC02B), grease_ext: bool = True,
               ech: bool = False, key_share: int = 32, sig_algs=(0x0403, 0x0804),
               versions=(0x4A4A, 0x0304, 0x0303), version: int = 0x0303,
               extensions: bool = True) -> bytes:
    """A ClientHello handshake message (no record layer), built with scapy."""
    ext = []
    if grease_ext:
        ext.append(TLS_Ext_Unknown(type=0x2A2A, val=b""))
    if sni is not None:
        ext.append(TLS_Ext_ServerName(servernames=[ServerName(servername=sni.encode())]))
    ext += [TLS_Ext_SupportedGroups(groups=[0x3A3A, 0x11EC, 29, 23]),
            TLS_Ext_SupportedPointFormat(ecpl=[0])]
    if sig_algs:
        ext.append(TLS_Ext_SignatureAlgorithms(sig_algs=list(sig_algs)))
    if alpn is not None:
        ext.append(TLS_Ext_ALPN(protocols=[ProtocolName(protocol=p) for p in alpn]))
    if versions:
        ext.append(TLS_Ext_SupportedVersion_CH(versions=list(versions)))
    ext.append(TLS_Ext_KeyShare_CH(client_shares=[
        KeyShareEntry(group=0x11EC, key_exchange=os.urandom(key_share)),
        KeyShareEntry(group=29, key_exchange=os.urandom(32))]))
    if ech:
        ext.append(TLS_Ext_Unknown(type=0xFE0D, val=os.urandom(200)))
    hello = TLSClientHello(version=version, gmt_unix_time=0, random_bytes=os.urandom(28),
                           sid=os.urandom(32), ciphers=list(ciphers), comp=[0],
                           ext=ext if extensions else None)
    return bytes(hello)


def records(message: bytes, *sizes: int, version: int = 0x0301) -> bytes:
    """``message`` in TLS handshake records of the given sizes (the rest in a last one)."""
    out = b""
    for size in sizes + (len(message),):
        chunk, message = message[:size], message[size:]
        out += bytes((0x16,)) + version.to_bytes(2, "big") + len(chunk).to_bytes(2, "big") + chunk
        if not message:
            break
    return out


def sha12(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def test_fields_and_fingerprints_without_grease():
    hello = tls.client_hello(records(make_hello()))
    assert hello.legacy_version == 0x0303
    assert hello.cipher_suites == [0x1A1A, 0x1301, 0x1302, 0xC02B]  # as sent, GREASE kept
    assert hello.extensions == [0x2A2A, 0, 10, 11, 13, 16, 43, 51]
    assert hello.supported_groups == [0x3A3A, 0x11EC, 29, 23]
    assert hello.ec_point_formats == [0]
    assert hello.signature_algorithms == [0x0403, 0x0804]
    assert hello.supported_versions == [0x4A4A, 0x0304, 0x0303]
    assert (hello.sni, hello.alpn, hello.ech) == ("example.org", ["h2", "http/1.1"], False)
    assert hello.ja3_string == "771,4865-4866-49195,0-10-11-13-16-43-51,4588-29-23,0"
    assert hello.ja3 == hashlib.md5(hello.ja3_string.encode()).hexdigest()
    exts = "000a,000b,000d,002b,0033_0403,0804"
    assert hello.ja4_raw() == f"t13d0307h2_1301,1302,c02b_{exts}"
    assert hello.ja4() == f"t13d0307h2_{sha12('1301,1302,c02b')}_{sha12(exts)}"
    assert hello.ja4("q") == "q" + hello.ja4()[1:]


def test_ech_is_reported():
    hello = tls.client_hello(records(make_hello(ech=True)))
    assert hello.ech is True
    assert 0xFE0D in hello.extensions
    assert hello.ja4().startswith("t13d0308h2_")


def test_no_sni_no_alpn():
    hello = tls.client_hello(records(make_hello(sni=None, alpn=None)))
    assert hello.sni is None and hello.alpn is None and hello.alpn_raw is None
    assert hello.ja4().startswith("t13i030500_")


def test_tls12_without_supported_versions_and_signature_algorithms():
    hello = tls.client_hello(records(make_hello(versions=(), sig_algs=())))
    assert hello.supported_versions == [] and hello.signature_algorithms == []
    exts = "000a,000b,0033"  # no signature algorithms: no trailing underscore
    assert hello.ja4_raw() == f"t12d0305h2_1301,1302,c02b_{exts}"
    assert hello.ja4().endswith("_" + sha12(exts))


def test_empty_lists_hash_to_zeros():
    hello = tls.client_hello(records(make_hello(ciphers=(), extensions=False)))
    assert hello.extensions == [] and hello.alpn is None
    assert hello.ja3_string == "771,,,,"
    assert hello.ja4() == "t12i000000_000000000000_000000000000"
    named_only = TLSClientHello(version=0x0303, ciphers=[0x1301], comp=[0], ext=[
        TLS_Ext_ServerName(servernames=[ServerName(servername=b"example.org")]),
        TLS_Ext_ALPN(protocols=[ProtocolName(protocol=b"h2")])])
    # SNI and ALPN count, but are left out of the hash: nothing is left to hash.
    assert tls.client_hello(records(bytes(named_only))).ja4() == (
        f"t12d0102h2_{sha12('1301')}_000000000000")


@pytest.mark.parametrize("first_alpn,chars", [
    (b"h2", "h2"), (b"http/1.1", "h1"), (b"h3", "h3"), (b"a", "aa"),
    (b"\xba\xad", "99"), (b"\x30\xab", "09"), (b"-x-", "2d"), (b"", "00"),
])
def test_ja4_alpn_characters(first_alpn, chars):
    hello = tls.client_hello(records(make_hello(alpn=[first_alpn, b"h2"])))
    assert hello.ja4()[8:10] == chars


def test_split_across_records():
    message = make_hello()
    whole = tls.client_hello(records(message))
    for sizes in [(100,), (2,), (1, 1, 1), (500, 500)]:
        assert tls.client_hello(records(message, *sizes)) == whole


def test_large_post_quantum_hello_over_several_records():
    message = make_hello(key_share=9000)
    assert len(message) > 8 * 1024
    data = records(message, 4096, 4096)
    hello = tls.client_hello(data)
    assert isinstance(hello, tls.ClientHello) and hello.sni == "example.org"
    assert tls.client_hello(data[:-1]) is NEED_MORE
    assert tls.client_hello(data[:4096 + 5 + 3]) is NEED_MORE


def test_every_prefix_needs_more():
    data = records(make_hello(), 300)
    for cut in range(len(data)):
        assert tls.client_hello(data[:cut]) is NEED_MORE, cut
    assert isinstance(tls.client_hello(data), tls.ClientHello)
    assert isinstance(tls.client_hello(data + b"\x17\x03\x03\x00\x10" + bytes(16)),
                      tls.ClientHello)  # what follows the hello does not matter


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"\x17\x03\x03\x00\x05hello",                                 # application data
    b"\x16\x03\x03\x00\x06\x02\x00\x00\x02\x03\x03",              # a ServerHello
    b"\x16\x02\x00\x00\x06\x01\x00\x00\x02\x03\x03",              # record version 2.0
    b"\x16\x03\x01\x00\x04\x01\x01\x00\x01",                      # longer than MAX_HELLO
    b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03",              # body cut inside
])
def test_not_tls_is_none(data):
    assert tls.client_hello(data) is None


def test_malformed_inner_lengths_are_none():
    message = bytearray(make_hello())
    message[4 + 2 + 32] = 200  # session id longer than the message allows
    assert tls.client_hello(records(bytes(message))) is None


def test_quick_check():
    data = records(make_hello())
    assert tls.is_tls_client_start(data)
    assert not tls.is_tls_client_start(data[:5])
    assert not tls.is_tls_client_start(b"\x16\x03\x03\x00\x06\x02")
    assert not tls.is_tls_client_start(b"GET / HTTP/1.1")


# --------------------------------------------------------------------------
# Never raises


REAL = records(make_hello(ech=True), 200)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data):
    for candidate in (data, b"\x16\x03\x01" + data, REAL[:5] + data, REAL[:200] + data):
        result = tls.client_hello(candidate)
        assert result is None or result is NEED_MORE or isinstance(result, tls.ClientHello)
        tls.client_hello_message(candidate)
        tls.is_tls_client_start(candidate)


@settings(max_examples=500)
@given(st.lists(st.tuples(st.integers(0, len(REAL) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(REAL)))
def test_mutated_hello_never_raises(changes, cut):
    data = bytearray(REAL)
    for position, value in changes:
        data[position] = value
    result = tls.client_hello(bytes(data[:cut]))
    assert result is None or result is NEED_MORE or isinstance(result, tls.ClientHello)
    if isinstance(result, tls.ClientHello):
        assert len(result.ja3) == 32 and len(result.ja4().split("_")) == 3
