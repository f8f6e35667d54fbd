"""Verify the ledger: the chains, every signature, every row against its entries, checkpoints.

Problems are ordered by where they are (host, then seq; rows without any entry
after every chain), so the first one names the first wrong entry.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from db import models
from db.canonical import CanonicalError
from db.checkpoints import Checkpoint
from db.ledger import GENESIS, MUTABLE, TABLES, body_rows, digest, entry_hash, record
from db.ledgerkeys import KeyRing

ROW_OPS = ("insert", "carry")
PRUNE_FIELDS = {"cut", "cut_prev", "before", "removed"}


@dataclass(frozen=True, order=True)
class Problem:
    where: tuple
    """(0, host, seq, line): an entry (line -1) or the row on that line of its body;
    (1, table, id): a row no entry covers."""
    text: str = field(compare=False)


@dataclass
class Chain:
    """What verify learnt of one host's chain."""

    first: int
    first_prev: str
    last: int = 0
    last_hash: str = GENESIS
    hashes: dict[int, str] = field(default_factory=dict)
    prune: dict | None = None
    """The record of the newest prune entry."""


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    chains: dict[str, Chain] = field(default_factory=dict)
    entries: int = 0
    rows: int = 0
    checkpoints: int = 0
    """Checkpoints matched against an entry the store still has."""
    pruned_checkpoints: int = 0
    """Checkpoints of entries pruned since: not checkable any more."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def first(self) -> str:
        return min(self.problems).text


@dataclass(frozen=True)
class _Seen:
    host: str
    seq: int
    op: str
    digest: str
    task: str | None
    line: int
    """The row's place in the entry's body."""

    @property
    def where(self) -> tuple:
        return (0, self.host, self.seq, self.line)

    def name(self, table: str, row: str) -> str:
        return f"entry {self.host}#{self.seq} ({self.op} of {table} row {row})"


def verify(s: Session, keys: KeyRing | None, task: str | None = None,
           checkpoints: list[tuple[str, Checkpoint]] = ()) -> Report:
    """Check the store's ledger; ``task`` limits signatures and rows to that task's and the
    host's own (the chains are always walked whole); ``keys`` None checks no signature."""
    report = Report()
    index: dict[tuple[str, str], list[_Seen]] = defaultdict(list)
    _walk(s, keys, task, report, index)
    _rows(s, task, report, index)
    for (table, row), seen in sorted(index.items()):
        entry = seen[0]
        report.problems.append(Problem(entry.where,
                                       f"{entry.name(table, row)}: the row is gone (deleted)"))
    _checkpoints(keys, checkpoints, report)
    return report


def _walk(s, keys, task, report, index) -> None:
    e = models.LedgerEntry
    query = select(*e.__table__.c).order_by(e.host, e.seq)
    problems = report.problems
    for entry in s.execute(query.execution_options(yield_per=10_000)).mappings():
        host, seq = entry["host"], entry["seq"]
        report.entries += 1
        name = f"entry {host}#{seq} ({entry['op']}, task {entry['task'] or '-'})"
        where = (0, host, seq, -1)
        chain = report.chains.get(host)
        if chain is None:
            chain = report.chains[host] = Chain(first=seq, first_prev=entry["prev"])
        elif seq != chain.last + 1:
            problems.append(Problem((0, host, chain.last + 1, -1),
                                    f"entry {host}#{chain.last + 1} is missing: the chain goes "
                                    f"from #{chain.last} to #{seq} (entries deleted)"))
        elif entry["prev"] != chain.last_hash:
            problems.append(Problem(where, f"{name}: does not follow #{chain.last} (its prev is "
                                           "not that entry's hash): entries reordered or replaced"))
        try:
            h = entry_hash(host, seq, entry["prev"], entry["time"], entry["op"], entry["task"],
                           entry["key_id"], entry["digest"])
        except CanonicalError as err:
            h = f"unhashable: {err}"
        if h != entry["hash"]:
            problems.append(Problem(where, f"{name}: its hash does not match its fields "
                                           "(the entry was edited)"))
        # With --task, that task's entries and the host's own (prunes, capture runs), which
        # anchor the chain.
        if keys is not None and (task is None or entry["task"] in (task, None)):
            if entry["key_id"] not in keys:
                problems.append(Problem(where, f"{name}: signed with key {entry['key_id']}, "
                                               f"which is not in {keys.path}"))
            elif not _mac_ok(keys, entry):
                problems.append(Problem(where, f"{name}: its signature is wrong (forged, or "
                                               "rewritten without the key)"))
        body = entry["body"]
        if hashlib.sha256(body.encode("utf-8")).hexdigest() != entry["digest"]:
            problems.append(Problem(where, f"{name}: its body does not match its digest (the "
                                           "entry was edited)"))
        elif entry["op"] == "prune":
            chain.prune = _prune_record(entry, name, problems)
        elif task is None or entry["task"] == task:
            rows = body_rows(body)
            if rows is None:
                problems.append(Problem(where, f"{name}: its body is not a list of rows"))
            for line, (table, row, dig) in enumerate(rows or ()):
                index[(table, row)].append(_Seen(host, seq, entry["op"], dig, entry["task"],
                                                 line))
        chain.last, chain.last_hash = seq, entry["hash"]
        chain.hashes[seq] = entry["hash"]
    for host, chain in report.chains.items():
        _start(host, chain, problems)


def _mac_ok(keys: KeyRing, entry) -> bool:
    try:
        data = bytes.fromhex(entry["hash"])
    except ValueError:
        return False
    return keys.check(entry["key_id"], entry["task"], data, entry["mac"])


def _prune_record(entry, name, problems) -> dict | None:
    try:
        rec = json.loads(entry["body"])
    except ValueError:
        rec = None
    if not isinstance(rec, dict) or set(rec) != PRUNE_FIELDS:
        problems.append(Problem((0, entry["host"], entry["seq"], -1),
                                f"{name}: its body is not a prune record"))
        return None
    return rec


def _start(host: str, chain: Chain, problems: list[Problem]) -> None:
    """A chain starts at #1 after GENESIS, or where its newest prune cut it."""
    if chain.first == 1:
        if chain.first_prev != GENESIS:
            problems.append(Problem((0, host, 1, -1), f"entry {host}#1: its prev is not the start "
                                                  "of a chain (the entry was edited)"))
        return
    prune = chain.prune
    if prune is None or prune["cut"] != chain.first or prune["cut_prev"] != chain.first_prev:
        problems.append(Problem((0, host, 1 if prune is None else prune["cut"], -1),
                                f"entries {host}#{1 if prune is None else prune['cut']}-"
                                f"#{chain.first - 1} are missing, and no prune removed them "
                                "(entries deleted)"))


def _scope(table, task: str | None):
    """The rows of one table to check: all, or one task's."""
    query = select(*table.c)
    if task is None:
        return query
    if table.name == "tasks":
        return query.where(table.c.id == task)
    if table.name == "findings":
        flows, events = models.Flow.__table__, models.TaskEvent.__table__
        return query.where(or_(
            table.c.flow_row.in_(select(flows.c.id).where(flows.c.task == task)),
            table.c.task_event_row.in_(select(events.c.id).where(events.c.task == task))))
    if "task" in table.c:
        return query.where(table.c.task == task)
    return None                     # capture runs belong to no task


def _rows(s, task, report, index) -> None:
    newest: dict[str, tuple] = {}       # flow_id -> (newest row id, its latest, its where)
    stale: dict[int, tuple] = {}        # flows rows marked latest: id -> (flow_id, where)
    for name in TABLES:
        table = models.Base.metadata.tables[name]
        query = _scope(table, task)
        if query is None:
            continue
        for row in s.execute(query.order_by(table.c.id)
                             .execution_options(yield_per=10_000)).mappings():
            report.rows += 1
            where = _row(name, row, index, report.problems)
            if name == "flows":
                if row["latest"]:
                    stale[row["id"]] = (row["flow_id"], where)
                newest[row["flow_id"]] = (row["id"], row["latest"], where)
    for flow_id, (row_id, latest, where) in newest.items():
        stale.pop(row_id, None)
        if not latest:
            report.problems.append(Problem(where, f"flows row {row_id} ({flow_id}) is not "
                                                  "marked latest, yet it is the flow's newest "
                                                  "row (latest was edited)"))
    for row_id, (flow_id, where) in stale.items():
        report.problems.append(Problem(where, f"flows row {row_id} ({flow_id}) is marked "
                                              "latest, yet the flow has a newer row (latest "
                                              "was edited)"))


def _row(table: str, row, index, problems) -> tuple:
    """Check one row against its entries; returns where it is (its insert entry, or itself)."""
    row_id = str(row["id"])
    seen = index.pop((table, row_id), None)
    label = f" ({row['flow_id']})" if table == "flows" else ""
    if not seen:
        where = (1, table, row["id"] if table != "tasks" else 0, row_id)
        problems.append(Problem(where, f"{table} row {row_id}{label} has no ledger entry "
                                       "(written behind the ledger's back)"))
        return where
    inserts = [x for x in seen if x.op in ROW_OPS]
    updates = [x for x in seen if x.op == "update"]
    if not inserts:
        problems.append(Problem(seen[0].where,
                                f"{seen[0].name(table, row_id)}: the row's insert entry is gone"))
        return seen[0].where
    insert = inserts[-1]
    if _digest(table, row, "insert") != insert.digest:
        problems.append(Problem(insert.where,
                                f"{insert.name(table, row_id)}: the row{label} no longer "
                                "matches it (the row was edited)"))
    if table not in MUTABLE:
        return insert.where
    if updates:
        if _digest(table, row, "update") != updates[-1].digest:
            problems.append(Problem(updates[-1].where,
                                    f"{updates[-1].name(table, row_id)}: the row's "
                                    f"{' or '.join(MUTABLE[table])} differs from it (edited)"))
    elif any(row[c] is not None for c in MUTABLE[table]):
        problems.append(Problem(insert.where,
                                f"{insert.name(table, row_id)}: the row has "
                                f"{', '.join(MUTABLE[table])} set, which no entry wrote (edited)"))
    return insert.where


def _digest(table: str, row, op: str) -> str | None:
    try:
        return digest(record(table, row, op))
    except CanonicalError:
        return None


def _checkpoints(keys, checkpoints, report) -> None:
    for where, cp in checkpoints:
        if keys is not None:
            if cp.key not in keys:
                report.problems.append(Problem((0, cp.host, cp.seq, -1), f"checkpoint {where}: "
                                               f"signed with key {cp.key}, not in {keys.path}"))
                continue
            if not cp.valid(keys):
                report.problems.append(Problem((0, cp.host, cp.seq, -1), f"checkpoint {where}: its "
                                               "signature is wrong (the checkpoint was edited)"))
                continue
        chain = report.chains.get(cp.host)
        if chain is None:
            report.problems.append(Problem((0, cp.host, 1, -1),
                                           f"entries {cp.host}#1-#{cp.seq} are gone: checkpoint "
                                           f"{where} saw them, the store has no chain for that "
                                           "host"))
        elif cp.seq > chain.last:
            report.problems.append(Problem((0, cp.host, chain.last + 1, -1),
                                           f"entries {cp.host}#{chain.last + 1}-#{cp.seq} are "
                                           f"gone: checkpoint {where} saw the chain up to "
                                           f"#{cp.seq}"))
        elif cp.seq in chain.hashes:
            if chain.hashes[cp.seq] != cp.hash:
                report.problems.append(Problem((0, cp.host, cp.seq, -1),
                                               f"entry {cp.host}#{cp.seq} is not the one "
                                               f"checkpoint {where} saw: the chain was rewritten"))
            else:
                report.checkpoints += 1
        elif cp.seq == chain.first - 1 and cp.hash == chain.first_prev:
            report.checkpoints += 1
        else:
            report.pruned_checkpoints += 1
