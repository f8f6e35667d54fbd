"""Retention: remove what was written before a time, and the ledger entries that covered it.

Each chain loses a prefix: its entries written before the time. Rows of
flows, findings, task events and DNS bindings whose entries all went are
deleted. Tasks and capture runs are kept (later rows refer to them) and are
re-attested by ``carry`` entries. Each cut chain then gets a ``prune`` entry
saying where it was cut and what the entry before the cut hashed to, so
``egress verify`` tells a prune from a deletion. The caller writes a checkpoint
of every chain before (``egress prune`` does).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sqlalchemy import delete, or_, select

from db import models
from db.canonical import canonical
from db.ledger import MUTABLE, Item, Ledger, body_rows, head, lock_chain, task_of
from db.store import chunks

PRUNABLE = ("findings", "flows", "task_events", "dns_bindings")
"""Deleted in this order (findings before the rows they belong to)."""
KEPT = ("tasks", "capture_runs")


@dataclass
class Pruned:
    removed: Counter
    """Rows deleted per table, and ``ledger`` entries."""
    cuts: dict[str, int]
    """Per chain cut: its first kept entry's seq."""


def prune(store, before: int) -> Pruned:
    """Remove rows and entries written before ``before`` (µs), in one transaction."""
    ledger: Ledger = store.ledger
    e = models.LedgerEntry
    removed: Counter = Counter()
    cuts: dict[str, tuple[int, str]] = {}       # host -> (first kept seq, the hash before it)
    with store.session() as s:
        hosts = list(s.execute(select(e.host).group_by(e.host).order_by(e.host)).scalars())
        for host in hosts:
            lock_chain(s, host)
            last, last_hash, _ = head(s, host)
            first_kept = s.execute(select(e.seq, e.prev).where(e.host == host, e.time >= before)
                                   .order_by(e.seq).limit(1)).first()
            cut, cut_prev = first_kept if first_kept else (last + 1, last_hash)
            first = s.execute(select(e.seq).where(e.host == host).order_by(e.seq)
                              .limit(1)).scalar_one()
            if cut > first:
                cuts[host] = (cut, cut_prev)
        if not cuts:
            return Pruned(removed, {})

        def in_prefix(cut_of):
            return or_(*[(e.host == h) & (e.seq < c) for h, (c, _) in cut_of.items()])

        touched = _rows_of(s, in_prefix(cuts))
        later = _rows_of(s, ~in_prefix(cuts))
        gone = {(t, r) for t, r in touched - later if t in PRUNABLE}
        carried = sorted((t, r) for t, r in touched if t in KEPT)
        carry_items = _carry(s, carried)
        for name in PRUNABLE:
            table = models.Base.metadata.tables[name]
            ids = sorted(int(r) for t, r in gone if t == name)
            for chunk in chunks(ids):
                if name in ("flows", "task_events"):     # findings of theirs left uncovered
                    owner = models.Finding.flow_row if name == "flows" \
                        else models.Finding.task_event_row
                    removed["findings"] += s.execute(delete(models.Finding.__table__)
                                                     .where(owner.in_(chunk))).rowcount
                removed[name] += s.execute(delete(table).where(table.c.id.in_(chunk))).rowcount
        removed_rows = sum(removed.values())
        own = ledger.host if ledger.host in cuts else next(iter(cuts))
        for host, (cut, cut_prev) in sorted(cuts.items()):
            note = canonical({"cut": cut, "cut_prev": cut_prev, "before": before,
                              "removed": removed_rows}).decode()
            items = (carry_items if host == own else []) + [
                Item("prune", None, None, None, "", note)]
            ledger.append(s, items, host=host)    # before the cut: the head must still be there
            removed["ledger"] += s.execute(delete(e.__table__)
                                           .where(e.host == host, e.seq < cut)).rowcount
    return Pruned(removed, {h: c for h, (c, _) in cuts.items()})


def _rows_of(s, where) -> set[tuple[str, str]]:
    """The (table, row id) pairs the entries that ``where`` selects cover."""
    e = models.LedgerEntry
    out = set()
    for body in s.execute(select(e.body).where(where, e.op != "prune")).scalars():
        out.update((table, row) for table, row, _ in body_rows(body) or ())
    return out


def _carry(s, rows: list[tuple[str, str]]) -> list[Item]:
    """Entries re-attesting kept rows whose entries are pruned: the row as it is now."""
    items = []
    for name, row_id in rows:
        table = models.Base.metadata.tables[name]
        key = row_id if name == "tasks" else int(row_id)
        row = s.execute(select(*table.c).where(table.c.id == key)).mappings().first()
        if row is None:
            continue
        task = task_of(name, row)
        items.append(Item.of_row(name, row, task, op="carry"))
        if any(row[c] is not None for c in MUTABLE[name]):
            items.append(Item.of_row(name, row, task, op="update"))
    return items
