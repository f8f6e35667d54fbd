"""The judge: DESIGN.md's verdict table, every manifest rule form, steps, waivers, limits."""

import pytest

from egress.judge import Judge
from egress.records import (Finding, Mode, Severity, Step, Verdict, verdict_for, TlsInfo,
                            QuicInfo)
from egress.detectors import Window
from tagging import manifest
from tests.factories import (PURPOSE_HEAD, make_judge, make_dns_flow, make_flow,
                             make_http_flow, make_ssh_flow,
                             make_tls_flow)

def judge_for(text: str, mode=Mode.AUDIT, detectors=None) -> Judge:
    return make_judge(text, mode, detectors=detectors)


def resolve(judge: Judge, name: str, address: str, **kw):
    dns = make_dns_flow(name, [address], **kw)
    judge.learn_names(dns)
    return dns


def ids(flow):
    return [f.id for f in flow.findings]


# ------------------------------------------------------------------ verdict table

@pytest.mark.parametrize("severity, audit, enforce", [
    (None, "allow", "allow"),
    (Severity.INFO, "allow", "allow"),
    (Severity.LOW, "allow", "allow"),
    (Severity.MEDIUM, "flag", "flag"),
    (Severity.HIGH, "flag", "block"),
    (Severity.CRITICAL, "flag", "block"),
])
def test_verdict_table(severity, audit, enforce):
    assert verdict_for(severity, Mode.AUDIT) == Verdict(audit)
    assert verdict_for(severity, Mode.ENFORCE) == Verdict(enforce)


ALLOW_EXAMPLE = '[[allow]]\nhost = "example.org"\n'
ALLOW_BOTH = ALLOW_EXAMPLE + '[[allow]]\ncidr = "192.0.2.0/24"\n'


def _allowed(j):
    resolve(j, "example.org", "203.0.113.10")
    return make_tls_flow("example.org")


def _medium(j):  # direct-ip: an allowed address no DNS answer gave the task
    return make_tls_flow(None, dst="192.0.2.5")


def _high(j):  # undeclared-destination
    resolve(j, "other.example", "198.51.100.1")
    return make_tls_flow("other.example", dst="198.51.100.1")


def _critical(j):  # metadata-endpoint
    return make_http_flow("169.254.169.254", dst="169.254.169.254")


@pytest.mark.parametrize("build, expected_ids, audit, enforce", [
    (_allowed, [], "allow", "allow"),
    (_medium, ["direct-ip"], "flag", "flag"),
    (_high, ["undeclared-destination"], "flag", "block"),
    (_critical, ["undeclared-destination", "direct-ip", "metadata-endpoint"], "flag", "block"),
])
def test_verdict_table_through_the_judge(build, expected_ids, audit, enforce):
    for mode, expected in ((Mode.AUDIT, audit), (Mode.ENFORCE, enforce)):
        j = judge_for(ALLOW_BOTH, mode)
        flow = j.judge_flow(build(j))
        assert flow.verdict == Verdict(expected), (mode, flow.findings)
        assert flow.mode is mode
        assert set(ids(flow)) >= set(expected_ids)


def test_waived_high_finding_allows():
    j = judge_for('waive = ["sni-mismatch"]\n' + ALLOW_EXAMPLE, Mode.ENFORCE)
    resolve(j, "example.org", "203.0.113.10")
    flow = j.judge_flow(make_tls_flow("fronted.example"))
    assert ids(flow) == ["sni-mismatch"]
    assert flow.findings[0].waived
    assert flow.verdict is Verdict.ALLOW


def test_waiver_does_not_hide_other_findings():
    j = judge_for('waive = ["direct-ip"]\n' + ALLOW_BOTH, Mode.ENFORCE)
    flow = j.judge_flow(make_ssh_flow(dst="192.0.2.5", dport=443))
    assert "ssh-egress" in ids(flow)
    assert flow.verdict is Verdict.BLOCK


def test_untagged_flow_is_flagged_and_blocked_in_enforce():
    j = Judge([], mode=Mode.ENFORCE)
    flow = j.judge_flow(make_flow(task=None))
    assert ids(flow) == ["untagged"]
    assert flow.verdict is Verdict.BLOCK


# ------------------------------------------------------------------- rule forms

@pytest.mark.parametrize("rule, name, allowed", [
    ('host = "example.org"', "example.org", True),
    ('host = "example.org"', "www.example.org", False),
    ('host = "Example.ORG."', "example.org", True),          # case and trailing dot
    ('host = "*.example.org"', "a.example.org", True),
    ('host = "*.example.org"', "a.b.example.org", True),     # one or more labels
    ('host = "*.example.org"', "example.org", False),        # never the suffix itself
    ('host = "*.example.org"', "badexample.org", False),
    ('host = "bücher.example"', "xn--bcher-kva.example", True),  # IDNA
    ('host = "*.bücher.example"', "a.xn--bcher-kva.example", True),
])
def test_host_rules(rule, name, allowed):
    j = judge_for(f"[[allow]]\n{rule}\n")
    resolve(j, name, "203.0.113.10")
    flow = j.judge_flow(make_tls_flow(name))
    assert (flow.verdict is Verdict.ALLOW) is allowed, flow.findings
    assert flow.server_name == name and flow.name_source == "dns"


@pytest.mark.parametrize("rule, dst, allowed", [
    ('cidr = "203.0.113.0/24"', "203.0.113.10", True),
    ('cidr = "203.0.113.0/25"', "203.0.113.200", False),
    ('cidr = "2001:db8::/32"', "2001:db8::10", True),
    ('cidr = "2001:db8::/32"', "2001:db9::10", False),
])
def test_cidr_rules(rule, dst, allowed):
    j = judge_for(f'waive = ["direct-ip"]\n[[allow]]\n{rule}\n')
    flow = j.judge_flow(make_tls_flow(None, dst=dst, ip_version=6 if ":" in dst else 4))
    assert (flow.verdict is Verdict.ALLOW) is allowed, flow.findings
    if allowed:
        assert ids(flow) == ["direct-ip"] and flow.findings[0].waived


@pytest.mark.parametrize("ports, dport, allowed", [
    (None, 443, True),                      # default [443]
    (None, 8443, False),
    ('[443, "8000-8080"]', 8000, True),
    ('[443, "8000-8080"]', 8080, True),
    ('[443, "8000-8080"]', 8081, False),
])
def test_ports_and_ranges(ports, dport, allowed):
    rule = 'cidr = "203.0.113.0/24"\nprotocol = "any"' + (f"\nports = {ports}" if ports else "")
    j = judge_for(f'waive = ["direct-ip"]\n[[allow]]\n{rule}\n')
    flow = j.judge_flow(make_tls_flow(None, dport=dport))
    assert (flow.verdict is Verdict.ALLOW) is allowed, flow.findings


@pytest.mark.parametrize("rule, proto, dport, app, allowed", [
    ('protocol = "dns"', "udp", 53, "dns", True),           # dns: default port 53 ...
    ('protocol = "dns"', "tcp", 53, "dns", True),           # ... and covers tcp too
    ('protocol = "dns"\ntransport = "udp"', "tcp", 53, "dns", True),
    ('protocol = "quic"', "udp", 443, "quic", True),        # quic: udp by default
    ('protocol = "quic"', "tcp", 443, "tls", False),
    ('transport = "udp"\nports = [4500]', "udp", 4500, "unknown", True),  # else any
    ('transport = "icmp"', "icmp", None, "icmp", True),     # ports ignored for icmp
    ('protocol = "icmp"\nports = [1]', "icmp", None, "icmp", True),
    ('', "udp", 443, "quic", False),                         # tcp by default
])
def test_transport_and_protocol_defaults(rule, proto, dport, app, allowed):
    j = judge_for(f'waive = ["direct-ip"]\n[[allow]]\ncidr = "203.0.113.0/24"\n{rule}\n')
    flow = j.judge_flow(make_flow(proto=proto, dport=dport, sport=None if dport is None else 5555,
                                  app=app))
    assert (flow.verdict is Verdict.ALLOW) is allowed, flow.findings


@pytest.mark.parametrize("dport, app, allowed", [
    (443, "tls", True), (443, "http", False), (443, "unknown", False),
    (80, "http", True), (80, "tls", False),
    (22, "ssh", True), (22, "tls", False),
    (8080, "ssh", False),    # 'any' by port, but SSH is never implied: ssh-egress
    (8080, "stratum", False),  # any, but mining-stratum is critical
    (8080, "http", True),
])
def test_protocol_by_port(dport, app, allowed):
    j = judge_for('waive = ["direct-ip"]\n[[allow]]\ncidr = "203.0.113.0/24"\n'
                  'ports = [22, 80, 443, 8080]\n')
    flow = j.judge_flow(make_flow(dport=dport, app=app))
    assert (flow.verdict is Verdict.ALLOW) is allowed, flow.findings
    if not allowed and dport != 8080:
        assert "protocol-mismatch" in ids(flow)


def test_protocol_any_keeps_high_and_critical_findings():
    j = judge_for('[[allow]]\nhost = "relay.example"\nports = [22]\nprotocol = "any"\n',
                  Mode.ENFORCE)
    resolve(j, "relay.example", "198.51.100.7")
    flow = j.judge_flow(make_ssh_flow(dst="198.51.100.7"))
    assert ids(flow) == ["ssh-egress"]
    assert flow.verdict is Verdict.BLOCK
    assert flow.rule.startswith("allow[0] relay.example")


def test_ssh_declared_for_ssh_is_allowed():
    j = judge_for('[[allow]]\nhost = "git.example"\nports = [22]\n', Mode.ENFORCE)
    resolve(j, "git.example", "198.51.100.8")
    flow = j.judge_flow(make_ssh_flow(dst="198.51.100.8"))
    assert flow.findings == [] and flow.verdict is Verdict.ALLOW


def test_ssh_on_allowed_tls_port_is_a_mismatch_and_ssh_egress():
    j = judge_for(ALLOW_EXAMPLE + '[[allow]]\nhost = "git.example"\nports = [22]\n', Mode.ENFORCE)
    resolve(j, "example.org", "203.0.113.10")
    flow = j.judge_flow(make_ssh_flow(dport=443))
    assert ids(flow) == ["protocol-mismatch", "ssh-egress"]
    assert flow.findings[0].evidence.expected == ["tls"]
    assert flow.findings[1].evidence.declared_for_ssh == ["git.example"]
    assert flow.verdict is Verdict.BLOCK and flow.decided_at is Step.GATE


# ------------------------------------------------------------ names over addresses

def test_sni_mismatch_against_resolved_name():
    j = judge_for(ALLOW_EXAMPLE)
    resolve(j, "example.org", "203.0.113.10")
    flow = j.judge_flow(make_tls_flow("evil.example"))
    assert ids(flow) == ["sni-mismatch"]
    assert flow.findings[0].evidence.resolved_names == ["example.org"]
    assert flow.server_name == "example.org"


def test_http_host_mismatch_and_port_stripped():
    j = judge_for('[[allow]]\nhost = "example.org"\nports = [80]\n')
    resolve(j, "example.org", "203.0.113.10")
    assert j.judge_flow(make_http_flow("example.org:80")).findings == []
    flow = j.judge_flow(make_http_flow("other.example"))
    assert ids(flow) == ["sni-mismatch"] and flow.findings[0].evidence.source == "http-host"


def test_quic_sni_is_a_sent_name():
    j = judge_for('[[allow]]\nhost = "example.org"\nprotocol = "quic"\n')
    resolve(j, "example.org", "203.0.113.10")
    flow = j.judge_flow(make_flow(proto="udp", app="quic", quic=QuicInfo(sni="x.example")))
    assert ids(flow) == ["sni-mismatch"]


def test_cname_chain_binds_every_name():
    j = judge_for('[[allow]]\nhost = "cdn.example.net"\n')
    j.learn_names(make_dns_flow("files.example.org", ["cdn.example.net", "203.0.113.10"]))
    flow = j.judge_flow(make_tls_flow("files.example.org"))
    assert flow.verdict is Verdict.ALLOW, flow.findings


def test_bindings_are_per_task():
    j = judge_for(ALLOW_EXAMPLE)
    j.learn_names(make_dns_flow("example.org", ["203.0.113.10"], task="other-task"))
    flow = j.judge_flow(make_tls_flow("example.org"))
    assert "direct-ip" in ids(flow)


def test_binding_expires_after_ttl_and_min_ttl():
    j = judge_for(ALLOW_EXAMPLE)
    j.bindings.min_ttl_s = 60
    dns = resolve(j, "example.org", "203.0.113.10", ttl=30)
    later = j.judge_flow(make_tls_flow("example.org", start=dns.start + 61_000_000))
    assert "direct-ip" in ids(later)
    within = j.judge_flow(make_tls_flow("example.org", start=dns.start + 59_000_000))
    assert within.findings == []


def test_latest_resolved_name_wins():
    j = judge_for('[[allow]]\nhost = "b.example"\n')
    t = make_flow().start
    j.learn_names(make_dns_flow("a.example", ["203.0.113.10"], start=t - 2_000_000))
    j.learn_names(make_dns_flow("b.example", ["203.0.113.10"], start=t - 1_000_000))
    flow = j.judge_flow(make_flow(start=t, app=None, observed="first-packets"))
    assert flow.server_name == "b.example" and flow.verdict is Verdict.ALLOW


def test_dns_to_declared_resolver_is_not_direct_ip():
    j = judge_for('profiles = ["dns"]\n')
    flow = j.judge_flow(make_dns_flow("example.org", ["203.0.113.10"], dst="10.0.0.53"))
    assert flow.findings == [] and flow.verdict is Verdict.ALLOW


# --------------------------------------------------------------------------- steps

def test_steps_see_only_what_they_would_see_live():
    j = judge_for(ALLOW_EXAMPLE, Mode.ENFORCE)
    resolve(j, "example.org", "203.0.113.10")
    flow = make_ssh_flow(dport=443)
    j.decide(flow, Step.START)
    assert flow.verdict is Verdict.ALLOW and flow.decided_at is Step.START
    assert flow.rule.startswith("allow[0]")
    j.decide(flow, Step.GATE)
    assert flow.verdict is Verdict.BLOCK and flow.decided_at is Step.GATE
    assert flow.rule is None


def test_enforce_block_is_final():
    j = judge_for(ALLOW_EXAMPLE, Mode.ENFORCE)
    flow = j.judge_flow(make_tls_flow("example.org", dst="203.0.113.77"))
    # unresolved address: the kernel admits only resolved ones, so it never reaches the gate
    assert flow.verdict is Verdict.BLOCK and flow.decided_at is Step.START
    assert "undeclared-destination" in ids(flow)


def test_a_sent_name_never_declares_a_destination():
    # Names over addresses: SNI without a DNS answer is evidence, not a declaration,
    # so audit and enforce agree (live, the kernel admits resolved addresses only).
    for mode, verdict in ((Mode.AUDIT, Verdict.FLAG), (Mode.ENFORCE, Verdict.BLOCK)):
        j = judge_for(ALLOW_EXAMPLE, mode)
        flow = make_tls_flow("example.org", dst="203.0.113.77")
        j.decide(flow, Step.START)
        j.decide(flow, Step.GATE)
        assert ids(flow) == ["undeclared-destination", "direct-ip"]
        assert flow.verdict is verdict and flow.decided_at is Step.START
    assert flow.server_name is None or mode is Mode.ENFORCE
    audit = judge_for(ALLOW_EXAMPLE).judge_flow(make_tls_flow("example.org", dst="203.0.113.77"))
    assert audit.server_name == "example.org" and audit.name_source == "sni"


def test_an_address_in_host_or_sni_is_not_a_name():
    j = judge_for('[[allow]]\ncidr = "169.254.0.0/16"\nports = [80]\n')
    flow = j.judge_flow(make_http_flow("169.254.169.254", dst="169.254.169.254"))
    assert flow.server_name is None and flow.name_source is None


class Raising:
    name = "raising"
    steps = frozenset({Step.GATE})
    window = Window()

    def inspect(self, flow, ctx):
        raise RuntimeError("boom")


class Watching:
    """Raises a critical finding only once the flow is watched."""
    name = "watching"
    steps = frozenset({Step.WATCH})
    window = Window(watch=True)

    def inspect(self, flow, ctx):
        return [Finding.make("reverse-ssh-tunnel", source="traffic", server_first_exchanges=3)]


@pytest.mark.parametrize("mode, verdict", [(Mode.AUDIT, "flag"), (Mode.ENFORCE, "block")])
def test_failing_detector_is_internal_error_never_a_crash(mode, verdict):
    j = judge_for(ALLOW_EXAMPLE, mode, detectors=[Raising()])
    resolve(j, "example.org", "203.0.113.10")
    flow = j.judge_flow(make_tls_flow("example.org"))
    assert ids(flow) == ["internal-error"]
    ev = flow.findings[0].evidence
    assert ev.component == "raising" and ev.stage == "gate" and "boom" in ev.error
    assert flow.verdict == Verdict(verdict)


def test_internal_error_cannot_be_waived():
    with pytest.raises(manifest.ManifestError, match="internal-error"):
        manifest.parse(PURPOSE_HEAD + 'waive = ["internal-error"]')


def test_late_step_changes_verdict_and_findings_stick():
    j = judge_for('[[allow]]\nhost = "git.example"\nports = [22]\n', Mode.ENFORCE,
                  detectors=[Watching()])
    resolve(j, "git.example", "198.51.100.8")
    flow = make_ssh_flow(dst="198.51.100.8", observed="first-packets+watch")
    j.decide(flow, Step.START)
    j.decide(flow, Step.GATE)
    assert flow.verdict is Verdict.ALLOW
    j.decide(flow, Step.WATCH)
    assert flow.verdict is Verdict.BLOCK and flow.decided_at is Step.WATCH
    assert ids(flow) == ["reverse-ssh-tunnel"]


def test_unknown_task_is_an_internal_error():
    j = judge_for(ALLOW_EXAMPLE)
    flow = j.judge_flow(make_tls_flow("example.org", task="nobody"))
    assert ids(flow) == ["internal-error"] and "nobody" in flow.findings[0].evidence.error


# ------------------------------------------------------------------------- limits

def test_connection_limit_raises_one_task_event_and_flags_later_flows():
    j = judge_for(ALLOW_EXAMPLE + "[limits]\nconnections = 2\n", Mode.ENFORCE)
    resolve(j, "example.org", "203.0.113.10")
    flows = [j.judge_flow(make_tls_flow("example.org")) for _ in range(4)]
    assert [f.verdict for f in flows] == [Verdict.ALLOW] * 2 + [Verdict.BLOCK] * 2
    assert flows[2].findings[0].evidence.total == 3
    events = j.events()
    assert [e.event for e in events] == ["budget-exceeded"]
    assert events[0].findings[0].evidence.limit == "connections"


def test_bytes_limit_counts_at_end():
    j = judge_for(ALLOW_EXAMPLE + "[limits]\nbytes_out = 3000\n")
    resolve(j, "example.org", "203.0.113.10")
    first = j.judge_flow(make_tls_flow("example.org", bytes_out=2000))
    second = j.judge_flow(make_tls_flow("example.org", bytes_out=2000))
    third = j.judge_flow(make_tls_flow("example.org", bytes_out=10))
    assert first.findings == []
    assert ids(second) == ["budget-exceeded"] and second.decided_at is Step.END
    assert ids(third) == ["budget-exceeded"] and third.decided_at is Step.START
    assert len(j.events()) == 1


# ------------------------------------------------------------------ encrypted DNS

@pytest.mark.parametrize("rule, sni, dst, dport, expected", [
    ('', "dns.google", "8.8.8.8", 853, "dot"),                          # undeclared DoT
    ('[[allow]]\nhost = "dns.google"\nports = [853]\n', "dns.google", "8.8.8.8", 853, None),
    ('[[allow]]\nhost = "dns.google"\n', "dns.google", "8.8.8.8", 443, None),  # named: declared
    ('[[allow]]\nhost = "*.google"\n', "dns.google", "8.8.8.8", 443, "doh"),   # a wildcard is not
    ('[[allow]]\ncidr = "8.8.8.0/24"\n', "dns.google", "8.8.8.8", 443, None),
    ('[[allow]]\nhost = "*.example.org"\n', "www.example.org", "203.0.113.10", 443, None),
])
def test_encrypted_dns(rule, sni, dst, dport, expected):
    j = judge_for('waive = ["direct-ip"]\n' + rule)
    resolve(j, sni, dst)
    flow = j.judge_flow(make_tls_flow(sni, dst=dst, dport=dport))
    found = [f for f in flow.findings if f.id == "encrypted-dns"]
    assert [f.evidence.kind for f in found] == ([expected] if expected else [])


# ------------------------------------------------------------------------ tunnels

PROXY = ('[[allow]]\ncidr = "192.0.2.8/32"\nports = [3128, 1080]\nprotocol = "any"\n'
         'waive = ["direct-ip"]\n')


def tunnelled(kind, host, port, app="tls", sni=None, **fields):
    from egress.records import Tunnel, HttpInfo
    extra = {"http": HttpInfo(method="CONNECT", host=f"{host}:{port}")} \
        if kind == "http-connect" else {}
    return make_flow(dst="192.0.2.8", dport=3128 if kind == "http-connect" else 1080, app=app,
                     tls=TlsInfo(sni=sni) if app == "tls" else None,
                     tunnel=Tunnel(kind=kind, host=host, port=port), **extra, **fields)


@pytest.mark.parametrize("kind", ["http-connect", "socks5"])
def test_what_a_tunnel_reaches_is_judged(kind):
    j = judge_for('waive = ["direct-ip"]\n[[allow]]\ncidr = "192.0.2.8/32"\nports = [3128, 1080]\n'
                  'protocol = "any"\n' + ALLOW_EXAMPLE)
    ok = j.judge_flow(tunnelled(kind, "example.org", 443, sni="example.org"))
    assert [f.id for f in ok.findings if not f.waived] == [] and ok.verdict is Verdict.ALLOW
    bad = j.judge_flow(tunnelled(kind, "evil.example", 443, sni="evil.example"))
    undeclared = [f for f in bad.findings if f.id == "undeclared-destination"]
    assert undeclared and undeclared[0].evidence.name == "evil.example"
    assert undeclared[0].evidence.via.startswith(kind)
    assert "sni-mismatch" not in ids(bad)


def test_ssh_through_a_proxy_is_ssh_egress_and_undeclared():
    j = judge_for('waive = ["direct-ip"]\n[[allow]]\ncidr = "192.0.2.8/32"\nports = [3128]\n'
                  'protocol = "any"\n')
    flow = j.judge_flow(tunnelled("http-connect", "198.51.100.7", 22, app="ssh"))
    assert {"undeclared-destination", "ssh-egress"} <= set(ids(flow))


def test_sni_inside_a_tunnel_must_match_the_requested_name():
    j = judge_for('waive = ["direct-ip"]\n[[allow]]\ncidr = "192.0.2.8/32"\nports = [3128]\n'
                  'protocol = "any"\n' + ALLOW_EXAMPLE)
    flow = j.judge_flow(tunnelled("http-connect", "example.org", 443, sni="other.example"))
    assert "sni-mismatch" in ids(flow)


# --------------------------------------------------------- where bindings come from

def test_an_answer_from_an_undeclared_resolver_binds_nothing():
    j = judge_for(ALLOW_EXAMPLE)
    stray = make_dns_flow("example.org", ["203.0.113.10"], dst="203.0.113.53")
    assert j.learn_names(stray) == []
    flow = j.judge_flow(make_tls_flow("example.org"))
    assert "undeclared-destination" in ids(flow) and "direct-ip" in ids(flow)


def test_an_answer_on_another_port_binds_nothing():
    j = judge_for(ALLOW_EXAMPLE)
    assert j.learn_names(make_dns_flow("example.org", ["203.0.113.10"], dport=9999)) == []
    assert len(j.learn_names(make_dns_flow("example.org", ["203.0.113.10"]))) == 1


@pytest.mark.parametrize("dst, judged", [
    ("ff02::16", False), ("fe80::1", False), ("224.0.0.251", False),
    ("169.254.169.254", True),        # link-local, but the metadata service: judged
    ("ff05::1:3", True),              # site-scoped multicast can be routed
])
def test_link_scoped_traffic_is_not_egress(dst, judged):
    j = judge_for("", Mode.ENFORCE)
    flow = j.judge_flow(make_flow(proto="icmp6" if ":" in dst else "udp", dst=dst,
                                  ip_version=6 if ":" in dst else 4, app=None))
    assert (flow.verdict is Verdict.BLOCK) is judged
