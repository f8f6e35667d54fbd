"""QUIC Initial decryption: RFC 9001 and RFC 9369 vectors, our own encoder, fuzzing."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings, strategies as st

from egress.identify import quic
from egress.identify.common import NEED_MORE
from egress.identify.tls import ClientHello
from tests.egress.identify.test_tls import make_hello

RFC_DCID = bytes.fromhex("8394c8f03e515708")

# RFC 9001 Appendix A.2: the client's Initial, protected (1200 bytes).
RFC9001_CLIENT_INITIAL = bytes.fromhex(
    "c000000001088394c8f03e5157080000449e7b9aec34d1b1c98dd7689fb8ec11"
    "d242b123dc9bd8bab936b47d92ec356c0bab7df5976d27cd449f63300099f399"
    "1c260ec4c60d17b31f8429157bb35a1282a643a8d2262cad67500cadb8e7378c"
    "8eb7539ec4d4905fed1bee1fc8aafba17c750e2c7ace01e6005f80fcb7df6212"
    "30c83711b39343fa028cea7f7fb5ff89eac2308249a02252155e2347b63d58c5"
    "457afd84d05dfffdb20392844ae812154682e9cf012f9021a6f0be17ddd0c208"
    "4dce25ff9b06cde535d0f920a2db1bf362c23e596d11a4f5a6cf3948838a3aec"
    "4e15daf8500a6ef69ec4e3feb6b1d98e610ac8b7ec3faf6ad760b7bad1db4ba3"
    "485e8a94dc250ae3fdb41ed15fb6a8e5eba0fc3dd60bc8e30c5c4287e53805db"
    "059ae0648db2f64264ed5e39be2e20d82df566da8dd5998ccabdae053060ae6c"
    "7b4378e846d29f37ed7b4ea9ec5d82e7961b7f25a9323851f681d582363aa5f8"
    "9937f5a67258bf63ad6f1a0b1d96dbd4faddfcefc5266ba6611722395c906556"
    "be52afe3f565636ad1b17d508b73d8743eeb524be22b3dcbc2c7468d54119c74"
    "68449a13d8e3b95811a198f3491de3e7fe942b330407abf82a4ed7c1b311663a"
    "c69890f4157015853d91e923037c227a33cdd5ec281ca3f79c44546b9d90ca00"
    "f064c99e3dd97911d39fe9c5d0b23a229a234cb36186c4819e8b9c5927726632"
    "291d6a418211cc2962e20fe47feb3edf330f2c603a9d48c0fcb5699dbfe58964"
    "25c5bac4aee82e57a85aaf4e2513e4f05796b07ba2ee47d80506f8d2c25e50fd"
    "14de71e6c418559302f939b0e1abd576f279c4b2e0feb85c1f28ff18f58891ff"
    "ef132eef2fa09346aee33c28eb130ff28f5b766953334113211996d20011a198"
    "e3fc433f9f2541010ae17c1bf202580f6047472fb36857fe843b19f5984009dd"
    "c324044e847a4f4a0ab34f719595de37252d6235365e9b84392b061085349d73"
    "203a4a13e96f5432ec0fd4a1ee65accdd5e3904df54c1da510b0ff20dcc0c77f"
    "cb2c0e0eb605cb0504db87632cf3d8b4dae6e705769d1de354270123cb11450e"
    "fc60ac47683d7b8d0f811365565fd98c4c8eb936bcab8d069fc33bd801b03ade"
    "a2e1fbc5aa463d08ca19896d2bf59a071b851e6c239052172f296bfb5e724047"
    "90a2181014f3b94a4e97d117b438130368cc39dbb2d198065ae3986547926cd2"
    "162f40a29f0c3c8745c0f50fba3852e566d44575c29d39a03f0cda721984b6f4"
    "40591f355e12d439ff150aab7613499dbd49adabc8676eef023b15b65bfc5ca0"
    "6948109f23f350db82123535eb8a7433bdabcb909271a6ecbcb58b936a88cd4e"
    "8f2e6ff5800175f113253d8fa9ca8885c2f552e657dc603f252e1a8e308f76f0"
    "be79e2fb8f5d5fbbe2e30ecadd220723c8c0aea8078cdfcb3868263ff8f09400"
    "54da48781893a7e49ad5aff4af300cd804a6b6279ab3ff3afb64491c85194aab"
    "760d58a606654f9f4400e8b38591356fbf6425aca26dc85244259ff2b19c41b9"
    "f96f3ca9ec1dde434da7d2d392b905ddf3d1f9af93d1af5950bd493f5aa731b4"
    "056df31bd267b6b90a079831aaf579be0a39013137aac6d404f518cfd4684064"
    "7e78bfe706ca4cf5e9c5453e9f7cfd2b8b4c8d169a44e55c88d4a9a7f9474241"
    "e221af44860018ab0856972e194cd934"
)

# RFC 9001 Appendix A.2: the unprotected header and the CRYPTO frame (then 917 bytes of PADDING).
RFC_CLIENT_HEADER = bytes.fromhex("c300000001088394c8f03e5157080000449e00000002")
RFC_CLIENT_CRYPTO_FRAME = bytes.fromhex(
    "060040f1010000ed0303ebf8fa56f12939b9584a3896472ec40bb863cfd3e868"
    "04fe3a47f06a2b69484c00000413011302010000c000000010000e00000b6578"
    "616d706c652e636f6dff01000100000a00080006001d00170018001000070005"
    "04616c706e000500050100000000003300260024001d00209370b2c9caa47fba"
    "baf4559fedba753de171fa71f50f1ce15d43e994ec74d748002b000302030400"
    "0d0010000e0403050306030203080408050806002d00020101001c0002400100"
    "3900320408ffffffffffffffff05048000ffff07048000ffff08011001048000"
    "75300901100f088394c8f03e51570806048000ffff"
)

# RFC 9369 Appendix A.2: the same Initial in QUIC version 2.
RFC9369_CLIENT_INITIAL = bytes.fromhex(
    "d76b3343cf088394c8f03e5157080000449ea0c95e82ffe67b6abcdb4298b485"
    "dd04de806071bf03dceebfa162e75d6c96058bdbfb127cdfcbf903388e99ad04"
    "9f9a3dd4425ae4d0992cfff18ecf0fdb5a842d09747052f17ac2053d21f57c5d"
    "250f2c4f0e0202b70785b7946e992e58a59ac52dea6774d4f03b55545243cf1a"
    "12834e3f249a78d395e0d18f4d766004f1a2674802a747eaa901c3f10cda5500"
    "cb9122faa9f1df66c392079a1b40f0de1c6054196a11cbea40afb6ef5253cd68"
    "18f6625efce3b6def6ba7e4b37a40f7732e093daa7d52190935b8da58976ff33"
    "12ae50b187c1433c0f028edcc4c2838b6a9bfc226ca4b4530e7a4ccee1bfa2a3"
    "d396ae5a3fb512384b2fdd851f784a65e03f2c4fbe11a53c7777c023462239dd"
    "6f7521a3f6c7d5dd3ec9b3f233773d4b46d23cc375eb198c63301c21801f6520"
    "bcfb7966fc49b393f0061d974a2706df8c4a9449f11d7f3d2dcbb90c6b877045"
    "636e7c0c0fe4eb0f697545460c806910d2c355f1d253bc9d2452aaa549e27a1f"
    "ac7cf4ed77f322e8fa894b6a83810a34b361901751a6f5eb65a0326e07de7c12"
    "16ccce2d0193f958bb3850a833f7ae432b65bc5a53975c155aa4bcb4f7b2c4e5"
    "4df16efaf6ddea94e2c50b4cd1dfe06017e0e9d02900cffe1935e0491d77ffb4"
    "fdf85290fdd893d577b1131a610ef6a5c32b2ee0293617a37cbb08b847741c3b"
    "8017c25ca9052ca1079d8b78aebd47876d330a30f6a8c6d61dd1ab5589329de7"
    "14d19d61370f8149748c72f132f0fc99f34d766c6938597040d8f9e2bb522ff9"
    "9c63a344d6a2ae8aa8e51b7b90a4a806105fcbca31506c446151adfeceb51b91"
    "abfe43960977c87471cf9ad4074d30e10d6a7f03c63bd5d4317f68ff325ba3bd"
    "80bf4dc8b52a0ba031758022eb025cdd770b44d6d6cf0670f4e990b22347a7db"
    "848265e3e5eb72dfe8299ad7481a408322cac55786e52f633b2fb6b614eaed18"
    "d703dd84045a274ae8bfa73379661388d6991fe39b0d93debb41700b41f90a15"
    "c4d526250235ddcd6776fc77bc97e7a417ebcb31600d01e57f32162a8560cacc"
    "7e27a096d37a1a86952ec71bd89a3e9a30a2a26162984d7740f81193e8238e61"
    "f6b5b984d4d3dfa033c1bb7e4f0037febf406d91c0dccf32acf423cfa1e70710"
    "10d3f270121b493ce85054ef58bada42310138fe081adb04e2bd901f2f13458b"
    "3d6758158197107c14ebb193230cd1157380aa79cae1374a7c1e5bbcb80ee23e"
    "06ebfde206bfb0fcbc0edc4ebec309661bdd908d532eb0c6adc38b7ca7331dce"
    "8dfce39ab71e7c32d318d136b6100671a1ae6a6600e3899f31f0eed19e3417d1"
    "34b90c9058f8632c798d4490da4987307cba922d61c39805d072b589bd52fdf1"
    "e86215c2d54e6670e07383a27bbffb5addf47d66aa85a0c6f9f32e59d85a44dd"
    "5d3b22dc2be80919b490437ae4f36a0ae55edf1d0b5cb4e9a3ecabee93dfc6e3"
    "8d209d0fa6536d27a5d6fbb17641cde27525d61093f1b28072d111b2b4ae5f89"
    "d5974ee12e5cf7d5da4d6a31123041f33e61407e76cffcdcfd7e19ba58cf4b53"
    "6f4c4938ae79324dc402894b44faf8afbab35282ab659d13c93f70412e85cb19"
    "9a37ddec600545473cfb5a05e08d0b209973b2172b4d21fb69745a262ccde96b"
    "a18b2faa745b6fe189cf772a9f84cbfc"
)


# --------------------------------------------------------------------------
# A small Initial encoder: the client side of RFC 9001 §5, with the same primitives


def varint(value: int, size: int | None = None) -> bytes:
    size = size or next(n for n in (1, 2, 4, 8) if value < 1 << (8 * n - 2))
    return (value | ({1: 0, 2: 1, 4: 2, 8: 3}[size] << (8 * size - 2))).to_bytes(size, "big")


def crypto_frame(offset: int, data: bytes) -> bytes:
    return b"\x06" + varint(offset) + varint(len(data)) + data


def protect(payload: bytes, *, version: int = quic.VERSION_1, dcid: bytes = RFC_DCID,
            key_dcid: bytes | None = None, scid: bytes = b"", pn: int = 0, pn_length: int = 4,
            packet_type: int | None = None, pad_to: int | None = 1200) -> bytes:
    """One protected long-header packet; keys from ``key_dcid`` (the original DCID)."""
    key, iv, hp = quic.client_initial_keys(version, key_dcid or dcid)
    if packet_type is None:
        packet_type = 0b01 if version == quic.VERSION_2 else 0b00
    is_initial = packet_type == (0b01 if version == quic.VERSION_2 else 0b00)

    def header(body_length: int) -> bytes:
        return (bytes((0xC0 | packet_type << 4 | (pn_length - 1),)) + version.to_bytes(4, "big")
                + bytes((len(dcid),)) + dcid + bytes((len(scid),)) + scid
                + (varint(0) if is_initial else b"")
                + varint(pn_length + body_length + 16, 2) + pn.to_bytes(pn_length, "big"))

    if pad_to is not None:
        payload += bytes(max(0, pad_to - len(header(len(payload))) - len(payload) - 16))
    plain_header = header(len(payload))
    nonce = (int.from_bytes(iv, "big") ^ pn).to_bytes(12, "big")
    sealed = AESGCM(key).encrypt(nonce, payload, plain_header)
    sample = sealed[4 - pn_length:20 - pn_length]
    mask = Cipher(algorithms.AES(hp), modes.ECB()).encryptor().update(sample)
    protected = bytearray(plain_header)
    protected[0] ^= mask[0] & 0x0F
    for i in range(pn_length):
        protected[-pn_length + i] ^= mask[1 + i]
    return bytes(protected) + sealed


def test_encoder_reproduces_rfc9001():
    payload = RFC_CLIENT_CRYPTO_FRAME + bytes(917)
    assert protect(payload, pn=2, pad_to=None) == RFC9001_CLIENT_INITIAL
    assert RFC_CLIENT_HEADER[0] == 0xC3  # an Initial with a 4-byte packet number


# --------------------------------------------------------------------------
# RFC vectors


def test_rfc9001_keys():
    assert quic.client_initial_keys(quic.VERSION_1, RFC_DCID) == (
        bytes.fromhex("1f369613dd76d5467730efcbe3b1a22d"),
        bytes.fromhex("fa044b2f42a3fd3b46fb255c"),
        bytes.fromhex("9f50449e04a0e810283a1e9933adedd2"))


def test_rfc9369_keys():
    assert quic.client_initial_keys(quic.VERSION_2, RFC_DCID) == (
        bytes.fromhex("8b1a0bc121284290a29e0971b5cd045d"),
        bytes.fromhex("91f73e2351d8fa91660e909f"),
        bytes.fromhex("45b95e15235d6f45a6b19cbcb0294ba9"))


@pytest.mark.parametrize("datagram,version", [
    (RFC9001_CLIENT_INITIAL, "0x00000001"),
    (RFC9369_CLIENT_INITIAL, "0x6b3343cf"),
])
def test_rfc_client_initial(datagram, version):
    assert quic.is_quic_initial_start(datagram)
    result = quic.initial([datagram])
    assert isinstance(result, quic.QuicInitial)
    assert (result.version, result.sni, result.alpn, result.complete) == (
        version, "example.com", ["alpn"], True)
    assert result.ech is False
    assert result.hello.cipher_suites == [0x1301, 0x1302]
    assert result.hello.supported_versions == [0x0304]
    exts = "0005,000a,000d,001c,002b,002d,0033,0039,ff01_0403,0503,0603,0203,0804,0805,0806"
    assert result.hello.ja4_raw("q") == f"q13d0211an_1301,1302_{exts}"
    assert result.ja4 == result.hello.ja4("q") and result.ja4.startswith("q13d0211an_")


def test_tampered_rfc_initial_is_none():
    tampered = bytearray(RFC9001_CLIENT_INITIAL)
    tampered[600] ^= 1
    assert quic.initial([bytes(tampered)]) is None


# --------------------------------------------------------------------------
# Our own flights: split, reordered, coalesced


BIG_HELLO = make_hello(sni="pq.example.net", alpn=[b"h3"], key_share=2400)


def chunks(data: bytes, size: int) -> list[tuple[int, bytes]]:
    return [(offset, data[offset:offset + size]) for offset in range(0, len(data), size)]


def flight(pieces, **kwargs) -> list[bytes]:
    """One Initial per CRYPTO piece, each in its own 1200-byte datagram, numbered in order."""
    return [protect(crypto_frame(offset, data), pn=pn, **kwargs)
            for pn, (offset, data) in enumerate(pieces)]


@pytest.mark.parametrize("version", [quic.VERSION_1, quic.VERSION_2], ids=["v1", "v2"])
def test_hello_over_several_datagrams(version):
    assert len(BIG_HELLO) > 2400
    datagrams = flight(chunks(BIG_HELLO, 1000), version=version)
    assert len(datagrams) >= 3 and all(len(d) == 1200 for d in datagrams)
    result = quic.initial(datagrams)
    assert result.complete and result.sni == "pq.example.net" and result.alpn == ["h3"]
    assert result.version == f"0x{version:08x}"
    assert result.ja4 == result.hello.ja4("q")
    assert result.ja4.startswith("q13d0307h3_")


def test_first_packet_only_needs_more():
    datagrams = flight(chunks(BIG_HELLO, 1000))
    for count in range(1, len(datagrams)):
        assert quic.initial(datagrams[:count]) is NEED_MORE
    partial = quic.initial(datagrams[:1], final=True)
    assert partial == quic.QuicInitial(version="0x00000001", sni=None, alpn=None, ja4=None,
                                       ech=None, complete=False, hello=None)


def test_crypto_frames_out_of_order_and_overlapping():
    pieces = chunks(BIG_HELLO, 700)
    first, rest = pieces[0], pieces[1:]
    # Chrome scatters CRYPTO frames, with PING and PADDING between, inside each packet.
    packet_one = (crypto_frame(*rest[0]) + b"\x01" + bytes(7) + crypto_frame(*first))
    reordered = [protect(packet_one, pn=0)]
    reordered += [protect(crypto_frame(*piece), pn=pn) for pn, piece in
                  enumerate(reversed(rest[1:]), start=1)]
    reordered.append(protect(crypto_frame(300, BIG_HELLO[300:1600]), pn=99))  # a resend
    result = quic.initial(reordered)
    assert result.complete and result.sni == "pq.example.net"
    assert result.hello == quic.initial(flight(chunks(BIG_HELLO, 1000))).hello


def test_coalesced_packets_and_other_frames():
    half = len(BIG_HELLO) // 2
    ack = b"\x02" + varint(0) + varint(0) + varint(1) + varint(0) + varint(0) + varint(0)
    close = b"\x1c" + varint(0) + varint(0) + varint(3) + b"bye"
    one = protect(ack + crypto_frame(0, BIG_HELLO[:half]), pn=0, pad_to=None)
    two = protect(crypto_frame(half, BIG_HELLO[half:]) + close, pn=1, pad_to=None)
    handshake = protect(b"\x01" * 30, packet_type=0b10, pad_to=None)  # skipped by its length
    datagram = one + handshake + two
    datagram += bytes(max(0, 1200 - len(datagram)))  # datagram padding after the packets
    result = quic.initial([datagram])
    assert result.complete and result.sni == "pq.example.net"


def test_later_packets_use_the_servers_connection_id():
    pieces = chunks(BIG_HELLO, 1000)
    datagrams = [protect(crypto_frame(*pieces[0]), pn=0)]
    datagrams += [protect(crypto_frame(*piece), pn=pn, dcid=b"\x11" * 8, key_dcid=RFC_DCID)
                  for pn, piece in enumerate(pieces[1:], start=1)]
    assert quic.initial(datagrams).complete


def test_unknown_frame_stops_that_packet_only():
    pieces = chunks(BIG_HELLO, 1000)
    datagrams = [protect(crypto_frame(*pieces[0]) + b"\x1e" + crypto_frame(*pieces[1]), pn=0)]
    datagrams += flight(pieces[1:])
    assert quic.initial(datagrams).complete


def test_malformed_hello_is_incomplete():
    datagrams = [protect(crypto_frame(0, b"\x01\x00\x00\x05" + b"\xff" * 5))]
    assert quic.initial(datagrams) == quic.QuicInitial(
        version="0x00000001", sni=None, alpn=None, ja4=None, ech=None, complete=False, hello=None)


def test_quick_check():
    datagram = protect(crypto_frame(0, BIG_HELLO[:900]))
    assert quic.is_quic_initial_start(datagram)
    assert not quic.is_quic_initial_start(datagram[:1199])            # too short for an Initial
    assert not quic.is_quic_initial_start(b"\x40" + datagram[1:])     # short header
    assert not quic.is_quic_initial_start(datagram[:1] + b"\xff\x00\x00\x1d" + datagram[5:])
    assert not quic.is_quic_initial_start(protect(b"\x01", packet_type=0b10))  # Handshake
    # Version 2 moved the Initial type: a v1-typed packet with the v2 version is not one.
    v2 = protect(b"\x01", version=quic.VERSION_2)
    assert quic.is_quic_initial_start(v2)
    assert not quic.is_quic_initial_start(bytes((v2[0] & 0xCF,)) + v2[1:])


@pytest.mark.parametrize("datagrams", [
    [], [b""], [b"\x00" * 1200], [os.urandom(1200)], [b"GET / HTTP/1.1\r\n" * 80],
])
def test_garbage_is_none(datagrams):
    assert quic.initial(datagrams) is None


# --------------------------------------------------------------------------
# Never raises


SPLIT = flight(chunks(BIG_HELLO, 1000))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=1400), max_size=4))
def test_random_datagrams_never_raise(datagrams):
    quic.initial(datagrams)
    quic.initial([RFC9001_CLIENT_INITIAL[:7] + d for d in datagrams], final=True)
    for datagram in datagrams:
        quic.is_quic_initial_start(datagram)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(SPLIT) - 1),
       st.lists(st.tuples(st.integers(0, 1199), st.integers(0, 255)), max_size=6),
       st.integers(0, 1200))
def test_mutated_datagrams_never_raise(which, changes, cut):
    datagrams = list(SPLIT)
    mutated = bytearray(datagrams[which])
    for position, value in changes:
        mutated[position] = value
    datagrams[which] = bytes(mutated[:cut])
    result = quic.initial(datagrams)
    assert result is None or result is NEED_MORE or isinstance(result, quic.QuicInitial)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=1100), st.binary(max_size=1100))
def test_any_decrypted_payload_never_raises(first, second):
    """Frames are parsed from whatever the AEAD opens: random plaintexts, validly sealed."""
    datagram = protect(first, pad_to=None)
    datagram += bytes(max(0, 1200 - len(datagram)))
    result = quic.initial([datagram, protect(second, pn=1)], final=True)
    assert isinstance(result, quic.QuicInitial) or result is None
    if isinstance(result, quic.QuicInitial) and result.complete:
        assert isinstance(result.hello, ClientHello)
