"""Several writer processes into one store at once: nothing lost, one valid chain per host."""

import multiprocessing

import sqlalchemy as sa

from db import Store
from db.ledger import Ledger
from db.ledgerkeys import KeyRing
from db.verify import verify
from egress.records import Finding
from tests.db.purposes import make_purpose
from tests.factories import T0, make_event, make_flow

WRITERS = {"w0": "host-a", "w1": "host-a", "w2": "host-a", "w3": "host-b"}
BATCHES, FLOWS = 15, 8


def writer(url: str, name: str, host: str, start) -> None:
    start.wait()
    with Store.open(url, ledger=Ledger(host=host)) as store:
        store.add_task(name, make_purpose(), T0)
        for b in range(BATCHES):
            batch = [make_flow(flow_id=f"f-{name}-{b}-{i}", task=name,
                               findings=[Finding.make("direct-ip", address="203.0.113.10")])
                     for i in range(FLOWS)]
            store.write(batch + [make_event("dns-refused", task=name)])
        store.end_task(name, T0 + 1)


def test_concurrent_writers_keep_every_row_and_one_chain_per_host(store_url):
    Store.open(store_url).close()         # migrated once, before the race
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(len(WRITERS))
    procs = [ctx.Process(target=writer, args=(store_url, name, host, start))
             for name, host in WRITERS.items()]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * len(WRITERS)

    with Store.open(store_url) as store:
        with store.session() as s:
            report = verify(s, KeyRing.load())
        assert report.ok, report.first()
        with store.engine.connect() as conn:
            def count(q):
                return conn.execute(sa.text(q)).scalar_one()
            n = len(WRITERS)
            assert count("SELECT count(*) FROM flows") == n * BATCHES * FLOWS
            assert count("SELECT count(*) FROM findings") == n * BATCHES * FLOWS
            assert count("SELECT count(*) FROM task_events") == n * BATCHES
            for host in set(WRITERS.values()):
                writers = list(WRITERS.values()).count(host)
                # Per writer: its task, each batch (flows, findings, event), its task's end.
                assert count(f"SELECT count(*) FROM ledger WHERE host = '{host}'") == \
                    count(f"SELECT max(seq) FROM ledger WHERE host = '{host}'") == \
                    writers * (1 + BATCHES + 1)
        # The writers of host-a interleaved: their entries alternate somewhere in the chain.
        with store.engine.connect() as conn:
            tasks = conn.execute(sa.text("SELECT task FROM ledger WHERE host = 'host-a' "
                                         "ORDER BY seq")).scalars().all()
        assert sum(a != b for a, b in zip(tasks, tasks[1:])) >= 2
