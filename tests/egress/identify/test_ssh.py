"""SSH banners, KEXINIT and HASSH: third-party captures as oracles, units, properties."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from tests.factories import mutated
from scapy.all import IP, TCP, IPv6, Padding, rdpcap
from scapy.layers.ssh import NameList, SSHKexInit

from egress.identify import ssh
from egress.identify.common import NEED_MORE

SHARED = Path(__file__).resolve().parents[3].parent / "shared"
HASSH = SHARED / "corpora" / "hassh"
JA4 = SHARED / "corpora" / "ja4"


# --------------------------------------------------------------------------
# Helpers: TCP reassembly of captures, SSH packets built with scapy


def tcp_streams(path: Path) -> dict[tuple, bytes]:
    """Each TCP direction's payload in sequence order, keyed (src, sport, dst, dport).

    Retransmitted and overlapping bytes are taken once; a stream stops at its
    first gap. Ethernet padding of short frames is not payload.
    """
    segments: dict[tuple, list[tuple[int, bytes]]] = {}
    first_seq: dict[tuple, int] = {}
    for packet in rdpcap(str(path)):
        if TCP not in packet:
            continue
        ip = packet[IP] if IP in packet else packet[IPv6]
        tcp = packet[TCP]
        key = (ip.src, tcp.sport, ip.dst, tcp.dport)
        payload = bytes(tcp.payload)
        if Padding in packet:
            payload = payload[:len(payload) - len(packet[Padding].load)]
        if tcp.flags.S:
            first_seq[key] = tcp.seq + 1
        if payload:
            segments.setdefault(key, []).append((tcp.seq, payload))
    streams = {}
    for key, parts in segments.items():
        start = first_seq.get(key, min(seq for seq, _ in parts))
        data = bytearray()
        for seq, payload in sorted(parts, key=lambda p: (p[0] - start) & 0xFFFFFFFF):
            offset = (seq - start) & 0xFFFFFFFF
            if offset > len(data):
                break
            data += payload[len(data) - offset:]
        streams[key] = bytes(data)
    return streams


def conversations(path: Path, server_port: int = 22) -> dict[tuple, tuple[bytes, bytes]]:
    """(client bytes, server bytes) per connection to ``server_port``, keyed by the client's tuple."""
    streams = tcp_streams(path)
    out = {}
    for (src, sport, dst, dport), data in streams.items():
        if dport == server_port:
            out[(src, sport, dst, dport)] = (data, streams.get((dst, dport, src, sport), b""))
    return out


def packet(payload: bytes, padding: int = 4) -> bytes:
    """An SSH binary packet around ``payload`` (RFC 4253 §6), MAC-less as before NEWKEYS."""
    return struct.pack(">IB", len(payload) + padding + 1, padding) + payload + bytes(padding)


def kexinit_payload(**lists: list[str]) -> bytes:
    """A KEXINIT payload built by scapy's SSH layer; name-lists by scapy field name."""
    fields = {name: NameList(names=[n.encode() for n in names]) for name, names in lists.items()}
    return bytes(SSHKexInit(cookie=bytes(range(16)), **fields))


OPENSSH_CLIENT = dict(
    kex_algorithms=["sntrup761x25519-sha512@openssh.com", "curve25519-sha256",
                    "curve25519-sha256@libssh.org", "ext-info-c"],
    server_host_key_algorithms=["ssh-ed25519", "rsa-sha2-512"],
    encryption_algorithms_client_to_server=["chacha20-poly1305@openssh.com", "aes128-ctr"],
    encryption_algorithms_server_to_client=["aes256-gcm@openssh.com"],
    mac_algorithms_client_to_server=["umac-64-etm@openssh.com", "hmac-sha2-256"],
    mac_algorithms_server_to_client=["hmac-sha1"],
    compression_algorithms_client_to_server=["none", "zlib@openssh.com"],
    compression_algorithms_server_to_client=["none"],
)
BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"
NEWKEYS = packet(bytes([21]), padding=10)


def client_stream() -> bytes:
    return BANNER + packet(kexinit_payload(**OPENSSH_CLIENT))


# --------------------------------------------------------------------------
# Oracles: suricata-verify's HASSH captures and FoxIO's JA4 SSH captures


@pytest.mark.parametrize("case", json.loads((HASSH / "expected.json").read_text()),
                         ids=lambda case: case["file"])
def test_hassh_corpus(case):
    (client, server), = conversations(HASSH / case["file"]).values()
    result = ssh.session(client, server)
    assert result.hassh == case["hassh"]
    assert result.hassh_server == case["hassh_server"]
    assert result.client_banner and result.server_banner


def test_hassh_incomplete_server_kexinit_keeps_the_rest():
    (client, server), = conversations(HASSH / "ssh-hassh-incomplete.pcap").values()
    result = ssh.session(client, server)
    assert result.server_banner == "SSH-2.0-OpenSSH_7.4p1 Debian-10+deb9u7"
    assert result.server_kexinit is None and result.server_kexinit_end is None
    assert result.client_kexinit_end == len(client)  # the client sent nothing after it
    assert ssh.kexinit(server[ssh.read_banner(server, server=True).end:]) is NEED_MORE


def test_hassh_reassembled_kexinit_spans_segments():
    (client, server), = conversations(HASSH / "ssh-hassh-reassembled.pcap").values()
    result = ssh.session(client, server)
    assert result.client_banner == "SSH-1.99-Cisco-1.25"  # LF only, no CR
    assert result.server_banner == "SSH-2.0-Cisco-1.25"
    # Key exchange ends at NEWKEYS, after which bytes are encrypted.
    assert result.client_kexinit_end < result.client_newkeys_end <= len(client)
    # NEWKEYS is 16 bytes here: length 12, padding 10, message 21.
    assert client[result.client_newkeys_end - 16:result.client_newkeys_end - 10] == \
        b"\x00\x00\x00\x0c\x0a\x15"


@pytest.mark.parametrize("capture", ["ssh.pcapng", "sshv1.pcap"])
def test_ja4_ssh_extras(capture):
    expected = json.loads((JA4 / f"{capture}.json").read_text())
    found = conversations(JA4 / capture)
    assert len(found) == len(expected)
    for entry in expected:
        key = (entry["src"], int(entry["srcport"]), entry["dst"], int(entry["dstport"]))
        result = ssh.session(*found[key])
        extras = entry["ssh_extras"]
        # JA4's tooling writes "" where SSH 1 has no KEXINIT.
        assert result.hassh == (extras["hassh"] or None)
        assert result.hassh_server == (extras["hassh_server"] or None)
        assert result.client_banner == extras["ssh_protocol_client"]
        assert result.server_banner == extras["ssh_protocol_server"]


# --------------------------------------------------------------------------
# Banners


def test_banner_with_comment():
    assert ssh.banner(BANNER + b"\x00\x00\x05") == "SSH-2.0-OpenSSH_9.2p1 Debian-2"
    found = ssh.read_banner(BANNER + b"rest")
    assert found.proto_version == "2.0" and found.end == len(BANNER) and found.ssh2


def test_banner_1_99_is_ssh2_and_1_5_is_not():
    assert ssh.read_banner(b"SSH-1.99-Cisco-1.25\r\n").ssh2
    old = ssh.read_banner(b"SSH-1.5-1.2.26\n")
    assert old.text == "SSH-1.5-1.2.26" and not old.ssh2
    assert ssh.session(b"SSH-1.5-1.2.26\n" + bytes(40), b"").hassh is None


@pytest.mark.parametrize("partial", [b"", b"S", b"SSH", b"SSH-", b"SSH-2.0-OpenSSH_9.2p1",
                                     b"SSH-2.0-OpenSSH_9.2p1\r"])
def test_banner_unfinished_needs_more(partial):
    assert ssh.banner(partial) is NEED_MORE


@pytest.mark.parametrize("junk", [
    b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    b"SSH-2.0\r\n", b"SSH-two-x\r\n", b"SSH--x\r\n", b"SSH-2.0-\r\n", b"SSH-2.0-a\x00b\r\n",
    b"SSH-2.0-" + b"x" * 300, b"ssh-2.0-lower\r\n"])
def test_banner_rejects(junk):
    assert ssh.banner(junk) is None


def test_server_may_send_lines_before_its_banner_client_may_not():
    prelude = b"Welcome to relay.example\r\nAuthorised use only\r\n"
    assert ssh.banner(prelude + BANNER, server=True) == "SSH-2.0-OpenSSH_9.2p1 Debian-2"
    assert ssh.read_banner(prelude + BANNER, server=True).end == len(prelude) + len(BANNER)
    assert ssh.banner(prelude + BANNER) is None
    assert ssh.banner(prelude, server=True) is NEED_MORE
    assert ssh.banner(b"\x00\x01binary\n", server=True) is None
    assert ssh.banner(b"line\r\n" * 2000 + BANNER, server=True) is None


def test_looks_like_ssh():
    assert ssh.looks_like_ssh(b"SSH-2.0-x") and ssh.looks_like_ssh(b"SS")
    assert not ssh.looks_like_ssh(b"\x16\x03") and not ssh.looks_like_ssh(b"GET ")


# --------------------------------------------------------------------------
# KEXINIT and HASSH


def test_kexinit_fields_from_scapy_built_packet():
    raw = packet(kexinit_payload(**OPENSSH_CLIENT)) + b"after"
    kex = ssh.kexinit(raw)
    assert kex.cookie == bytes(range(16))
    assert kex.kex_algorithms == ",".join(OPENSSH_CLIENT["kex_algorithms"])
    assert kex.encryption_c2s == "chacha20-poly1305@openssh.com,aes128-ctr"
    assert kex.encryption_s2c == "aes256-gcm@openssh.com"
    assert kex.languages_c2s == "" and not kex.first_kex_packet_follows
    assert kex.end == len(raw) - len(b"after")


def test_hassh_takes_client_to_server_lists_and_server_hassh_the_others():
    kex = ssh.kexinit(packet(kexinit_payload(**OPENSSH_CLIENT)))
    kex_list = ",".join(OPENSSH_CLIENT["kex_algorithms"])
    client = f"{kex_list};chacha20-poly1305@openssh.com,aes128-ctr;" \
             "umac-64-etm@openssh.com,hmac-sha2-256;none,zlib@openssh.com"
    server = f"{kex_list};aes256-gcm@openssh.com;hmac-sha1;none"
    assert ssh.hassh_string(kex) == client
    assert ssh.hassh(kex) == hashlib.md5(client.encode()).hexdigest()
    assert ssh.hassh_server_string(kex) == server
    assert ssh.hassh_server(kex) == hashlib.md5(server.encode()).hexdigest()


def test_every_unfinished_kexinit_needs_more():
    raw = packet(kexinit_payload(**OPENSSH_CLIENT))
    for cut in range(len(raw)):
        assert ssh.kexinit(raw[:cut]) is NEED_MORE, cut
    assert isinstance(ssh.kexinit(raw), ssh.KexInit)


@pytest.mark.parametrize("raw", [
    packet(bytes([21])),                                    # NEWKEYS, not KEXINIT
    struct.pack(">IBB", 40000, 4, 20) + bytes(40000),       # longer than RFC 4253 allows
    struct.pack(">IBB", 12, 12, 20) + bytes(12),            # padding swallows the payload
    packet(bytes([20]) + bytes(16) + struct.pack(">I", 999) + b"short"),  # name-list overruns
    packet(bytes([20]) + bytes(10)),                        # cookie cut short
])
def test_kexinit_rejects(raw):
    assert ssh.kexinit(raw) is None


def test_newkeys_walk_stops_at_implausible_packets():
    assert ssh.newkeys_end(NEWKEYS, 0) == len(NEWKEYS)
    # Padding that leaves no payload: the "message number" would be padding.
    assert ssh.newkeys_end(struct.pack(">IBB", 12, 11, 21) + bytes(11), 0) is None
    assert ssh.newkeys_end(struct.pack(">IBB", 40000, 4, 21), 0) is None
    assert ssh.newkeys_end(NEWKEYS[:10], 0) is NEED_MORE
    ignore = packet(bytes([2]) + struct.pack(">I", 0))
    assert ssh.newkeys_end(ignore * ssh.CLEARTEXT_PACKETS_MAX + NEWKEYS, 0) is None


def test_session_offsets_and_newkeys():
    kex = packet(kexinit_payload(**OPENSSH_CLIENT))
    dh_init = packet(bytes([30]) + struct.pack(">I", 32) + bytes(32))
    client = BANNER + kex + dh_init + NEWKEYS + b"\x8a\x6b\x1e encrypted"
    server = b"SSH-2.0-OpenSSH_9.6\r\n" + kex
    result = ssh.session(client, server)
    assert result.client_kexinit_end == len(BANNER) + len(kex)
    assert result.client_newkeys_end == len(BANNER) + len(kex) + len(dh_init) + len(NEWKEYS)
    assert result.server_kexinit_end == len(server) and result.server_newkeys_end is None
    assert result.hassh == ssh.hassh(ssh.kexinit(kex))
    assert result.hassh_server == ssh.hassh_server(ssh.kexinit(kex))


def test_banner_without_kexinit_yet():
    result = ssh.session(BANNER, b"SSH-2.0-OpenSSH_9.6\r\n\x00\x00")
    assert result.client_banner == "SSH-2.0-OpenSSH_9.2p1 Debian-2"
    assert result.server_banner == "SSH-2.0-OpenSSH_9.6"
    assert result.hassh is None and result.hassh_server is None
    assert ssh.kexinit(b"") is NEED_MORE and ssh.kexinit(b"\x00\x00\x05") is NEED_MORE


def test_garbage_session():
    result = ssh.session(b"\x16\x03\x01\x00\xa5\x01\x00\x00", b"HTTP/1.1 400 Bad\r\n\r\n")
    assert result.client_banner is None and result.hassh is None and result.hassh_server is None


# --------------------------------------------------------------------------
# Properties: never raise, only the allowed kinds




def check_kinds(data: bytes, server_data: bytes = b"") -> None:
    for server in (False, True):
        text = ssh.banner(data, server=server)
        assert text is None or text is NEED_MORE or isinstance(text, str)
    kex = ssh.kexinit(data)
    assert kex is None or kex is NEED_MORE or isinstance(kex, ssh.KexInit)
    end = ssh.newkeys_end(data, 0)
    assert end is None or end is NEED_MORE or isinstance(end, int)
    assert isinstance(ssh.session(data, server_data), ssh.SshSession)
    assert isinstance(ssh.looks_like_ssh(data), bool)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data):
    check_kinds(data, data)
    check_kinds(b"SSH-2.0-x\r\n" + data, data)


@settings(max_examples=300, deadline=None)
@given(mutated(client_stream() + NEWKEYS), mutated(client_stream()))
def test_mutated_sessions_never_raise(client, server):
    check_kinds(client, server)
    check_kinds(client[len(BANNER):], server)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(
    st.sampled_from(sorted(OPENSSH_CLIENT)),
    st.lists(st.text("abcdefghijklmnopqrstuvwxyz0123456789-@.", min_size=1, max_size=20),
             max_size=5)))
def test_generated_kexinit_round_trips(lists):
    raw = packet(kexinit_payload(**lists))
    kex = ssh.kexinit(raw)
    assert kex.kex_algorithms == ",".join(lists.get("kex_algorithms", []))
    assert kex.mac_c2s == ",".join(lists.get("mac_algorithms_client_to_server", []))
    assert kex.compression_s2c == ",".join(
        lists.get("compression_algorithms_server_to_client", []))
    assert kex.end == len(raw)
    assert ssh.session(BANNER + raw, b"").hassh == ssh.hassh(kex)
