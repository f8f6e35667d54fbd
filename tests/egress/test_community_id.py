"""Community ID v1 against corelight's baselines, and against the captures they came from."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from egress.community_id import (ICMP4_COUNTERPART, ICMP6_COUNTERPART, community_id,
                                 community_id_packed, icmp_ports)

from tests.corpora import CORPORA, corpus

CORPUS = CORPORA / "community-id"
"""/work/shared/corpora/community-id: the spec repository's baseline/ and pcaps/ (BSD)."""

BASELINES = {"baseline_deflt.json": {}, "baseline_seed1.json": {"seed": 1},
             "baseline_nob64.json": {"b64": False}}


@pytest.fixture
def needs_corpus_fixture():
    corpus("community-id")


needs_corpus = pytest.mark.usefixtures("needs_corpus_fixture")


def baseline(name: str) -> list[dict]:
    if not CORPUS.is_dir():
        return []      # collection time: the tests that use it fail or skip via corpus()
    return json.loads((CORPUS / name).read_text())


CASES = [pytest.param(entry, kwargs, id=f"{name[9:-5]}-{i}-proto{entry['proto']}")
         for name, kwargs in BASELINES.items() for i, entry in enumerate(baseline(name))]


@needs_corpus
def test_corpus_is_complete():
    for name in BASELINES:
        assert len(baseline(name)) == 23, name


@needs_corpus
@pytest.mark.parametrize("entry,kwargs", CASES)
def test_baseline(entry, kwargs):
    got = community_id(entry["proto"], entry["saddr"], entry["daddr"], entry["sport"],
                       entry["dport"], **kwargs)
    assert got == entry["communityid"]


# The tables of the spec's baseline/README.md (made by its make-tables.py): ICMP
# given as type and code before mapping, RSVP without ports.
SIP4, DIP4 = "1.2.3.4", "5.6.7.8"
SIP6 = "fe80:0001:0203:0405:0607:0809:0A0B:0C0D"
DIP6 = "fe80:1011:1213:1415:1617:1819:1A1B:1C1D"
README = [
    (6, SIP4, DIP4, 1122, 3344, "1:wCb3OG7yAFWelaUydu0D+125CLM=",
     "1:HhA1B+6CoLbiKPEs5nhNYN4XWfk=", "1:c026f7386ef200559e95a53276ed03fb5db908b3"),
    (17, DIP4, SIP4, 3344, 1122, "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg=",
     "1:OShq+iKDAMVouh/4bMxB9Sz4amw=", "1:d0cbbd227431eb3e1988264cffb1d78b658c84e8"),
    (132, SIP4, DIP4, 1122, 3344, "1:EKt4MsxuyaE6mL+hmrEkQ9csDD8=",
     "1:uitchpn5MMGAQKBJh7bIr/bAr7s=", "1:10ab7832cc6ec9a13a98bfa19ab12443d72c0c3f"),
    (1, SIP4, DIP4, 8, 0, "1:crodRHL2FEsHjbv3UkRrfbs4bZ0=",
     "1:9pr4ZGTICiuZoIh90RRYE2RyXpU=", "1:72ba1d4472f6144b078dbbf752446b7dbb386d9d"),
    (1, DIP4, SIP4, 0, 0, "1:crodRHL2FEsHjbv3UkRrfbs4bZ0=",
     "1:9pr4ZGTICiuZoIh90RRYE2RyXpU=", "1:72ba1d4472f6144b078dbbf752446b7dbb386d9d"),
    (1, SIP4, DIP4, 11, 0, "1:f/YiSyWqczrTgfUCZlBUnvHRcPk=",
     "1:1DD7cWGC/Yg91YGsQeni8du3pIA=", "1:7ff6224b25aa733ad381f5026650549ef1d170f9"),
    (58, SIP6, DIP6, 128, 0, "1:0bf7hyMJUwt3fMED7z8LIfRpBeo=",
     "1:IO27GQzPuCtNnwFvjWALMHu5tJE=", "1:d1b7fb872309530b777cc103ef3f0b21f46905ea"),
    (58, DIP6, SIP6, 129, 0, "1:0bf7hyMJUwt3fMED7z8LIfRpBeo=",
     "1:IO27GQzPuCtNnwFvjWALMHu5tJE=", "1:d1b7fb872309530b777cc103ef3f0b21f46905ea"),
    (58, SIP6, DIP6, 146, 0, "1:fYC8+pz24E+EhANP1EZhpX0Dw10=",
     "1:Cv4IKJe56BNkF0MBW2YxQ3Nwc3s=", "1:7d80bcfa9cf6e04f8484034fd44661a57d03c35d"),
    (46, DIP4, SIP4, None, None, "1:ikv3kmf89luf73WPz1jOs49S768=",
     "1:/buhqeOmaRCopOZFy9HnoJd5XW8=", "1:8a4bf79267fcf65b9fef758fcf58ceb38f52efaf"),
    (46, SIP6, DIP6, None, None, "1:wQ/2mwrnXP4lmJcHdGL5ePjR+e0=",
     "1:j6EyyfBzL4vWKHFXgUqb5Az3OxM=", "1:c10ff69b0ae75cfe259897077462f978f8d1f9ed"),
]


@pytest.mark.parametrize("proto,saddr,daddr,sport,dport,deflt,seed1,nob64", README)
def test_spec_readme_tables(proto, saddr, daddr, sport, dport, deflt, seed1, nob64):
    assert community_id(proto, saddr, daddr, sport, dport) == deflt
    assert community_id(proto, saddr, daddr, sport, dport, seed=1) == seed1
    assert community_id(proto, saddr, daddr, sport, dport, b64=False) == nob64


def flows_in_capture() -> list[tuple[int, bytes, bytes, int | None, int | None]]:
    """(proto, saddr, daddr, sport, dport) of every IP packet, read as the decoder would."""
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6
    from scapy.utils import rdpcap

    packets = rdpcap(io.BytesIO(gzip.decompress((CORPUS / "combined.pcap.gz").read_bytes())))
    out = []
    for pkt in packets:
        if IP in pkt:
            ip, proto = pkt[IP], pkt[IP].proto
        elif IPv6 in pkt:
            ip, proto = pkt[IPv6], pkt[IPv6].nh
        else:
            continue  # ARP
        raw = bytes(ip)
        if isinstance(ip, IPv6):
            saddr, daddr, l4 = raw[8:24], raw[24:40], raw[40:]
        else:
            saddr, daddr, l4 = raw[12:16], raw[16:20], raw[(raw[0] & 0xF) * 4:]
        if proto in (6, 17, 132):
            sport, dport = int.from_bytes(l4[0:2], "big"), int.from_bytes(l4[2:4], "big")
        elif proto in (1, 58):
            sport, dport = l4[0], l4[1]  # type, code
        else:
            sport = dport = None
        out.append((proto, saddr, daddr, sport, dport))
    return out


@needs_corpus
@pytest.mark.parametrize("name", BASELINES)
def test_capture_agrees_with_baseline(name):
    expected = {e["communityid"] for e in baseline(name)}
    flows = flows_in_capture()
    assert len(flows) == 62  # 68 packets less 6 ARP
    seen = set()
    for proto, saddr, daddr, sport, dport in flows:
        got = community_id_packed(proto, saddr, daddr, sport, dport, **BASELINES[name])
        assert got in expected, (proto, saddr.hex(), daddr.hex(), sport, dport)
        seen.add(got)
    assert seen == expected  # and every baseline id comes from some packet


def test_text_and_packed_agree():
    import ipaddress
    a, b = ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("2001:db8::2")
    assert community_id(6, str(a), str(b), 1, 2) == community_id_packed(6, a.packed, b.packed, 1, 2)


addresses4 = st.ip_addresses(v=4).map(str)
ports = st.integers(0, 65535)


@given(st.sampled_from([6, 17, 132]), addresses4, addresses4, ports, ports)
def test_both_directions_same_id(proto, a, b, pa, pb):
    assert community_id(proto, a, b, pa, pb) == community_id(proto, b, a, pb, pa)


@given(st.sampled_from(sorted(ICMP4_COUNTERPART)), addresses4, addresses4, st.integers(0, 255))
def test_icmp_request_and_reply_share_an_id(icmp_type, a, b, code):
    reply = ICMP4_COUNTERPART[icmp_type]
    assert community_id(1, a, b, icmp_type, code) == community_id(1, b, a, reply, 0)


@given(st.sampled_from(sorted(ICMP6_COUNTERPART)), st.ip_addresses(v=6).map(str),
       st.ip_addresses(v=6).map(str))
def test_icmp6_request_and_reply_share_an_id(icmp_type, a, b):
    reply = ICMP6_COUNTERPART[icmp_type]
    assert community_id(58, a, b, icmp_type, 0) == community_id(58, b, a, reply, 0)


def test_one_way_icmp_keeps_direction():
    assert icmp_ports(1, 3, 1) == (3, 1, True)
    assert community_id(1, "10.0.0.2", "10.0.0.1", 3, 1) != \
        community_id(1, "10.0.0.1", "10.0.0.2", 3, 1)


def test_portless_protocols_ignore_ports():
    assert community_id(47, "10.0.0.1", "10.0.0.2", 5, 6) == \
        community_id(47, "10.0.0.2", "10.0.0.1", None, None)


@pytest.mark.parametrize("args", [
    (6, "10.0.0.1", "2001:db8::1", 1, 2),   # mixed families
    (6, "10.0.0.1", "10.0.0.2", None, 2),    # a port protocol without ports
    (17, "10.0.0.1", "10.0.0.2", 1, 70000),  # port out of range
    (6, "10.0.0.1", "not-an-address", 1, 2),
    (256, "10.0.0.1", "10.0.0.2", None, None),
])
def test_bad_input_is_a_value_error(args):
    with pytest.raises(ValueError):
        community_id(*args)
