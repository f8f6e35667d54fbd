"""Any valid flow record written reads back equal, on both backends."""

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egress.records import DnsInfo, DnsQuery, Finding, Nat, ProcessInfo, SshInfo, TlsInfo
from tests.factories import make_flow

# What a database can hold as text: no NUL, no lone surrogates.
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=40)
maybe_text = st.none() | text
port = st.none() | st.integers(0, 65535)
counter = st.integers(0, 2**63 - 1)
time = st.integers(0, 4 * 10**15)  # up to the year 2096, in microseconds
ids = itertools.count()

flows = st.builds(
    lambda start, duration, **kw: make_flow(flow_id=f"f-h{next(ids):07d}", start=start,
                                            end=None if duration is None else start + duration,
                                            **kw),
    start=time, duration=st.none() | st.integers(0, 10**12),
    task=st.none() | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,20}", fullmatch=True),
    event=st.sampled_from(["interim", "final"]), mode=st.sampled_from([None, "audit", "enforce"]),
    sport=port, dport=port, server_name=maybe_text, rule=maybe_text, community_id=maybe_text,
    bytes_out=counter, bytes_in=counter, packets_out=counter, packets_in=counter,
    verdict=st.sampled_from([None, "allow", "flag", "block"]),
    decided_at=st.sampled_from([None, "start", "gate", "watch", "end"]),
    action=st.sampled_from([None, "passed", "rejected", "dropped", "killed"]),
    nat=st.none() | st.builds(Nat, src=text, sport=port),
    tls=st.none() | st.builds(TlsInfo, sni=maybe_text, alpn=st.none() | st.lists(text),
                              ech=st.none() | st.booleans()),
    ssh=st.none() | st.builds(SshInfo, client=maybe_text, server=maybe_text),
    dns=st.none() | st.builds(DnsInfo, queries=st.lists(st.builds(
        DnsQuery, name=text, type=text, answers=st.lists(text), ttl=st.none() | counter))),
    process=st.none() | st.builds(ProcessInfo, pid=st.none() | st.integers(0, 2**31),
                                  cmdline=maybe_text),
    findings=st.lists(st.one_of(
        st.builds(lambda a, w: Finding.make("direct-ip", address=a, waived=w), text, st.booleans()),
        st.builds(lambda k, e: Finding.make("reverse-ssh-tunnel", source="traffic",
                                            keepalive_interval_s=k, role_reversal=e),
                  st.none() | st.floats(allow_nan=False), st.none() | st.booleans())),
        max_size=3),
)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(flows, min_size=1, max_size=4))
def test_written_flows_read_back_equal(store, batch):
    store.write(batch)
    for flow in batch:
        assert store.flow(flow.flow_id) == flow
