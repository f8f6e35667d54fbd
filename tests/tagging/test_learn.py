"""Learning a purpose from what a task did (tagging.learn): the rules, what never becomes
policy, and a round trip through the judge."""

from __future__ import annotations

import random
import tomllib

from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main
from egress.names import bindings_from
from egress.records import (Finding, FlowRecord, HttpInfo, Mode, QuicInfo, StratumInfo, TaskEvent,
                            Tunnel, Verdict)
from egress.replay import replay
from egress.sources.capture import CaptureSource
from tagging import learn as learning, manifest
from tagging.attribution import Attribution, parse_networks
from tests.factories import (T0, make_dns_flow, make_event, make_finding, make_flow,
                             make_http_flow, make_ssh_flow, make_tls_flow)


def named(make, name, **fields):
    """A connection the judge named from a DNS answer."""
    fields.setdefault("server_name", name)
    fields.setdefault("name_source", "dns")
    return make(**fields)


def tls(name, **fields):
    return named(lambda **kw: make_tls_flow(name, **kw), name, **fields)


def allow_tables(text: str) -> list[dict]:
    return tomllib.loads(text).get("allow", [])


def profiles_of(text: str) -> list[str]:
    return tomllib.loads(text).get("profiles", [])


def mining(**fields):
    return named(make_flow, "pool.supportxmr.com", dst="198.51.100.42", dport=3333,
                 app="stratum", findings=[Finding.make("mining-stratum", method="login")],
                 **fields)


# ------------------------------------------------------------------ the rules, table-driven

CASES = [
    ("names over addresses",
     lambda: [tls("api.example.org")],
     [{"host": "api.example.org", "ports": [443]}], []),
    ("a name from SNI alone is still a name",
     lambda: [tls("api.example.org", name_source="sni")],
     [{"host": "api.example.org", "ports": [443]}], []),
    ("a resolver reached by address is a /32 dns rule",
     lambda: [make_dns_flow("example.org", ["203.0.113.10"], dst="192.0.2.53")],
     [{"cidr": "192.0.2.53/32", "ports": [53], "protocol": "dns"}], []),
    ("an IPv6 resolver is a /128",
     lambda: [make_dns_flow("example.org", ["203.0.113.10"], dst="2001:db8::53",
                            ip_version=6, src="2001:db8::2")],
     [{"cidr": "2001:db8::53/128", "ports": [53], "protocol": "dns"}], []),
    ("a resolver on a private address is the dns profile",
     lambda: [make_dns_flow("example.org", ["203.0.113.10"])],
     [], ["dns"]),
    ("three siblings make a wildcard",
     lambda: [tls(f"{n}.cdn.example.org") for n in ("a", "b", "c")],
     [{"host": "*.cdn.example.org", "ports": [443]}], []),
    ("two siblings stay names",
     lambda: [tls(f"{n}.cdn.example.org") for n in ("a", "b")],
     [{"host": "a.cdn.example.org", "ports": [443]},
      {"host": "b.cdn.example.org", "ports": [443]}], []),
    ("the suffix itself is not below its wildcard",
     lambda: [tls(n) for n in ("example.org", "a.example.org", "b.example.org",
                               "c.example.org")],
     [{"host": "example.org", "ports": [443]}, {"host": "*.example.org", "ports": [443]}], []),
    ("the longest suffix with three names, the rest stays",
     lambda: [tls(n) for n in ("a.b.example.org", "c.b.example.org", "d.b.example.org",
                               "e.example.org")],
     [{"host": "*.b.example.org", "ports": [443]}, {"host": "e.example.org", "ports": [443]}],
     []),
    ("never a wildcard over a public suffix",
     lambda: [tls(f"{n}.github.io") for n in ("a", "b", "c")]
     + [tls(f"{n}.co.uk") for n in ("x", "y", "z")],
     [{"host": f"{n}.github.io", "ports": [443]} for n in ("a", "b", "c")]
     + [{"host": f"{n}.co.uk", "ports": [443]} for n in ("x", "y", "z")], []),
    ("names under a registrable domain below a public suffix",
     lambda: [tls(f"{n}.shop.co.uk") for n in ("a", "b", "c")],
     [{"host": "*.shop.co.uk", "ports": [443]}], []),
    ("contiguous ports merge, others stay",
     lambda: [named(make_http_flow, "dev.example.org", host="dev.example.org", dport=p)
              for p in (8002, 8000, 8001, 8080)],
     [{"host": "dev.example.org", "ports": ["8000-8002", 8080], "protocol": "http"}], []),
    ("protocol omitted when the port implies it",
     lambda: [named(make_http_flow, "www.example.org", host="www.example.org"),
              named(make_ssh_flow, "git.example.org")],
     [{"host": "git.example.org", "ports": [22]}, {"host": "www.example.org", "ports": [80]}],
     []),
    ("protocol said when the port does not imply it",
     lambda: [tls("api.example.org", dport=8443),
              named(make_ssh_flow, "git.example.org", dport=2222)],
     [{"host": "api.example.org", "ports": [8443], "protocol": "tls"},
      {"host": "git.example.org", "ports": [2222], "protocol": "ssh"}], []),
    ("one rule per protocol, protocol kept where one port would not imply it",
     lambda: [tls("api.example.org"), tls("api.example.org", dport=8443)],
     [{"host": "api.example.org", "ports": [443, 8443], "protocol": "tls"}], []),
    ("quic over udp",
     lambda: [named(make_flow, "video.example.org", proto="udp", app="quic",
                    quic=QuicInfo(version="0x00000001", sni="video.example.org"))],
     [{"host": "video.example.org", "ports": [443], "protocol": "quic"}], []),
    ("an unidentified protocol is any, said only where the port implies another",
     lambda: [named(make_flow, "db.example.org", app="unknown", dport=5432),
              named(make_flow, "odd.example.net", app="unknown"),
              named(make_flow, "game.example.com", proto="udp", app="unknown", dport=7777)],
     [{"host": "db.example.org", "ports": [5432]},
      {"host": "game.example.com", "ports": [7777], "transport": "udp"},
      {"host": "odd.example.net", "ports": [443], "protocol": "any"}], []),
    ("siblings under a wildcard share one rule per protocol",
     lambda: [named(make_flow, "db.example.org", app="unknown", dport=5432),
              named(make_flow, "odd.example.org", app="unknown"),
              tls("www.example.org")],
     [{"host": "*.example.org", "ports": [443, 5432], "protocol": "any"},
      {"host": "*.example.org", "ports": [443]}], []),
    ("ping by name",
     lambda: [named(make_flow, "status.example.org", proto="icmp", app="icmp", sport=None,
                    dport=None)],
     [{"host": "status.example.org", "transport": "icmp"}], []),
    ("pypi.org and files.pythonhosted.org are the pypi profile",
     lambda: [tls("pypi.org"), tls("files.pythonhosted.org"), tls("pypi.org")],
     [], ["pypi"]),
    ("a profile that does not cover everything to its names is not used",
     lambda: [tls("pypi.org"), named(make_http_flow, "pypi.org", host="pypi.org")],
     [{"host": "pypi.org", "ports": [80]}, {"host": "pypi.org", "ports": [443]}], []),
    ("git over ssh and https to github is the github profile",
     lambda: [named(make_ssh_flow, "github.com"), tls("github.com"), tls("api.github.com")],
     [], ["github"]),
    ("findings relative to the purpose in force do not keep a flow out",
     lambda: [tls("api.example.org", findings=[Finding.make(
         "undeclared-destination", name="api.example.org", address="203.0.113.10",
         port=443, transport="tcp")])],
     [{"host": "api.example.org", "ports": [443]}], []),
    ("critical findings keep a flow out",
     lambda: [mining(), tls("api.example.org")],
     [{"host": "api.example.org", "ports": [443]}], []),
    ("ssh to a destination nobody declared for ssh is never learned",
     lambda: [named(make_ssh_flow, "relay.example", findings=[Finding.make(
         "ssh-egress", client_banner="SSH-2.0-OpenSSH_9.2p1", declared_for_ssh=[])])],
     [], []),
    ("a bare address is not learned by default",
     lambda: [make_tls_flow(None, dst="203.0.113.20",
                            findings=[make_finding(address="203.0.113.20")])],
     [], []),
    ("the task's own resolver needs no rule",
     lambda: [make_dns_flow("example.org", ["203.0.113.10"],
                            rule="egress: the task's own resolver 10.213.0.1/32 udp/tcp/53 dns")],
     [], []),
    ("inbound, link-local and other tasks' flows are not the task's egress",
     lambda: [tls("in.example.org", direction="inbound"),
              make_flow(proto="icmp6", ip_version=6, src="fe80::2", dst="ff02::2", dport=None,
                        sport=None, app="icmp"),
              tls("other.example.org", task="t2"), tls("api.example.org")],
     [{"host": "api.example.org", "ports": [443]}], []),
    ("a tunnel: the proxy and the target",
     lambda: [named(make_flow, "proxy.example.org", dport=3128, app="tls",
                    http=HttpInfo(method="CONNECT", host="api.example.org:443"),
                    tunnel=Tunnel(kind="http-connect", host="api.example.org", port=443))],
     [{"host": "api.example.org", "ports": [443]},
      {"host": "proxy.example.org", "ports": [3128], "protocol": "http"}], []),
]


@pytest.mark.parametrize("name,flows,tables,profiles", CASES, ids=[c[0] for c in CASES])
def test_learned_rules(name, flows, tables, profiles):
    learned = learning.learn(flows(), "t1")
    manifest.parse(learned.text, "learned.toml")
    assert allow_tables(learned.text) == tables
    assert profiles_of(learned.text) == profiles


def test_addresses_learned_when_asked():
    flows = [make_tls_flow(None, dst="203.0.113.20"),
             make_flow(dst="2001:db8::7", ip_version=6, src="2001:db8::2", app="unknown",
                       dport=9000),
             make_flow(proto="icmp6", dst="2001:db8::7", ip_version=6, src="2001:db8::2",
                       app="icmp", sport=None, dport=None)]
    text = learning.learn(flows, "t1", addresses=True).text
    assert allow_tables(text) == [{"cidr": "203.0.113.20/32", "ports": [443]},
                                  {"cidr": "2001:db8::7/128", "transport": "icmp"},
                                  {"cidr": "2001:db8::7/128", "ports": [9000]}]
    assert text.count("# reached by address (no DNS name)") == 3


def test_the_head_and_the_evidence_of_each_rule():
    first = tls("api.example.org", start=T0, end=T0 + 2_000_000)
    second = tls("api.example.org", start=T0 + 60_000_000, end=T0 + 61_500_000)
    learned = learning.learn([second, first], "t1")
    data = tomllib.loads(learned.text)
    assert data["version"] == 1 and data["task"] == "t1" and data["mode"] == "enforce"
    assert data["purpose"] == ("Learned from task t1, 2026-03-11T02:14:07Z to "
                               "2026-03-11T02:15:08Z")
    lines = learned.text.splitlines()
    at = lines.index("[[allow]]")
    assert lines[at - 1] == ("# 2 flows, first 2026-03-11T02:14:07Z, "
                             "last 2026-03-11T02:15:08Z")
    assert (learned.flows, learned.learned, learned.rules) == (2, 2, 1)


def test_the_flows_left_out_are_listed():
    flows = [mining(start=T0, end=T0 + 5_000_000), mining(start=T0 + 10_000_000),
             tls("api.example.org"),
             make_tls_flow(None, dst="203.0.113.20", dport=443)]
    learned = learning.learn(flows, "t1")
    assert allow_tables(learned.text) == [{"host": "api.example.org", "ports": [443]}]
    assert learned.excluded == 2 and learned.by_address == 1
    block = learned.text.split("# Not learned: flows with high or critical findings")[1]
    assert ("#   pool.supportxmr.com 198.51.100.42 tcp/3333 stratum: mining-stratum; "
            "2 flows, first 2026-03-11T02:14:07Z") in block
    assert "#   203.0.113.20 tcp/443 tls; 1 flow" in block
    assert "supportxmr" not in learned.text.split("# Not learned")[0]


def test_a_fronted_name_is_listed_with_the_name_it_sent():
    fronted = make_tls_flow(
        "other.lab", server_name="pypi.lab", name_source="dns",
        findings=[Finding.make("sni-mismatch", seen="other.lab", source="sni",
                               resolved_names=["pypi.lab"])])
    text = learning.learn([fronted], "t1").text
    assert "#   pypi.lab 203.0.113.10 tcp/443 tls (sent name other.lab): sni-mismatch" in text
    assert allow_tables(text) == []


def test_waived_findings_are_learned_and_waived_again():
    flow = tls("api.example.org", findings=[Finding.make(
        "spend-endpoint", name="api.example.org", category="payment", waived=True)])
    data = tomllib.loads(learning.learn([flow], "t1").text)
    assert data["waive"] == ["spend-endpoint"]
    assert data["allow"] == [{"host": "api.example.org", "ports": [443]}]


def test_task_events_with_high_findings_are_listed():
    events = [make_event("dns-refused", findings=[Finding.make("dns-refused", name="evil.example",
                                                               qtype="A")]),
              make_event("task-started")]
    text = learning.learn([tls("api.example.org")], "t1", events=events).text
    assert "#   dns-refused evil.example; 1 event, first" in text


def test_own_resolvers_given():
    flows = [make_dns_flow("example.org", ["203.0.113.10"], dst="192.0.2.53")]
    learned = learning.learn(flows, "t1", own_resolvers=["192.0.2.53"])
    assert allow_tables(learned.text) == [] and learned.learned == 0


def test_interim_records_count_once():
    interim = tls("api.example.org", event="interim")
    final = tls("api.example.org", flow_id=interim.flow_id)
    assert learning.learn([interim, final], "t1").flows == 1


def test_deterministic():
    flows = [tls(f"{n}.cdn.example.org") for n in "abcd"] + [
        make_dns_flow("x.example", ["203.0.113.9"], dst="192.0.2.53"), tls("pypi.org"),
        named(make_http_flow, "dev.example.org", host="dev.example.org", dport=8000), mining()]
    text = learning.learn(flows, "t1").text
    for seed in range(5):
        shuffled = flows[:]
        random.Random(seed).shuffle(shuffled)
        assert learning.learn(shuffled, "t1").text == text


def test_no_flows_is_an_error():
    with pytest.raises(learning.LearnError, match="no flows of task 't9'"):
        learning.learn([tls("api.example.org")], "t9")


def test_wildcards_need_three():
    assert learning.wildcards(["a.example.org", "b.example.org"]) == {}
    assert learning.wildcards(["a.example.org", "b.example.org", "c.example.org"]) == {
        n: "*.example.org" for n in ("a.example.org", "b.example.org", "c.example.org")}
    assert learning.wildcards(["a.example.org", "b.example.org", "c.example.org"], 4) == {}


def test_public_suffix_and_registrable():
    assert learning.public_suffix("a.b.example.org") == "org"
    assert learning.public_suffix("shop.co.uk") == "co.uk"
    assert learning.public_suffix("me.github.io") == "github.io"
    assert learning.registrable("a.b.example.org") == "example.org"
    assert learning.registrable("x.bucket.s3.amazonaws.com") == "bucket.s3.amazonaws.com"
    assert learning.registrable("co.uk") is None
    assert learning.port_ranges([3, 1, 2, 7, 9, 8, 20]) == [(1, 3), (7, 9), (20, 20)]


# ------------------------------------------------------------------ round trip through the judge

RESOLVER = "192.0.2.53"


def _task_did():
    """Raw observations of a task (unjudged): lookups and connections, good and bad."""
    out = []

    def lookup(name, address):
        out.append(make_dns_flow(name, [address], dst=RESOLVER))

    def connect(make, **fields):
        out.append(make(**fields))

    for name, address in (("pypi.org", "151.101.0.223"),
                          ("files.pythonhosted.org", "151.101.64.223"),
                          ("a.cdn.example.org", "203.0.113.31"),
                          ("b.cdn.example.org", "203.0.113.32"),
                          ("c.cdn.example.org", "203.0.113.33"),
                          ("api.example.org", "203.0.113.40"),
                          ("pool.supportxmr.com", "198.51.100.42"),
                          ("relay.example", "198.51.100.7")):
        lookup(name, address)
    connect(make_tls_flow, sni="pypi.org", dst="151.101.0.223")
    connect(make_tls_flow, sni="files.pythonhosted.org", dst="151.101.64.223")
    for n, ip in (("a", 31), ("b", 32), ("c", 33)):
        connect(make_tls_flow, sni=f"{n}.cdn.example.org", dst=f"203.0.113.{ip}")
    connect(make_http_flow, host="api.example.org:8080", dst="203.0.113.40", dport=8080)
    connect(make_http_flow, host="api.example.org:8081", dst="203.0.113.40", dport=8081)
    # what never becomes policy: a miner, ssh to a stranger, a bare address, a fronted name
    connect(make_flow, dst="198.51.100.42", dport=3333, app="stratum",
            stratum=StratumInfo(method="login", agent="XMRig/6.21.0"))
    connect(make_ssh_flow, dst="198.51.100.7")
    connect(make_tls_flow, sni=None, dst="203.0.113.99")
    connect(make_tls_flow, sni="relay.example", dst="151.101.0.223")
    return out


GOOD = {"151.101.0.223:pypi.org", "151.101.64.223", "203.0.113.31", "203.0.113.32",
        "203.0.113.33", "203.0.113.40"}


def _key(flow: FlowRecord) -> str:
    if flow.dst == "151.101.0.223":
        return f"{flow.dst}:{flow.tls.sni}"
    return flow.dst


def _judged(purpose, mode=Mode.AUDIT):
    items = []
    for flow in _task_did():
        items.extend(bindings_from(flow))
        items.append(flow)
    out = []
    replay(items, purpose, task="t1", mode=mode, on_record=out.append)
    return ([r for r in out if isinstance(r, FlowRecord)],
            [r for r in out if isinstance(r, TaskEvent)])


def test_round_trip_learned_flows_allowed_the_rest_blocked():
    flows, events = _judged(learning.capture_purpose())
    learned = learning.learn(flows, "t1", events=events)
    purpose = manifest.parse(learned.text, "learned.toml")
    assert purpose.mode is Mode.ENFORCE and purpose.profiles == ("pypi",)
    assert allow_tables(learned.text) == [
        {"host": "api.example.org", "ports": ["8080-8081"], "protocol": "http"},
        {"host": "*.cdn.example.org", "ports": [443]},
        {"cidr": f"{RESOLVER}/32", "ports": [53], "protocol": "dns"}]
    for bad in ("pool.supportxmr.com", "relay.example"):
        assert bad not in learned.text.split("# Not learned")[0]

    again, _ = _judged(purpose, Mode.ENFORCE)
    connections = [f for f in again if f.app != "dns"]
    assert len(connections) == 11
    for flow in connections:
        if _key(flow) in GOOD:
            assert flow.verdict is Verdict.ALLOW, (flow.dst, flow.findings)
        else:
            assert flow.verdict is Verdict.BLOCK, (flow.dst, flow.findings)
    assert all(f.verdict is Verdict.ALLOW for f in again if f.app == "dns")


# ------------------------------------------------------------------ the command, on a lab capture

ROOT = Path(__file__).resolve().parents[2]
CAPTURE = ROOT / "tests/lab/captures/pip-stratum-directip-fronting.pcap"
LAB_TASK = ["--task", "lab-pip", "--local", "10.99.0.2/32"]


def egress(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_learned_from_the_lab_capture_allows_pip_and_nothing_else(tmp_path):
    """pip from pypi.lab, a Stratum miner (cleartext and in TLS), curl to a bare address and
    a fronted ClientHello (tests/lab/test_egress_cases.py): only pypi.lab is learned."""
    out = tmp_path / "learned.toml"
    done = egress("rules", "learn", *LAB_TASK, CAPTURE, "-o", out)
    assert done.exit_code == 0, done.output
    assert done.output.startswith(f"egress: wrote {out}: 1 rule(s), profiles dns;")
    assert egress("purpose", "check", out).exit_code == 0
    text = out.read_text()
    assert allow_tables(text) == [{"host": "pypi.lab", "ports": [443]}]
    assert profiles_of(text) == ["dns"]        # the lab's resolver, 10.99.0.1
    listed = text.split("# Not learned")[1:]
    assert "pool.supportxmr.com 198.51.100.42 tcp/3333 stratum: mining-pool, mining-stratum" \
        in listed[0]
    assert "pool.supportxmr.com 198.51.100.42 tcp/443 tls: mining-pool" in listed[0]
    assert "pypi.lab 203.0.113.10 tcp/443 tls (sent name other.lab): sni-mismatch" in listed[0]
    assert "203.0.113.20 tcp/443 tls; 1 flow" in listed[1]
    # stdout gives the same manifest
    assert egress("rules", "learn", *LAB_TASK, CAPTURE).stdout == text

    # the capture again, under the learned purpose: pip passes, the rest is still caught
    purpose = manifest.load(out)
    records = []
    who = Attribution(task="lab-pip", local=parse_networks(["10.99.0.2/32"]))
    replay(CaptureSource([str(CAPTURE)], who), purpose, on_record=records.append)
    flows = [r for r in records if isinstance(r, FlowRecord) and r.task == "lab-pip"]
    index = [f for f in flows if f.tls and f.tls.sni == "pypi.lab"]
    assert index and all(f.verdict is Verdict.ALLOW and not f.findings for f in index)
    assert all(f.verdict is Verdict.ALLOW for f in flows if f.app == "dns")
    caught = {f.dst + ":" + str(f.dport) + ":" + (f.tls.sni if f.tls and f.tls.sni else ""):
              f.verdict for f in flows if f not in index and f.app != "dns"}
    assert caught == {"198.51.100.42:3333:": Verdict.BLOCK,
                      "198.51.100.42:443:pool.supportxmr.com": Verdict.BLOCK,
                      "203.0.113.20:443:": Verdict.BLOCK,
                      "203.0.113.10:443:other.lab": Verdict.BLOCK}


def test_learned_from_the_store(tmp_path):
    db = tmp_path / "egress.db"
    purpose = tmp_path / "audit.toml"
    purpose.write_text('version = 1\npurpose = "anything, audited"\n\n[[allow]]\n'
                       'cidr = "0.0.0.0/0"\nports = ["1-65535"]\nprotocol = "any"\n')
    done = egress("replay", CAPTURE, "--purpose", purpose, *LAB_TASK, "--db", db)
    assert done.exit_code == 10, done.output
    learned = egress("rules", "learn", "--task", "lab-pip", "--db", db)
    assert learned.exit_code == 0, learned.output
    assert allow_tables(learned.stdout) == [{"host": "pypi.lab", "ports": [443]}]
    assert profiles_of(learned.stdout) == ["dns"]
    assert "mining-stratum" in learned.stdout and "sni-mismatch" in learned.stdout
    missing = egress("rules", "learn", "--task", "nobody", "--db", db)
    assert missing.exit_code == 1
    assert missing.output == "egress: no flows of task nobody in the store\n"


def test_command_errors_are_one_line(tmp_path):
    none = egress("rules", "learn", "--task", "nobody", "--local", "192.0.2.1/32", CAPTURE)
    assert none.exit_code == 1
    assert none.output == f"egress: no flows of task nobody in {CAPTURE}\n"
    both = egress("rules", "learn", "--task", "t", "--db", tmp_path / "x.db", CAPTURE)
    assert both.exit_code == 2 and "captures or --db, not both" in both.output
    local = egress("rules", "learn", "--task", "t", "--local", "10.0.0.1/32",
                   "--db", tmp_path / "x.db")
    assert local.exit_code == 2
    absent = egress("rules", "learn", "--task", "t", tmp_path / "nope.pcap")
    assert absent.exit_code == 1 and absent.output.count("\n") == 1
    bad_local = egress("rules", "learn", "--task", "t", "--local", "nonsense", CAPTURE)
    assert bad_local.exit_code == 1 and bad_local.output.startswith("egress: --local:")
