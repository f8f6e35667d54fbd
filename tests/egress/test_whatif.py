"""What if, without a store: stored records judged again under another purpose."""

from egress.records import Finding, Mode, NameBinding, Verdict
from egress.whatif import StoredTask, what_if
from tagging import manifest
from tests.factories import PURPOSE_HEAD, RESOLVER_RULE, make_dns_flow, make_flow

PYPI = '\n[[allow]]\nhost = "pypi.org"\n'


def _purpose(rules: str = ""):
    return manifest.parse(PURPOSE_HEAD + rules + RESOLVER_RULE, "t.toml")


def _stored(flows, bindings=(), purpose=None) -> list[StoredTask]:
    return [StoredTask("t1", purpose or _purpose(), Mode.AUDIT, flows, list(bindings), [])]


def test_a_dns_flow_binds_the_name_and_the_new_purpose_allows_it():
    lookup = make_dns_flow("pypi.org", ["203.0.113.10"], verdict=Verdict.ALLOW)
    https = make_flow(verdict=Verdict.FLAG, findings=[Finding.make(
        "undeclared-destination", name="pypi.org", address="203.0.113.10", port=443,
        transport="tcp", via=None)])
    result = what_if(_stored([lookup, https]), _purpose(PYPI))
    (change,) = result.changes
    assert change.after.flow_id == https.flow_id
    assert (change.before.verdict, change.after.verdict) == (Verdict.FLAG, Verdict.ALLOW)
    assert change.after.server_name == "pypi.org" and "pypi.org" in change.after.rule
    assert not change.carried and not result.violations
    assert https.verdict is Verdict.FLAG and https.findings      # the stored record untouched


def test_answers_of_the_task_own_resolver_bind_names_without_a_flow():
    """Live, the task's answers come from egress's resolver: stored bindings, no DNS flow."""
    https = make_flow(verdict=Verdict.ALLOW)
    answer = NameBinding(task="t1", name="pypi.org", address="203.0.113.10", ttl=300,
                         time=https.start - 1000, resolver="10.99.0.1", resolver_port=53)
    with_answer = what_if(_stored([https], [answer]), _purpose(PYPI))
    assert with_answer.after["allow"] == 1 and not with_answer.changes
    without = what_if(_stored([make_flow(verdict=Verdict.ALLOW)]), _purpose(PYPI))
    (change,) = without.changes
    assert {f.id for f in change.after.findings} >= {"undeclared-destination", "direct-ip"}


def _judged(flow, purpose):
    """The flow as replay stores it under ``purpose`` (a copy; judged, observation gone)."""
    import copy
    from egress.replay import replay
    out = []
    replay([copy.deepcopy(flow)], purpose, task="t1", on_record=out.append)
    (stored,) = [r for r in out if r.__class__ is flow.__class__]
    return stored


SSH_RELAY = '\n[[allow]]\ncidr = "203.0.113.10/32"\nports = [443]\nprotocol = "ssh"\n'


def test_a_finding_the_store_cannot_give_back_stands():
    """Seen only in packets (the watch feed): judging the stored record again cannot raise it."""
    old = _purpose()
    tunnel = _judged(make_flow(app="ssh", dport=443), old)
    assert tunnel.verdict is Verdict.FLAG     # undeclared, ssh-egress, direct-ip
    tunnel.findings.append(Finding.make("reverse-ssh-tunnel", source="traffic",
                                        server_first_exchanges=9, keepalive_interval_s=5.0))
    same = what_if(_stored([tunnel], purpose=old), old)
    assert not same.changes and same.carried == 1
    relay = what_if(_stored([tunnel], purpose=old), _purpose(SSH_RELAY))
    (change,) = relay.changes
    assert change.after.verdict is Verdict.FLAG and relay.violations
    assert [f.id for f in change.carried] == ["reverse-ssh-tunnel"]
    assert {f.id for f in change.after.findings} == {"reverse-ssh-tunnel", "direct-ip"}


def test_findings_the_store_gives_back_are_judged_anew_not_kept():
    old = _purpose()
    flow = _judged(make_flow(app="ssh", dport=443), old)
    ids = {f.id for f in flow.findings}
    assert {"undeclared-destination", "ssh-egress"} <= ids
    result = what_if(_stored([flow], purpose=old),
                     _purpose('waive = ["direct-ip"]\n' + SSH_RELAY))
    assert result.carried == 0 and result.after["allow"] == 1
    (change,) = result.changes
    assert [(f.id, f.waived) for f in change.after.findings] == [("direct-ip", True)]


def test_enforce_blocks_what_audit_flagged():
    old = _purpose()
    flow = _judged(make_flow(app="tls"), old)
    result = what_if(_stored([flow], purpose=old), _purpose(), mode="enforce")
    (change,) = result.changes
    assert (change.before.verdict, change.after.verdict) == (Verdict.FLAG, Verdict.BLOCK)
    assert result.transitions == {("flag", "block"): 1}
