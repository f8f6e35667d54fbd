"""Batched writes: thousands of records in one call."""

import sqlalchemy as sa

from db import FlowFilter
from db.models import Finding as FindingRow
from db.models import Flow
from tests.factories import T0, make_finding, make_flow


def test_five_thousand_flows_in_one_write(store):
    flows = [make_flow(flow_id=f"f-bulk{i:05d}", start=T0 + i, verdict="flag" if i % 3 else "allow",
                       findings=[make_finding()] * (i % 3))
             for i in range(5000)]
    store.write(flows)
    with store.session() as s:
        assert s.execute(sa.select(sa.func.count()).select_from(Flow)).scalar_one() == 5000
        assert s.execute(sa.select(sa.func.count()).select_from(FindingRow)).scalar_one() == \
            sum(i % 3 for i in range(5000))
    back = store.flows()
    assert back == flows
    assert len(store.flows(FlowFilter(verdict="allow"))) == len(range(0, 5000, 3))

    # Their finals, again in one call: every flow keeps one latest record.
    finals = [make_flow(flow_id=f.flow_id, start=f.start, bytes_out=f.bytes_out + 1) for f in flows]
    store.write(finals)
    assert store.flows() == finals
    with store.session() as s:
        assert s.execute(sa.select(sa.func.count()).select_from(Flow)).scalar_one() == 10000
        assert s.execute(sa.select(sa.func.count()).select_from(Flow)
                         .where(Flow.latest.is_(True))).scalar_one() == 5000
