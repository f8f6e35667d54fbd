"""The store: tasks, capture runs, flow records, task events and DNS bindings."""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterable, Iterator

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from egress.records import FlowRecord, RecordError, TaskEvent
from tagging.manifest import Purpose, check_task_id
from db import ledger as ledger_mod, mapping, migrate, models, queries
from db.engine import describe, make_engine
from db.errors import StoreError
from db.ledger import Item, Ledger
from db.ledgerkeys import LedgerKeyError
from db.mapping import CaptureRun, Task
from egress.records import NameBinding
from db.queries import FlowFilter

CHUNK = 1000
"""Ids per IN list: well below SQLite's and PostgreSQL's parameter limits."""

CAPTURE_KINDS = ("live", "replay")


def chunks(items: list, size: int = CHUNK) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class Store:
    """A database at the current schema. One session per call, or per ``session()`` block."""

    def __init__(self, engine: Engine, ledger: Ledger | None = None):
        """Use ``Store.open``; this assumes the schema is already at head.

        Every row written is appended to ``ledger``'s chain (by default this host's,
        signed with the default key file, made on the first write).
        """
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self.ledger = ledger or Ledger()
        self.ledger_on = ledger_mod.enabled()

    @classmethod
    def open(cls, url: str, ledger: Ledger | None = None) -> "Store":
        """Connect and migrate to head; StoreError if that fails or the database is newer."""
        try:
            engine = make_engine(url)
        except (SQLAlchemyError, ImportError) as e:
            raise StoreError(f"cannot use database {describe(url)}: {migrate.one_line(e)}") from e
        except OSError as e:
            raise StoreError(f"cannot create the database's folder: {e}") from e
        try:
            migrate.upgrade(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, ledger)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The database URL, password hidden, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed at the end of the block, rolled back on error."""
        try:
            with self._sessions() as session, session.begin():
                yield session
        except SQLAlchemyError as e:
            raise StoreError(f"database: {migrate.one_line(e)}") from e
        except LedgerKeyError as e:
            raise StoreError(str(e)) from None

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        """A write transaction holding this host's chain from its start (PostgreSQL), so a
        writer never waits for the chain while holding row locks that a prune may need."""
        with self.session() as s:
            if self.ledger_on:
                ledger_mod.lock_chain(s, self.ledger.host)
            yield s

    def _append(self, s: Session, items: list[Item]) -> None:
        """Append the rows just written to the ledger, in the same transaction."""
        if self.ledger_on and items:
            self.ledger.append(s, items)

    @staticmethod
    def _items(table, rows: list[dict], ids: list, tasks: list | None = None) -> list[Item]:
        """Ledger items of inserted rows (their tasks given, or each row's own)."""
        name = table.name
        return [Item.of_row(name, dict(row, id=i),
                            tasks[n] if tasks is not None else ledger_mod.task_of(name, row))
                for n, (row, i) in enumerate(zip(rows, ids))]

    # ------------------------------------------------------------ capture runs

    def add_capture_run(self, kind: str, sources: list[str], started: int, version: str) -> int:
        """Record the start of a live capture or replay; returns its id."""
        if kind not in CAPTURE_KINDS:
            raise StoreError(f"capture run kind {kind!r} is not live or replay")
        row = {"kind": kind, "sources": mapping.dumps(list(sources)), "started": started,
               "version": version}
        with self._writing() as s:
            run_id = s.execute(insert(models.CaptureRun).returning(models.CaptureRun.id),
                               [row]).scalar_one()
            self._append(s, self._items(models.CaptureRun.__table__, [row], [run_id]))
            return run_id

    def finish_capture_run(self, run_id: int, ended: int, counters: dict) -> None:
        """Record a run's end and its counters (packets, flows, malformed, lost...)."""
        self._update(models.CaptureRun.__table__, run_id, f"no capture run {run_id} in the store",
                     ended=ended, counters=mapping.dumps(counters))

    def _update(self, table, row_id, missing: str, **values) -> None:
        """Set a row's mutable columns (db.ledger.MUTABLE) and append the change."""
        with self._writing() as s:
            done = s.execute(update(table).where(table.c.id == row_id).values(**values))
            if done.rowcount != 1:
                raise StoreError(missing)
            row = dict(values, id=row_id)
            self._append(s, [Item.of_row(table.name, row, ledger_mod.task_of(table.name, row),
                                         op="update")])

    def capture_run(self, run_id: int) -> CaptureRun | None:
        table = models.CaptureRun.__table__
        with self.session() as s:
            row = s.execute(select(table).where(table.c.id == run_id)).mappings().first()
        return None if row is None else self._read(mapping.capture_run_from_row, row)

    # ------------------------------------------------------------------ tasks

    def add_task(self, task_id: str, purpose: Purpose, started: int,
                 capture_run_id: int | None = None, *, mode: str | None = None) -> None:
        """Record a task and its expanded purpose; the same purpose again is a no-op.

        ``mode`` is the mode it runs in, when the command line tightened the purpose's.
        """
        try:
            check_task_id(task_id)
        except ValueError as e:
            raise StoreError(str(e)) from None
        expanded = mapping.dumps(purpose.to_json())
        with self._writing() as s:
            existing = s.get(models.Task, task_id)
            if existing is not None:
                # A purpose built in code has no file hash: compare what it expands to.
                same = existing.sha256 == purpose.sha256 and (
                    purpose.sha256 is not None or existing.expanded == expanded)
                if not same:
                    raise StoreError(f"task {task_id} is already in the store with another purpose")
                return
            row = {"id": task_id, "purpose": purpose.purpose, "mode": str(mode or purpose.mode),
                   "sha256": purpose.sha256, "expanded": expanded, "started": started,
                   "ended": None, "capture_run_id": capture_run_id}
            s.add(models.Task(**row))
            s.flush()
            self._append(s, self._items(models.Task.__table__, [row], [task_id]))

    def end_task(self, task_id: str, ended: int) -> None:
        self._update(models.Task.__table__, task_id, f"no task {task_id} in the store",
                     ended=ended)

    def task(self, task_id: str) -> Task | None:
        table = models.Task.__table__
        with self.session() as s:
            row = s.execute(select(table).where(table.c.id == task_id)).mappings().first()
        return None if row is None else self._read(mapping.task_from_row, row)

    def tasks(self) -> list[Task]:
        """Every task, by start time."""
        table = models.Task.__table__
        with self.session() as s:
            rows = s.execute(select(table).order_by(table.c.started, table.c.id)).mappings().all()
        return [self._read(mapping.task_from_row, row) for row in rows]

    # ---------------------------------------------------------------- records

    def write(self, records: Iterable[FlowRecord | TaskEvent],
              capture_run_id: int | None = None) -> None:
        """Write flow records and task events in one transaction.

        A flow's newest record (the last written) is its ``latest``; older
        ones are marked so in the same transaction.
        """
        flows: list[tuple[dict, dict]] = []
        events: list[tuple[dict, dict]] = []
        for record in records:
            try:
                if isinstance(record, TaskEvent):
                    events.append(mapping.event_row(record, capture_run_id))
                else:
                    flows.append(mapping.flow_row(record, capture_run_id))
            except RecordError as e:
                name = getattr(record, "flow_id", None) or getattr(record, "event", "record")
                raise StoreError(f"cannot write {name}: {e}") from None
        last = {row["flow_id"]: i for i, (row, _) in enumerate(flows)}
        for i, (row, _) in enumerate(flows):
            row["latest"] = last[row["flow_id"]] == i

        flow_table, event_table = models.Flow.__table__, models.TaskEvent.__table__
        with self._writing() as s:
            for chunk in chunks(sorted(last)):
                s.execute(update(flow_table)
                          .where(flow_table.c.flow_id.in_(chunk), flow_table.c.latest.is_(True))
                          .values(latest=False))
            items: list[Item] = []
            findings: list[dict] = []
            owners: list[str | None] = []
            for table, rows, owner in ((flow_table, flows, "flow_row"),
                                       (event_table, events, "task_event_row")):
                values = [row for row, _ in rows]
                ids = self._insert(s, table, values)
                items += self._items(table, values, ids)
                for row_id, (row, obj) in zip(ids, rows):
                    mine = mapping.finding_rows(obj, owner, row_id)
                    findings += mine
                    owners += [row["task"]] * len(mine)
            finding_table = models.Finding.__table__
            items += self._items(finding_table, findings,
                                 self._insert(s, finding_table, findings), owners)
            self._append(s, items)

    @staticmethod
    def _insert(s: Session, table, values: list[dict]) -> list[int]:
        """Insert rows in one statement; their new ids, in order."""
        if not values:
            return []
        if s.get_bind().dialect.name == "postgresql":
            # psycopg parses a multi-row RETURNING statement in Python, several times slower
            # than drawing ids from the sequence and inserting them by plain executemany.
            sequence = func.pg_get_serial_sequence(table.name, "id")
            ids = sorted(s.execute(select(func.nextval(sequence))
                                   .select_from(func.generate_series(1, len(values))))
                         .scalars().all())
            s.execute(insert(table), [dict(row, id=i) for row, i in zip(values, ids)])
            return ids
        # SQLite: RETURNING in parameter order costs one statement a row. The first INSERT
        # takes the database's write lock until the commit, and each row gets max(id) + 1,
        # so the rows just inserted are the newest len(values) ids, in order.
        s.execute(insert(table), values)
        last = s.execute(select(func.max(table.c.id))).scalar_one()
        return list(range(last - len(values) + 1, last + 1))

    def flows(self, filt: FlowFilter = FlowFilter()) -> list[FlowRecord]:
        """The latest record of each matching flow, by start then flow_id."""
        with self.session() as s:
            rows = s.execute(queries.latest_flows(filt)).mappings().all()
            found = self._findings(s, "flow_row", [r["id"] for r in rows])
        return [self._read(mapping.flow_from_row, r, found[r["id"]]) for r in rows]

    def flow(self, flow_id: str) -> FlowRecord | None:
        """The latest record of one flow, or None."""
        table = models.Flow.__table__
        query = select(table).where(table.c.flow_id == flow_id, table.c.latest.is_(True))
        with self.session() as s:
            row = s.execute(query).mappings().first()
            if row is None:
                return None
            found = self._findings(s, "flow_row", [row["id"]])
        return self._read(mapping.flow_from_row, row, found[row["id"]])

    def task_events(self, filt: FlowFilter = FlowFilter()) -> list[TaskEvent]:
        """Matching task events by time (none when the filter names a verdict)."""
        with self.session() as s:
            rows = s.execute(queries.task_events(filt)).mappings().all()
            found = self._findings(s, "task_event_row", [r["id"] for r in rows])
        return [self._read(mapping.event_from_row, r, found[r["id"]]) for r in rows]

    @staticmethod
    def _findings(s: Session, owner: str, row_ids: list[int]) -> dict[int, list]:
        found: dict[int, list] = defaultdict(list)
        for chunk in chunks(row_ids):
            for f in s.execute(queries.findings_of(owner, chunk)).mappings():
                found[f[owner]].append(f)
        return found

    @staticmethod
    def _read(convert, row, *args):
        """Decode a row strictly; an unreadable row is a StoreError naming it and the field."""
        try:
            return convert(row, *args)
        except RecordError as e:
            label = row.get("flow_id") or f"{row.get('event', 'row')} (row {row['id']})"
            raise StoreError(f"stored {label} is unreadable: {e}") from None

    # ----------------------------------------------------------- DNS bindings

    def add_bindings(self, rows: Iterable[NameBinding]) -> None:
        """Record names bound to addresses by DNS answers, in one transaction."""
        try:
            values = [mapping.binding_row(b) for b in rows]
        except RecordError as e:
            raise StoreError(f"cannot write a DNS binding: {e}") from None
        if values:
            table = models.DnsBinding.__table__
            with self._writing() as s:
                self._append(s, self._items(table, values, self._insert(s, table, values)))

    def bindings_for(self, task: str | None, address: str, before: int,
                     limit: int = 5) -> list[NameBinding]:
        """The task's bindings of an address seen at or before ``before``, newest first."""
        with self.session() as s:
            rows = s.execute(queries.bindings_for(task, address, before, limit)).mappings().all()
        return [mapping.binding_from_row(r) for r in rows]

    def bindings(self, filt: FlowFilter = FlowFilter()) -> list[NameBinding]:
        """The DNS bindings the filter matches (task, time), in time order; none when it
        names a verdict or a finding. (A what-if replays a task's; a restarted agent's judge
        takes them back.)"""
        with self.session() as s:
            rows = s.execute(queries.task_bindings(filt)).mappings().all()
        return [mapping.binding_from_row(r) for r in rows]


def read_back(url: str, tasks: list[str]) -> tuple[list[FlowRecord], list[NameBinding]]:
    """What a restarted host agent takes back of its tasks: the last record of each of
    their flows, and of untagged ones, still open when it stopped (written as interim),
    and the tasks' DNS bindings."""
    wanted = set(tasks)
    with Store.open(url) as store:
        flows = [f for f in store.flows(FlowFilter(open_only=True))
                 if f.task is None or f.task in wanted]
        bindings = [b for task in tasks for b in store.bindings(FlowFilter(task=task))]
    return flows, bindings
