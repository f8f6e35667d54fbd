"""Our on-disk format is strict: unknown stored fields fail loudly, bad records are refused."""

import pytest
import sqlalchemy as sa

from db import NameBinding, StoreError
from db.models import Finding as FindingRow
from db.models import Flow
from egress.records import RecordError
from tests.factories import make_event, make_finding, make_flow, make_tls_flow


def test_unknown_evidence_key_makes_reading_fail(store):
    flow = make_flow(findings=[make_finding("direct-ip")])
    store.write([flow])
    with store.session() as s:
        s.execute(sa.update(FindingRow)
                  .values(evidence='{"address":"203.0.113.10","smuggled":1}'))
    with pytest.raises((StoreError, RecordError)) as caught:
        store.flows()
    assert "smuggled" in str(caught.value) and "evidence" in str(caught.value)
    with pytest.raises(StoreError, match="smuggled"):
        store.flow(flow.flow_id)


def test_unknown_evidence_key_on_a_task_event_fails(store):
    store.write([make_event("dns-refused",
                            findings=[make_finding("dns-refused", name="x.example")])])
    with store.session() as s:
        s.execute(sa.update(FindingRow).values(evidence='{"name":"x.example","extra":true}'))
    with pytest.raises(StoreError, match="extra"):
        store.task_events()


def test_unknown_sub_record_key_makes_reading_fail(store):
    flow = make_tls_flow("pypi.org")
    store.write([flow])
    with store.session() as s:
        s.execute(sa.update(Flow).values(tls='{"sni":"pypi.org","secret_field":"x"}'))
    with pytest.raises(StoreError, match="tls.*secret_field"):
        store.flows()


def test_unknown_finding_id_in_a_row_fails(store):
    store.write([make_flow(findings=[make_finding()])])
    with store.session() as s:
        s.execute(sa.update(FindingRow).values(finding_id="brand-new-finding"))
    with pytest.raises(StoreError, match="brand-new-finding"):
        store.flows()


def test_records_that_could_not_be_read_back_are_refused(store):
    bad = [make_flow(verdict="maybe"), make_flow(start=1.5), make_flow(server_name="a\x00b"),
           make_flow(findings=[make_finding()], bytes_out=True), make_flow(task="t" * 65),
           make_flow(bytes_in=2**63), make_flow(dport=2**31)]
    for record in bad:
        with pytest.raises(StoreError, match=record.flow_id):
            store.write([make_flow(), record])
    with pytest.raises(StoreError):
        store.write(["not a record"])
    with pytest.raises(StoreError, match="binding.ttl"):
        store.add_bindings([NameBinding("t1", "a.example", "192.0.2.1", 2**64, 0)])
    assert store.flows() == []  # nothing of a refused batch is written


def test_a_batch_the_database_refuses_writes_nothing(store):
    good = make_flow()
    store.write([good])
    newer = make_flow(flow_id=good.flow_id, start=good.start, bytes_out=1)
    # No capture run 999: the foreign key fails after the latest flags were updated.
    with pytest.raises(StoreError):
        store.write([make_flow(), newer], capture_run_id=999)
    assert store.flows() == [good]


def test_unknown_key_in_a_stored_purpose_fails(store):
    from db.models import Task as TaskRow
    from tests.db.purposes import make_purpose
    store.add_task("t1", make_purpose(), 0)
    with store.session() as s:
        expanded = s.execute(sa.select(TaskRow.expanded)).scalar_one()
        s.execute(sa.update(TaskRow).values(expanded=expanded[:-1] + ',"sneaky":1}'))
    with pytest.raises(StoreError, match="task t1"):
        store.task("t1")


def test_rows_older_than_the_weird_column_read_as_no_anomalies(store):
    store.write([make_flow(flow_id="f-oldrow01", weird=["midstream"])])
    assert store.flow("f-oldrow01").weird == ["midstream"]
    with store.session() as s:
        s.execute(sa.update(Flow).values(weird=None))   # as revision 0002 leaves old rows
    assert store.flow("f-oldrow01").weird == []
