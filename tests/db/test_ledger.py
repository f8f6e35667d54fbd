"""The ledger: an untouched store verifies; each way of tampering names the first wrong entry.

Tampering is raw SQL against the store, as someone with the database but not
the key would do it (and, for checkpoints, with the key).
"""

import os
import time

import pytest
import sqlalchemy as sa

from db import Store
from db.checkpoints import take
from db.ledger import Ledger, body_rows, default_host
from db.ledgerkeys import KeyRing
from db.prune import prune
from db.verify import verify
from egress.records import Finding, NameBinding
from tests.db.purposes import make_purpose
from tests.factories import T0, make_event, make_flow

HOST = default_host()


def fill(store: Store) -> None:
    """A capture run, two tasks (one ended), flows with findings, an interim and its final,
    a task event with a finding, DNS bindings: every table the ledger covers."""
    run = store.add_capture_run("replay", ["x.pcap"], T0, "test")
    store.add_task("t1", make_purpose(), T0, capture_run_id=run)
    store.add_task("t2", make_purpose("other"), T0)
    interim = make_flow(event="interim", bytes_out=10)
    store.write([make_flow(findings=[Finding.make("direct-ip", address="203.0.113.10")]),
                 interim,
                 make_event("dns-refused", findings=[Finding.make("dns-refused",
                                                                  name="x.example")])],
                capture_run_id=run)
    store.write([make_flow(flow_id=interim.flow_id, start=interim.start, bytes_out=99,
                           server_name="pypi.org"),
                 make_flow(task="t2", findings=[Finding.make("ssh-egress", declared_for_ssh=[],
                                                             client_banner="SSH-2.0-x")])])
    store.add_bindings([NameBinding(task="t1", name="pypi.org", address="203.0.113.10",
                                    ttl=300, time=T0)])
    store.end_task("t1", T0 + 5_000_000)
    store.finish_capture_run(run, T0 + 6_000_000, {"packets": 10})


def problems(store, task=None, checkpoints=(), keys=None):
    with store.session() as s:
        return verify(s, keys or KeyRing.load(), task=task, checkpoints=checkpoints)


def first(store, **kw) -> str | None:
    report = problems(store, **kw)
    return None if report.ok else report.first()


def sql(store, statement: str, **params) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text(statement), params)


def seq_of(store, table: str, row_id, op: str = "insert") -> int:
    """The entry that covers a row (its ``op``)."""
    with store.engine.connect() as conn:
        found = [seq for seq, o, body in conn.execute(sa.text("SELECT seq, op, body FROM ledger"))
                 if o == op and (table, str(row_id)) in {(t, r) for t, r, _ in body_rows(body)}]
    assert len(found) == 1, found
    return found[0]


def flow_row(store, flow_id: str, latest: bool = True) -> int:
    with store.engine.connect() as conn:
        return conn.execute(sa.text("SELECT id FROM flows WHERE flow_id = :f AND latest = :l"),
                            {"f": flow_id, "l": latest}).scalar_one()


@pytest.fixture
def filled(store):
    fill(store)
    return store


def test_untouched_store_verifies(filled):
    report = problems(filled)
    assert report.ok, report.first()
    counts = {}
    with filled.engine.connect() as conn:
        for table in ("capture_runs", "tasks", "flows", "task_events", "findings",
                      "dns_bindings"):
            counts[table] = conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
        entries = conn.execute(sa.text("SELECT count(*) FROM ledger")).scalar_one()
    assert report.rows == sum(counts.values()) == 1 + 2 + 4 + 1 + 3 + 1
    # The run, t1, t2, the first write (all t1's), the second (t1's and t2's), the bindings,
    # t1's end, the run's end.
    assert entries == report.entries == 1 + 1 + 1 + 1 + 2 + 1 + 1 + 1
    assert report.chains[HOST].first == 1 and report.chains[HOST].last == entries


def test_an_edited_byte_in_a_flow_names_its_entry(filled):
    with filled.engine.connect() as conn:
        row, = conn.execute(sa.text("SELECT id FROM flows WHERE server_name = 'pypi.org'")).one()
    sql(filled, "UPDATE flows SET server_name = 'pypi.orh' WHERE id = :i", i=row)
    message = first(filled)
    assert message.startswith(f"entry {HOST}#{seq_of(filled, 'flows', row)} (insert of flows "
                              f"row {row}): the row")
    assert "edited" in message


def test_an_edited_finding_evidence_names_its_entry(filled):
    with filled.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT id FROM findings WHERE finding_id = 'ssh-egress'"))\
            .scalar_one()
    sql(filled, "UPDATE findings SET evidence = replace(evidence, 'SSH-2.0-x', 'SSH-2.0-y') "
                "WHERE id = :i", i=row)
    assert first(filled).startswith(f"entry {HOST}#{seq_of(filled, 'findings', row)} ")


def test_a_deleted_flow_names_its_entry(filled):
    with filled.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT flow_row FROM findings WHERE "
                                   "finding_id = 'direct-ip'")).scalar_one()
    sql(filled, "DELETE FROM findings WHERE flow_row = :i", i=row)
    sql(filled, "DELETE FROM flows WHERE id = :i", i=row)
    message = first(filled)
    assert message == (f"entry {HOST}#{seq_of(filled, 'flows', row)} (insert of flows row "
                       f"{row}): the row is gone (deleted)")


def test_a_deleted_entry_is_named(filled):
    seq = seq_of(filled, "flows", _any_flow(filled))
    sql(filled, "DELETE FROM ledger WHERE seq = :s", s=seq)
    assert first(filled).startswith(f"entry {HOST}#{seq} is missing: the chain goes from "
                                    f"#{seq - 1} to #{seq + 1}")


def _any_flow(store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(sa.text("SELECT min(id) FROM flows")).scalar_one()


def test_reordered_entries_name_the_first_of_them(filled):
    a = seq_of(filled, "flows", _any_flow(filled))
    sql(filled, "UPDATE ledger SET seq = -1 WHERE seq = :a", a=a)
    sql(filled, "UPDATE ledger SET seq = :a WHERE seq = :b", a=a, b=a + 1)
    sql(filled, "UPDATE ledger SET seq = :b WHERE seq = -1", b=a + 1)
    assert first(filled).startswith(f"entry {HOST}#{a} ")


def test_reordered_rows_name_the_first_of_them(filled):
    with filled.engine.connect() as conn:
        a, b = conn.execute(sa.text("SELECT id, flow_id FROM flows WHERE latest ORDER BY id"))\
            .all()[:2]
    sql(filled, "UPDATE flows SET flow_id = 'swap' WHERE id = :i", i=a.id)
    sql(filled, "UPDATE flows SET flow_id = :f WHERE id = :i", f=a.flow_id, i=b.id)
    sql(filled, "UPDATE flows SET flow_id = :f WHERE id = :i", f=b.flow_id, i=a.id)
    assert first(filled).startswith(f"entry {HOST}#{seq_of(filled, 'flows', a.id)} ")


def test_an_edited_entry_is_named(filled):
    seq = seq_of(filled, "flows", _any_flow(filled))
    sql(filled, "UPDATE ledger SET digest = :d WHERE seq = :s", d="0" * 64, s=seq)
    assert first(filled) == (f"entry {HOST}#{seq} (insert, task t1): its hash does not match "
                             "its fields (the entry was edited)")


def test_an_edited_entry_body_is_named(filled):
    row = _any_flow(filled)
    seq = seq_of(filled, "flows", row)
    # Drop the flow's line from its entry, as if it had never been written.
    sql(filled, "UPDATE ledger SET body = replace(body, :line, '') WHERE seq = :s",
        line=f"flows {row} ", s=seq)
    assert first(filled) == (f"entry {HOST}#{seq} (insert, task t1): its body does not match "
                             "its digest (the entry was edited)")


def forger_keys(tmp_path) -> KeyRing:
    """A key ring with the real key's id and another secret: what a forger would make."""
    real = KeyRing.load()
    path = tmp_path / "forged.key"
    path.write_text(f"{real.current} {os.urandom(32).hex()}\n")
    path.chmod(0o600)
    return KeyRing.load(path)


def test_a_forged_entry_without_the_key_is_named(filled, tmp_path):
    forger = Store(filled.engine, ledger=Ledger(keys=forger_keys(tmp_path)))
    forged = make_flow(task="t1", server_name="innocent.example")
    forger.write([forged])
    row = flow_row(filled, forged.flow_id)
    message = first(filled)
    assert message == (f"entry {HOST}#{seq_of(filled, 'flows', row)} (insert, task t1): its "
                       "signature is wrong (forged, or rewritten without the key)")


def test_a_row_written_behind_the_ledgers_back_is_named(filled, monkeypatch):
    monkeypatch.setenv("EGRESS_LEDGER", "off")
    sneaky = Store(filled.engine)
    flow = make_flow()
    sneaky.write([flow])
    row = flow_row(filled, flow.flow_id)
    assert first(filled) == (f"flows row {row} ({flow.flow_id}) has no ledger entry (written "
                             "behind the ledger's back)")


def test_a_flipped_latest_is_named(filled):
    with filled.engine.connect() as conn:
        old = conn.execute(sa.text("SELECT id FROM flows WHERE NOT latest")).scalar_one()
    sql(filled, "UPDATE flows SET latest = :t WHERE id = :i", t=True, i=old)
    assert first(filled).startswith(f"flows row {old} (")
    problem = min(problems(filled).problems)
    assert problem.where[:3] == (0, HOST, seq_of(filled, "flows", old))
    assert "is marked latest, yet the flow has a newer row" in problem.text


def test_an_edited_task_end_names_the_update(filled):
    sql(filled, "UPDATE tasks SET ended = ended + 1 WHERE id = 't1'")
    assert first(filled).startswith(f"entry {HOST}#{seq_of(filled, 'tasks', 't1', 'update')} "
                                    "(update of tasks row t1)")
    sql(filled, "UPDATE tasks SET ended = 5 WHERE id = 't2'")    # never ended: no update entry
    assert f"entry {HOST}#{seq_of(filled, 'tasks', 't2')} (insert of tasks row t2)" in \
        str([p.text for p in problems(filled).problems])


def test_task_scope_checks_that_tasks_rows_only(filled):
    with filled.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT id FROM flows WHERE task = 't2'")).scalar_one()
    sql(filled, "UPDATE flows SET bytes_out = 1 WHERE id = :i", i=row)
    assert problems(filled, task="t1").ok
    assert first(filled, task="t2").startswith(f"entry {HOST}#{seq_of(filled, 'flows', row)} ")


def test_an_unknown_key_is_named(filled, tmp_path):
    other = tmp_path / "other.key"
    other.write_text(f"kother {os.urandom(32).hex()}\n")
    other.chmod(0o600)
    message = first(filled, keys=KeyRing.load(other))
    assert message.startswith(f"entry {HOST}#1 ") and "which is not in" in message


def test_a_truncated_tail_passes_alone_and_fails_against_a_checkpoint(filled):
    keys = KeyRing.load()
    with filled.session() as s:
        checkpoint = take(s, keys)
    assert len(checkpoint) == 1
    last = checkpoint[0].seq
    sql(filled, "DELETE FROM ledger WHERE seq = :s", s=last)    # the run's finish entry
    sql(filled, "UPDATE capture_runs SET ended = NULL, counters = NULL")
    assert problems(filled).ok          # the honest limit: a cut tail needs a checkpoint
    assert first(filled, checkpoints=[("cp:1", checkpoint[0])]) == (
        f"entries {HOST}#{last}-#{last} are gone: checkpoint cp:1 saw the chain up to #{last}")


def test_a_chain_rewritten_with_the_key_fails_against_an_older_checkpoint(filled):
    keys = KeyRing.load()
    extra = make_flow(server_name="evil.example")
    filled.write([extra])
    with filled.session() as s:
        checkpoint = take(s, keys)[0]
    row = flow_row(filled, extra.flow_id)
    # Root with the key: remove the flow and its entry, write an innocent one in its place.
    sql(filled, "DELETE FROM ledger WHERE seq = :s", s=checkpoint.seq)
    sql(filled, "DELETE FROM flows WHERE id = :i", i=row)
    filled.write([make_flow(server_name="pypi.org")])
    assert problems(filled).ok
    assert first(filled, checkpoints=[("cp:1", checkpoint)]) == (
        f"entry {HOST}#{checkpoint.seq} is not the one checkpoint cp:1 saw: the chain was "
        "rewritten")
    forged = type(checkpoint)(**{**checkpoint.__dict__, "seq": checkpoint.seq - 1})
    assert "its signature is wrong" in first(filled, checkpoints=[("cp:2", forged)])


def test_prune_is_not_tampering_but_a_later_deletion_is(filled):
    keys = KeyRing.load()
    time.sleep(0.002)
    cut_time = time.time_ns() // 1000
    time.sleep(0.002)
    kept = make_flow(findings=[Finding.make("direct-ip", address="203.0.113.10")])
    filled.write([kept, make_flow()])
    with filled.session() as s:
        before = take(s, keys)
    done = prune(filled, cut_time)
    assert done.removed["flows"] == 4 and done.removed["findings"] == 3
    assert done.removed["task_events"] == 1 and done.removed["dns_bindings"] == 1
    with filled.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM flows")).scalar_one() == 2
        assert conn.execute(sa.text("SELECT count(*) FROM tasks")).scalar_one() == 2
    report = problems(filled, checkpoints=[("cp:1", before[0])])
    assert report.ok, report.first()
    assert report.checkpoints == 1        # the checkpoint's head is the entry before the cut
    assert report.chains[HOST].first == done.cuts[HOST]
    row = flow_row(filled, kept.flow_id)
    sql(filled, "DELETE FROM findings WHERE flow_row = :i", i=row)
    sql(filled, "DELETE FROM flows WHERE id = :i", i=row)
    assert first(filled) == (f"entry {HOST}#{seq_of(filled, 'flows', row)} (insert of flows row "
                             f"{row}): the row is gone (deleted)")


def test_deleting_a_prefix_without_prune_is_named(filled):
    sql(filled, "DELETE FROM ledger WHERE seq <= 3")
    assert first(filled).startswith(f"entries {HOST}#1-#3 are missing, and no prune removed them")


def test_prune_twice_and_a_removed_prune_entry(filled):
    cut = time.time_ns() // 1000
    time.sleep(0.002)
    filled.write([make_flow()])
    prune(filled, cut)
    cut = time.time_ns() // 1000
    time.sleep(0.002)
    filled.write([make_flow()])
    prune(filled, cut)
    assert problems(filled).ok, problems(filled).first()
    with filled.engine.connect() as conn:
        seq = conn.execute(sa.text("SELECT max(seq) FROM ledger WHERE op = 'prune'"))\
            .scalar_one()
    sql(filled, "DELETE FROM ledger WHERE seq = :s", s=seq)
    assert "missing" in first(filled)


def test_key_file_is_made_0600_and_refused_when_open(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "ledger.key"
    monkeypatch.setenv("EGRESS_LEDGER_KEY", str(path))
    keys = KeyRing.load(create=True)
    assert path.stat().st_mode & 0o777 == 0o600 and keys.current.startswith("k")
    assert KeyRing.load().current == keys.current             # made once, then read
    path.chmod(0o644)
    with pytest.raises(Exception, match="open to other users"):
        KeyRing.load()
    path.chmod(0o600)
    path.write_text(path.read_text() + "bad line\n")
    with pytest.raises(Exception, match="line 4"):
        KeyRing.load()


def test_rotation_keeps_old_entries_verifiable(store, tmp_path, monkeypatch):
    from db.ledgerkeys import new_line
    monkeypatch.setenv("EGRESS_LEDGER_KEY", str(tmp_path / "ledger.key"))
    store.write([make_flow()])
    path = KeyRing.load().path
    old = KeyRing.load().current
    with open(path, "a") as f:
        f.write(new_line())
    rotated = Store(store.engine)          # a writer started after the rotation
    rotated.write([make_flow()])
    with store.engine.connect() as conn:
        keys = conn.execute(sa.text("SELECT DISTINCT key_id FROM ledger")).scalars().all()
    assert sorted(keys) == sorted([old, KeyRing.load().current]) and len(keys) == 2
    assert problems(store).ok


def test_a_live_writer_exports_checkpoints_at_its_interval(store, tmp_path, monkeypatch):
    from db.checkpoints import read
    from db.recorder import StoreRecorder
    cps = tmp_path / "cp.jsonl"
    monkeypatch.setenv("EGRESS_CHECKPOINTS", str(cps))
    monkeypatch.setenv("EGRESS_CHECKPOINT_INTERVAL", "3600")
    recorder = StoreRecorder(store, kind="replay", sources=["x"])
    recorder.records([make_flow()])
    assert not cps.exists()                        # not an interval yet
    recorder._checkpoints.every_s = 0.0001
    time.sleep(0.001)
    recorder.records([make_flow()])
    recorder.finish_counters({}, {})               # and one at the end
    lines = read(cps)
    assert [c.seq for _, c in lines] == [3, 4]     # run #1, flows #2 #3; the run's end #4
    report = problems(store, checkpoints=lines)
    assert report.ok and report.checkpoints == 2


def test_a_bad_checkpoint_interval_is_one_line(store, monkeypatch):
    from db import StoreError
    from db.recorder import StoreRecorder
    monkeypatch.setenv("EGRESS_CHECKPOINT_INTERVAL", "soon")
    with pytest.raises(StoreError, match="EGRESS_CHECKPOINT_INTERVAL='soon' is not a number"):
        StoreRecorder(store, kind="live", sources=["x"])


def test_task_scope_still_checks_the_prune_anchors(filled, tmp_path):
    cut = time.time_ns() // 1000
    time.sleep(0.002)
    filled.write([make_flow()])
    forger = Store(filled.engine, ledger=Ledger(keys=forger_keys(tmp_path)))
    prune(forger, cut)                   # a prune signed without the key hides the cut
    # The first entry signed with the host's key (the capture run's carry), not t1's.
    assert "(carry, task -): its signature is wrong" in first(filled, task="t1")


def rewrite_from(store, start: int) -> None:
    """What root with the key can do: recompute every entry from ``start`` on, from the rows
    as they are now, so that the chain verifies again."""
    import hashlib
    from db import models
    from db.ledger import digest, entry_hash, record
    keys = KeyRing.load()
    e = models.LedgerEntry.__table__
    with store.session() as s:
        prev = s.execute(sa.select(e.c.hash).where(e.c.seq == start - 1)).scalar_one()
        for entry in s.execute(sa.select(e).where(e.c.seq >= start).order_by(e.c.seq))\
                .mappings().all():
            lines = []
            for table, row_id, _ in body_rows(entry["body"]):
                t = models.Base.metadata.tables[table]
                key = row_id if table == "tasks" else int(row_id)
                row = s.execute(sa.select(t).where(t.c.id == key)).mappings().one()
                lines.append(f"{table} {row_id} {digest(record(table, row, entry['op']))}\n")
            body = "".join(lines)
            dig = hashlib.sha256(body.encode()).hexdigest()
            h = entry_hash(entry["host"], entry["seq"], prev, entry["time"], entry["op"],
                           entry["task"], entry["key_id"], dig)
            s.execute(sa.update(e).where(e.c.seq == entry["seq"]).values(
                body=body, digest=dig, prev=prev, hash=h,
                mac=keys.sign(entry["key_id"], entry["task"], bytes.fromhex(h))))
            prev = h


def test_an_edit_rewritten_with_the_key_fails_against_an_older_checkpoint(filled):
    with filled.session() as s:
        checkpoint = take(s, KeyRing.load())[0]
    with filled.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT id FROM flows WHERE server_name = 'pypi.org'"))\
            .scalar_one()
    sql(filled, "UPDATE flows SET server_name = 'innocent.example' WHERE id = :i", i=row)
    seq = seq_of(filled, "flows", row)
    assert first(filled).startswith(f"entry {HOST}#{seq} ")
    rewrite_from(filled, seq)
    assert problems(filled).ok                  # the key rewrote history: verify alone passes
    assert first(filled, checkpoints=[("cp:1", checkpoint)]) == (
        f"entry {HOST}#{checkpoint.seq} is not the one checkpoint cp:1 saw: the chain was "
        "rewritten")
