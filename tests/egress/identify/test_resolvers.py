"""Known encrypted-DNS resolvers: the packaged list, strict parsing, lookup and kind."""

from __future__ import annotations

import ipaddress

import pytest

from egress.identify import resolvers
from egress.identify.resolvers import ResolverListError, kind, lookup, parse


# --------------------------------------------------------------------------
# The packaged list


def test_packaged_list_loads_with_sources():
    known = resolvers.load()
    assert known is resolvers.load()  # read once
    assert known.source.strip()
    names = [r.name for r in known.resolvers]
    assert len(names) == len(set(names)) >= 8
    for r in known.resolvers:
        assert r.source.strip() and r.protocols and (r.hosts or r.addresses), r.name
        for a in r.addresses:
            assert not ipaddress.ip_address(a).is_private, (r.name, a)


@pytest.mark.parametrize("name,address,expected", [
    ("cloudflare-dns.com", None, "cloudflare"),
    ("ONE.one.one.one.", None, "cloudflare"),
    ("mozilla.cloudflare-dns.com", None, "cloudflare"),
    (None, "1.1.1.1", "cloudflare"),
    (None, "2606:4700:4700:0:0:0:0:1111", "cloudflare"),
    (None, "1.1.1.3", "cloudflare-families"),
    ("dns.google", None, "google"),
    (None, "8.8.4.4", "google"),
    (None, "::ffff:8.8.8.8", "google"),
    (None, "2001:4860:4860::8888", "google"),
    ("dns.quad9.net", None, "quad9"),
    (None, "9.9.9.9", "quad9"),
    ("dns.adguard-dns.com", None, "adguard"),
    ("doh.opendns.com", None, "opendns"),
    ("abc123.dns.nextdns.io", None, "nextdns"),
    ("dns.nextdns.io", None, "nextdns"),
    (None, "76.76.2.11", "controld"),
    ("adblock.dns.mullvad.net", None, "mullvad"),
    ("www.example.com", "1.1.1.1", "cloudflare"),  # the name misses, the address hits
])
def test_lookup_hits(name, address, expected):
    found = lookup(name, address)
    assert found is not None and found.name == expected


@pytest.mark.parametrize("name,address", [
    (None, None), ("", ""), ("cloudflare-dns.com.evil.example", None),
    ("xcloudflare-dns.com", None), ("nextdns.io", None), ("google", None),
    (None, "1.1.1.4"), (None, "not an address"), (None, "192.0.2.1"),
])
def test_lookup_misses(name, address):
    assert lookup(name, address) is None


# --------------------------------------------------------------------------
# kind


CF = lookup("cloudflare-dns.com", None)
OPENDNS = lookup("doh.opendns.com", None)


@pytest.mark.parametrize("transport,dport,app,resolver,expected", [
    ("tcp", 853, "tls", None, "dot"),
    ("TCP", 853, "TLS", CF, "dot"),
    ("udp", 853, "quic", None, "doq"),
    ("tcp", 853, None, None, None),          # nothing identified yet
    ("tcp", 853, "http", CF, None),
    ("udp", 853, "dns", None, None),
    ("tcp", 443, "tls", CF, "doh"),
    ("udp", 443, "quic", CF, "doh"),
    ("tcp", 443, "tls", None, None),         # the web: not told apart without a known resolver
    ("tcp", 443, "http", CF, None),
    ("tcp", 8443, "tls", CF, None),
    ("udp", 443, "tls", CF, None),
    ("tcp", 443, "tls", OPENDNS, "doh"),
])
def test_kind(transport, dport, app, resolver, expected):
    assert kind(transport, dport, app, resolver) == expected


def test_kind_needs_doh_offered():
    dot_only = parse('source = "x"\n[[resolver]]\nname = "d"\nsource = "p"\n'
                     'addresses = ["192.0.2.53"]\nprotocols = ["dot"]\n')
    r = dot_only.lookup(None, "192.0.2.53")
    assert kind("tcp", 443, "tls", r) is None and kind("tcp", 853, "tls", r) == "dot"


# --------------------------------------------------------------------------
# Strict parsing


GOOD = '''source = "test"
[[resolver]]
name = "r"
source = "page"
hosts = ["DNS.Example.", "*.dns.example.net"]
addresses = ["2001:DB8::53", "192.0.2.53"]
protocols = ["doh", "dot", "doq"]
'''


def test_parse_normalises():
    known = parse(GOOD)
    (r,) = known.resolvers
    assert r.hosts == ("dns.example", "*.dns.example.net")
    assert r.addresses == ("2001:db8::53", "192.0.2.53")
    assert known.lookup("a.b.dns.example.net", None) is r
    assert known.lookup("dns.example.net", None) is None  # the suffix itself is not below it


@pytest.mark.parametrize("change,message", [
    (("protocols = [", "colour = 1\nprotocols = ["), r"resolver\[0\]\.colour: unknown key"),
    (('source = "test"', 'source = "test"\nversion = 2'), "version: unknown key"),
    (('source = "test"\n', ''), "source: required"),
    (('source = "page"\n', ''), "'r'.source: required"),
    (('"192.0.2.53"', '"192.0.2.999"'), "not an address: '192.0.2.999'"),
    (('"doq"', '"dnscrypt"'), "'dnscrypt' is not one of doh, dot, doq"),
    (('"*.dns.example.net"', '"*.*.net"'), "not a host name"),
    (('hosts = ["DNS.Example.", "*.dns.example.net"]', 'hosts = "dns.example"'),
     "hosts: expected a list of strings"),
    (("protocols = [\"doh\", \"dot\", \"doq\"]", "protocols = []"), "protocols: required"),
    (('name = "r"', 'name = ""'), r"resolver\[0\]\.name: required"),
    (('source = "test"', 'source = "test'), "not valid TOML"),
])
def test_parse_errors_name_the_key(change, message):
    old, new = change
    assert old in GOOD
    with pytest.raises(ResolverListError, match=message):
        parse(GOOD.replace(old, new), "list.toml")


def test_duplicates_refused():
    twice = GOOD + GOOD[GOOD.index("[[resolver]]"):]
    with pytest.raises(ResolverListError, match="listed twice"):
        parse(twice)
    other = GOOD + GOOD[GOOD.index("[[resolver]]"):].replace('name = "r"', 'name = "s"')
    with pytest.raises(ResolverListError, match="also belongs to 'r'"):
        parse(other)


def test_needs_hosts_or_addresses():
    bare = 'source = "x"\n[[resolver]]\nname = "n"\nsource = "p"\nprotocols = ["doh"]\n'
    with pytest.raises(ResolverListError, match="needs hosts or addresses"):
        parse(bare)


def test_load_missing_file(tmp_path):
    with pytest.raises(ResolverListError, match="cannot read"):
        resolvers.load(tmp_path / "absent.toml")
