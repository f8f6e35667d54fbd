"""The ledger: each row the store writes is appended, in the same transaction, to a hash chain.

One chain per host (``host``, ``seq`` from 1). An entry covers the rows of one
task that one write added (``insert``), the rows whose mutable columns it
changed (``update``), rows re-attested by a prune (``carry``), or is a prune
itself (``prune``, its canonical record as the body). Its fields:

- ``body``: one line ``TABLE ID DIGEST`` a row, DIGEST being SHA-256 of the
  row's canonical encoding (RFC 8785, db.canonical) as the store holds it: the
  columns of ``covered(table)`` (``MUTABLE`` ones for an update);
- ``digest``: SHA-256 of the body;
- ``hash``: SHA-256 of the canonical header: host, seq, prev (the previous
  entry's hash, 64 zeros for the first), time, op, task, key, digest;
- ``mac``: HMAC-SHA256 of the hash's bytes under the task's key (db.ledgerkeys).

So the chain can be walked without the rows, each row is checked against its
entries, and an entry cannot be made without the key. A write's rows are hashed
one by one, but hashed into the chain, signed and inserted once per task: the
ledger's cost is one canonical encoding and one SHA-256 a row. ``flows.latest``
is not hashed: it is derived (a flow's newest row), and ``egress verify`` checks
the rule.

Writers serialize per host: on PostgreSQL an advisory lock of the host's chain,
held to the end of the transaction (db.store takes it first); on SQLite the
transaction's write lock, which the rows written before ``append`` already hold.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass
from functools import cache
from typing import Mapping

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from db import models
from db.canonical import canonical
from db.ledgerkeys import KeyRing

GENESIS = "0" * 64
"""The ``prev`` of a chain's first entry."""
HOST_ENV = "EGRESS_HOST_ID"
OFF_ENV = "EGRESS_LEDGER"
"""``EGRESS_LEDGER=off`` writes no entries: for measuring the ledger's cost only; every
row written so is named by ``egress verify`` as having no entry."""

TABLES = ("capture_runs", "tasks", "flows", "task_events", "findings", "dns_bindings")
"""Every table whose rows the ledger covers, in the order verify reads them."""
MUTABLE = {"tasks": ("ended",), "capture_runs": ("counters", "ended")}
"""Columns a later write may set (null until then); covered by ``update`` entries."""
DERIVED = {"flows": ("latest",)}
"""Columns not hashed because a rule over the other rows gives them."""


@cache
def covered(table: str) -> tuple[str, ...]:
    """The columns an insert (or carry) entry of the table covers."""
    skip = set(MUTABLE.get(table, ())) | set(DERIVED.get(table, ()))
    # In key order: canonical() then need not sort them.
    return tuple(sorted(c.name for c in models.Base.metadata.tables[table].c
                        if c.name not in skip))


def record(table: str, row: Mapping, op: str = "insert") -> dict:
    """The part of a row an entry covers (missing columns are null, as the store has them)."""
    names = MUTABLE[table] if op == "update" else covered(table)
    return {name: row.get(name) for name in names}


def digest(rec: dict) -> str:
    return hashlib.sha256(canonical(rec)).hexdigest()


def entry_hash(host: str, seq: int, prev: str, time_us: int, op: str, task: str | None,
               key: str, dig: str) -> str:
    """The entry's hash: SHA-256 of its canonical header."""
    return hashlib.sha256(canonical({"host": host, "seq": seq, "prev": prev, "time": time_us,
                                     "op": op, "task": task, "key": key, "digest": dig}))\
        .hexdigest()


def default_host() -> str:
    """$EGRESS_HOST_ID, else the host name: one chain per host."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def enabled() -> bool:
    return os.environ.get(OFF_ENV, "").lower() != "off"


@dataclass(frozen=True)
class Item:
    """What to append: one row written (or changed), or a prune (its record as ``note``)."""

    op: str
    table: str | None
    row: str | None
    task: str | None
    digest: str
    note: str | None = None

    @classmethod
    def of_row(cls, table: str, row: Mapping, task: str | None, op: str = "insert") -> "Item":
        """The entry of a row as written (``row`` includes its id), signed with ``task``'s key."""
        return cls(op, table, str(row["id"]), task, digest(record(table, row, op)))


def body_rows(body: str) -> list[tuple[str, str, str]] | None:
    """The (table, row id, digest) lines of an entry's body; None if it is not such a body."""
    if not body.endswith("\n"):
        return None
    out = []
    for line in body[:-1].split("\n"):
        parts = line.split(" ")
        if len(parts) != 3:
            return None
        out.append((parts[0], parts[1], parts[2]))
    return out


def task_of(table: str, row: Mapping) -> str | None:
    """The task whose key signs a row's entries (a finding's is its owner's: give that)."""
    return row["id"] if table == "tasks" else row.get("task")


def _lock_key(host: str) -> int:
    return int.from_bytes(hashlib.sha256(b"egress-ledger\0" + host.encode()).digest()[:8],
                          "big", signed=True)


def lock_chain(s: Session, host: str) -> None:
    """Serialize appends to a host's chain until the transaction ends (PostgreSQL; SQLite's
    write lock already does it)."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(select(func.pg_advisory_xact_lock(_lock_key(host))))


def head(s: Session, host: str) -> tuple[int, str, int]:
    """(seq, hash, time) of a chain's last entry; (0, GENESIS, 0) for none."""
    e = models.LedgerEntry
    got = s.execute(select(e.seq, e.hash, e.time).where(e.host == host)
                    .order_by(e.seq.desc()).limit(1)).first()
    return (0, GENESIS, 0) if got is None else tuple(got)


class Ledger:
    """Appends entries for one host, signed with the key ring's current key."""

    def __init__(self, keys: KeyRing | None = None, host: str | None = None):
        """Without ``keys``, the default key file is read (made if missing) at the first append."""
        self._keys = keys
        self.host = host or default_host()

    @property
    def keys(self) -> KeyRing:
        if self._keys is None:
            self._keys = KeyRing.load(create=True)
        return self._keys

    def append(self, s: Session, items: list[Item], host: str | None = None) -> int:
        """Append to the chain in the session's transaction (after its rows are written);
        returns the new head's seq."""
        host = host or self.host
        keys = self.keys
        lock_chain(s, host)
        seq, prev, last = head(s, host)
        now = max(time.time_ns() // 1000, last)    # a chain's times never go back
        key = keys.current
        rows = []
        for op, task, body in _entries(items):
            seq += 1
            dig = hashlib.sha256(body.encode("utf-8")).hexdigest()
            h = entry_hash(host, seq, prev, now, op, task, key, dig)
            rows.append({"host": host, "seq": seq, "time": now, "op": op, "task": task,
                         "key_id": key, "digest": dig, "prev": prev, "hash": h,
                         "mac": keys.sign(key, task, bytes.fromhex(h)), "body": body})
            prev = h
        if rows:
            s.execute(insert(models.LedgerEntry.__table__), rows)
        return seq


def _entries(items: list[Item]):
    """(op, task, body) of each entry, in the items' order: one per op and task for rows,
    one per prune."""
    groups: dict[tuple, list[Item]] = {}
    for n, item in enumerate(items):
        key = ("prune", n) if item.note is not None else (item.op, item.task)
        groups.setdefault(key, []).append(item)
    for members in groups.values():
        first = members[0]
        body = first.note if first.note is not None else \
            "".join(f"{i.table} {i.row} {i.digest}\n" for i in members)
        yield first.op, first.task, body
