"""spend-endpoint: control planes, payment and exchange APIs the purpose did not declare.

Through the real judge: every category and match form (exact, ``*.`` suffix, by DNS,
SNI, QUIC, HTTP Host and tunnel), declared (exact host, CIDR) against undeclared (no
rule, a wildcard that happens to cover it), and the strict data file."""

from __future__ import annotations

import pytest

from egress.detectors import spend
from egress.detectors.spend import SpendEndpoint, SpendListError
from egress.judge import Judge
from egress.records import (HttpInfo, Mode, QuicInfo, Severity, SpendEndpointEvidence, Step,
                            Tunnel, Verdict)
from tests.factories import make_judge, make_dns_flow, make_flow, make_http_flow, make_tls_flow

ADDR = "203.0.113.10"

SMALL = '''
source = "test list"
licence = "test licence"

[[endpoint]]
category = "cloud-control-plane"
hosts = ["ctl.cloud.test", "*.regions.cloud.test"]
source = "cloud docs"

[[endpoint]]
category = "payment"
hosts = ["api.pay.test"]
source = "pay docs"

[[endpoint]]
category = "exchange"
hosts = ["*.trade.test"]
source = "exchange docs"
'''


def judge_for(text: str = "", mode=Mode.AUDIT, endpoints=None) -> Judge:
    return make_judge(text, mode, detectors=[SpendEndpoint(endpoints)])


def resolve(judge: Judge, name: str, address: str = ADDR):
    judge.learn_names(make_dns_flow(name, [address]))


def spends(flow) -> list[SpendEndpointEvidence]:
    return [f.evidence for f in flow.findings if f.id == "spend-endpoint"]


def ids(flow) -> list[str]:
    return [f.id for f in flow.findings]


@pytest.fixture(scope="module")
def small():
    return spend.parse(SMALL, "small.toml")


# ------------------------------------------------------------- the packaged list

@pytest.mark.parametrize("name, category", [
    ("iam.amazonaws.com", "cloud-control-plane"),
    ("sts.amazonaws.com", "cloud-control-plane"),
    ("sts.eu-west-1.amazonaws.com", "cloud-control-plane"),
    ("ec2.us-east-1.amazonaws.com", "cloud-control-plane"),
    ("organizations.us-east-1.amazonaws.com", "cloud-control-plane"),
    ("ce.us-east-1.amazonaws.com", "cloud-control-plane"),
    ("compute.googleapis.com", "cloud-control-plane"),
    ("cloudbilling.googleapis.com", "cloud-control-plane"),
    ("management.azure.com", "cloud-control-plane"),
    ("api.digitalocean.com", "cloud-control-plane"),
    ("api.hetzner.cloud", "cloud-control-plane"),
    ("api.linode.com", "cloud-control-plane"),
    ("api.vultr.com", "cloud-control-plane"),
    ("api.stripe.com", "payment"),
    ("api-m.paypal.com", "payment"),
    ("1797a841fbb37ca7-acme-checkout-live.adyenpayments.com", "payment"),
    ("payments.braintree-api.com", "payment"),
    ("api.binance.com", "exchange"),
    ("api.coinbase.com", "exchange"),
    ("api.exchange.coinbase.com", "exchange"),
    ("api.kraken.com", "exchange"),
    ("api.bitfinex.com", "exchange"),
    ("api.kucoin.com", "exchange"),
    ("api.bybit.com", "exchange"),
])
def test_packaged_endpoints_are_flagged_when_undeclared(name, category):
    j = judge_for()
    resolve(j, name)
    flow = j.judge_flow(make_tls_flow(name, dst=ADDR))
    assert spends(flow) == [SpendEndpointEvidence(name=name, category=category)]
    finding = next(f for f in flow.findings if f.id == "spend-endpoint")
    assert finding.severity is Severity.HIGH and not finding.waived


@pytest.mark.parametrize("name", [
    "mybucket.s3.amazonaws.com",          # data planes are package mirrors too
    "s3.us-east-1.amazonaws.com",
    "amazonaws.com",
    "storage.googleapis.com",
    "www.googleapis.com",
    "stripe.com",                          # the web site, not the API
    "www.paypal.com",
    "adyenpayments.com",                   # a wildcard never covers the suffix itself
    "checkout-test.adyen.com",             # test endpoints move no money
    "api.sandbox.paypal.com",
    "testnet.binance.vision",
    "example.org",
])
def test_what_is_not_listed_is_not_flagged(name):
    j = judge_for()
    resolve(j, name)
    assert spends(j.judge_flow(make_tls_flow(name, dst=ADDR))) == []


def test_packaged_list_says_where_it_comes_from():
    listed = spend.load()
    assert listed.source and listed.licence
    assert {e.category for e in listed.endpoints} == set(spend.CATEGORIES)
    assert all(e.source and e.hosts for e in listed.endpoints)
    hosts = {h for e in listed.endpoints for h in e.hosts}
    # Whole clouds are never listed: their data planes carry ordinary downloads.
    assert not {"*.amazonaws.com", "*.googleapis.com", "*.azure.com", "*.windows.net"} & hosts


# ------------------------------------------------------------------ match forms

@pytest.mark.parametrize("name, expected", [
    ("ctl.cloud.test", ("ctl.cloud.test", "cloud-control-plane")),
    ("CTL.Cloud.Test.", ("ctl.cloud.test", "cloud-control-plane")),   # case, trailing dot
    ("eu.regions.cloud.test", ("eu.regions.cloud.test", "cloud-control-plane")),
    ("a.b.regions.cloud.test", ("a.b.regions.cloud.test", "cloud-control-plane")),
    ("regions.cloud.test", None),                # the suffix itself is not below it
    ("xregions.cloud.test", None),
    ("api.pay.test", ("api.pay.test", "payment")),
    ("www.api.pay.test", None),                  # an exact name covers only itself
    ("spot.trade.test", ("spot.trade.test", "exchange")),
    ("trade.test", None),
])
def test_exact_and_suffix_entries_match_like_manifest_hosts(small, name, expected):
    j = judge_for(endpoints=small)
    flow = j.judge_flow(make_tls_flow(name, dst=ADDR))     # by SNI, no DNS
    want = [SpendEndpointEvidence(name=expected[0], category=expected[1])] if expected else []
    assert spends(flow) == want


def test_a_dns_name_is_enough_at_start(small):
    j = judge_for(endpoints=small)
    resolve(j, "api.pay.test")
    flow = j.judge_flow(make_flow(dst=ADDR))               # no payload: start only
    assert spends(flow) == [SpendEndpointEvidence(name="api.pay.test", category="payment")]
    assert flow.decided_at is Step.START


def test_sni_at_the_gate(small):
    j = judge_for(endpoints=small)
    flow = j.judge_flow(make_tls_flow("api.pay.test", dst=ADDR))
    assert spends(flow) and flow.name_source == "sni"


def test_quic_sni(small):
    j = judge_for(endpoints=small)
    flow = j.judge_flow(make_flow(proto="udp", app="quic", dst=ADDR,
                                  quic=QuicInfo(version="0x00000001", sni="api.pay.test")))
    assert spends(flow) == [SpendEndpointEvidence(name="api.pay.test", category="payment")]


def test_http_host_without_its_port(small):
    j = judge_for(endpoints=small)
    flow = j.judge_flow(make_http_flow("api.pay.test:8080", dst=ADDR))
    assert spends(flow) == [SpendEndpointEvidence(name="api.pay.test", category="payment")]


def test_a_sent_name_counts_even_when_dns_gave_another(small):
    j = judge_for(endpoints=small)
    resolve(j, "innocent.example")
    for flow in (make_http_flow("api.pay.test", dst=ADDR),
                 make_tls_flow("api.pay.test", dst=ADDR)):
        flow = j.judge_flow(flow)
        assert flow.server_name == "innocent.example" and "sni-mismatch" in ids(flow)
        assert spends(flow) == [SpendEndpointEvidence(name="api.pay.test", category="payment")]


def test_what_a_tunnel_reaches(small):
    j = judge_for('waive = ["direct-ip"]\n[[allow]]\ncidr = "192.0.2.8/32"\nports = [3128]\n'
                  'protocol = "any"\n', endpoints=small)
    flow = j.judge_flow(make_flow(dst="192.0.2.8", dport=3128, app="tls",
                                  http=HttpInfo(method="CONNECT", host="spot.trade.test:443"),
                                  tunnel=Tunnel(kind="http-connect", host="spot.trade.test",
                                                port=443)))
    assert spends(flow) == [SpendEndpointEvidence(name="spot.trade.test", category="exchange")]


def test_an_address_is_not_a_name(small):
    j = judge_for(endpoints=small)
    flow = j.judge_flow(make_http_flow(ADDR, dst=ADDR))
    assert spends(flow) == []


# ---------------------------------------------------------------- declared or not

@pytest.mark.parametrize("rule, flagged", [
    ('host = "api.pay.test"', False),                       # named exactly: declared
    ('cidr = "203.0.113.0/24"', False),                     # by address: declared
    ('host = "*.pay.test"', True),                          # a wildcard covers, not declares
    ('host = "other.test"', True),                          # no rule matched at all
    (None, True),
])
def test_only_an_exact_host_or_a_cidr_declares(small, rule, flagged):
    text = f"[[allow]]\n{rule}\n" if rule else ""
    j = judge_for(text, endpoints=small)
    resolve(j, "api.pay.test")
    flow = j.judge_flow(make_tls_flow("api.pay.test", dst=ADDR))
    assert bool(spends(flow)) is flagged, flow.findings
    if not flagged:
        assert flow.findings == [] and flow.verdict is Verdict.ALLOW


def test_a_wildcard_covered_endpoint_is_blocked_in_enforce_mode():
    j = judge_for('[[allow]]\nhost = "*.amazonaws.com"\n', Mode.ENFORCE)
    resolve(j, "iam.amazonaws.com")
    flow = j.judge_flow(make_tls_flow("iam.amazonaws.com", dst=ADDR))
    assert ids(flow) == ["spend-endpoint"]
    assert flow.verdict is Verdict.BLOCK and flow.decided_at is Step.START
    # ... while the same wildcard still lets a data plane through.
    resolve(j, "mybucket.s3.amazonaws.com", "203.0.113.11")
    ok = j.judge_flow(make_tls_flow("mybucket.s3.amazonaws.com", dst="203.0.113.11"))
    assert ok.findings == [] and ok.verdict is Verdict.ALLOW


def test_exact_declaration_of_a_real_endpoint_allows_it():
    j = judge_for('[[allow]]\nhost = "api.stripe.com"\n', Mode.ENFORCE)
    resolve(j, "api.stripe.com")
    flow = j.judge_flow(make_tls_flow("api.stripe.com", dst=ADDR))
    assert flow.findings == [] and flow.verdict is Verdict.ALLOW


def test_it_can_be_waived_as_high_findings_can():
    j = judge_for('waive = ["spend-endpoint"]\n[[allow]]\nhost = "*.stripe.com"\n', Mode.ENFORCE)
    resolve(j, "api.stripe.com")
    flow = j.judge_flow(make_tls_flow("api.stripe.com", dst=ADDR))
    assert ids(flow) == ["spend-endpoint"] and flow.findings[0].waived
    assert flow.verdict is Verdict.ALLOW


def test_seen_at_start_and_gate_is_said_once(small):
    j = judge_for(endpoints=small)
    resolve(j, "api.pay.test")
    flow = j.judge_flow(make_tls_flow("api.pay.test", dst=ADDR))
    assert ids(flow).count("spend-endpoint") == 1
    assert SpendEndpoint.steps == frozenset({Step.START, Step.GATE})


# --------------------------------------------------------------------- the file

def write(tmp_path, text: str):
    path = tmp_path / "spend.toml"
    path.write_text(text)
    return path


GOOD_ENTRY = '[[endpoint]]\ncategory = "payment"\nhosts = ["api.pay.test"]\nsource = "docs"\n'
HEAD = 'source = "s"\nlicence = "l"\n'


@pytest.mark.parametrize("text, key", [
    (HEAD + 'sources = "x"\n', "sources"),                                    # unknown top key
    (HEAD + GOOD_ENTRY + 'url = "https://x"\n', r"endpoint\[0\]\.url"),      # unknown entry key
    ('licence = "l"\n' + GOOD_ENTRY, "source"),
    ('source = "s"\n' + GOOD_ENTRY, "licence"),
    ('source = "s\\nsecond line"\nlicence = "l"\n', "source"),
    (HEAD + '[[endpoint]]\ncategory = "bank"\nhosts = ["a.test"]\nsource = "d"\n',
     r"endpoint\[0\]\.category"),
    (HEAD + '[[endpoint]]\nhosts = ["a.test"]\nsource = "d"\n', r"endpoint\[0\]\.category"),
    (HEAD + '[[endpoint]]\ncategory = "payment"\nhosts = []\nsource = "d"\n',
     r"endpoint\[0\]\.hosts"),
    (HEAD + '[[endpoint]]\ncategory = "payment"\nhosts = "a.test"\nsource = "d"\n',
     r"endpoint\[0\]\.hosts"),
    (HEAD + '[[endpoint]]\ncategory = "payment"\nhosts = ["a.*.test"]\nsource = "d"\n',
     r"endpoint\[0\]\.hosts"),
    (HEAD + '[[endpoint]]\ncategory = "payment"\nhosts = ["192.0.2.1"]\nsource = "d"\n',
     r"endpoint\[0\]\.hosts"),
    (HEAD + '[[endpoint]]\ncategory = "payment"\nhosts = ["a.test"]\n', r"endpoint\[0\]\.source"),
    (HEAD + GOOD_ENTRY + GOOD_ENTRY.replace("payment", "exchange"), r"endpoint\[1\]\.hosts"),
    (HEAD + 'endpoint = "x"\n', "endpoint"),
    (HEAD + '[[endpoint\n', "not valid TOML"),
])
def test_a_bad_file_is_refused_naming_the_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(SpendListError, match=key) as e:
        spend.load(path)
    assert str(e.value).startswith(str(path))


def test_a_good_file_loads(tmp_path):
    listed = spend.load(write(tmp_path, HEAD + GOOD_ENTRY))
    assert listed.source == "s" and listed.licence == "l"
    assert listed.lookup("api.pay.test").category == "payment"
    assert listed.lookup("other.test") is None


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(SpendListError, match="cannot read"):
        spend.load(tmp_path / "absent.toml")
