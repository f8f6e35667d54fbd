"""The database tables (SQLAlchemy 2 declarative models).

Times are integer microseconds since the epoch, UTC. Sub-records, evidence,
sources and counters are JSON text, read back strictly (db.mapping).
"""

from __future__ import annotations

from sqlalchemy import (BigInteger, Boolean, CheckConstraint, ForeignKey, Index, Integer,
                        MetaData, String, Text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints keep later migrations (and SQLite batch mode) deterministic.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
RowId = BigInteger().with_variant(Integer(), "sqlite")

TASK_ID = String(64)  # tagging.manifest.TASK_ID allows at most 64 characters
FLOW_ID = String(32)
ADDRESS = String(64)  # an IPv6 address with a zone id still fits
WORD = String(32)  # our own short vocabulary: verdicts, steps, modes, kinds


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class CaptureRun(Base):
    """One run of a recorder: a live capture or a replay, with its counters."""

    __tablename__ = "capture_runs"

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    kind: Mapped[str] = mapped_column(WORD)
    sources: Mapped[str] = mapped_column(Text)
    started: Mapped[int] = mapped_column(BigInteger)
    ended: Mapped[int | None] = mapped_column(BigInteger)
    counters: Mapped[str | None] = mapped_column(Text)
    version: Mapped[str] = mapped_column(String(64))

    __table_args__ = (CheckConstraint("kind IN ('replay', 'live')", name="kind"),)


class Task(Base):
    """A task and the expanded purpose it declared."""

    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(TASK_ID, primary_key=True)
    purpose: Mapped[str] = mapped_column(Text)
    mode: Mapped[str] = mapped_column(WORD)
    sha256: Mapped[str | None] = mapped_column(String(64))
    expanded: Mapped[str] = mapped_column(Text)
    started: Mapped[int] = mapped_column(BigInteger)
    ended: Mapped[int | None] = mapped_column(BigInteger)
    capture_run_id: Mapped[int | None] = mapped_column(ForeignKey("capture_runs.id"))


class Flow(Base):
    """One written flow record (interim or final); ``latest`` marks a flow's newest."""

    __tablename__ = "flows"

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    flow_id: Mapped[str] = mapped_column(FLOW_ID)
    event: Mapped[str] = mapped_column(WORD)
    latest: Mapped[bool] = mapped_column(Boolean)
    capture_run_id: Mapped[int | None] = mapped_column(ForeignKey("capture_runs.id"))
    task: Mapped[str | None] = mapped_column(TASK_ID)
    mode: Mapped[str | None] = mapped_column(WORD)
    community_id: Mapped[str | None] = mapped_column(Text)
    proto: Mapped[str] = mapped_column(WORD)
    ip_version: Mapped[int] = mapped_column(Integer)
    direction: Mapped[str] = mapped_column(WORD)
    src: Mapped[str] = mapped_column(ADDRESS)
    sport: Mapped[int | None] = mapped_column(Integer)
    dst: Mapped[str] = mapped_column(ADDRESS)
    dport: Mapped[int | None] = mapped_column(Integer)
    start: Mapped[int] = mapped_column(BigInteger)
    end: Mapped[int | None] = mapped_column(BigInteger)
    conn_state: Mapped[str | None] = mapped_column(WORD)
    observed: Mapped[str] = mapped_column(WORD)
    app: Mapped[str | None] = mapped_column(WORD)
    server_name: Mapped[str | None] = mapped_column(Text)
    name_source: Mapped[str | None] = mapped_column(WORD)
    bytes_out: Mapped[int] = mapped_column(BigInteger)
    bytes_in: Mapped[int] = mapped_column(BigInteger)
    packets_out: Mapped[int] = mapped_column(BigInteger)
    packets_in: Mapped[int] = mapped_column(BigInteger)
    verdict: Mapped[str | None] = mapped_column(WORD)
    decided_at: Mapped[str | None] = mapped_column(WORD)
    action: Mapped[str | None] = mapped_column(WORD)
    rule: Mapped[str | None] = mapped_column(Text)
    nat: Mapped[str | None] = mapped_column(Text)
    tls: Mapped[str | None] = mapped_column(Text)
    http: Mapped[str | None] = mapped_column(Text)
    ssh: Mapped[str | None] = mapped_column(Text)
    stratum: Mapped[str | None] = mapped_column(Text)
    dns: Mapped[str | None] = mapped_column(Text)
    quic: Mapped[str | None] = mapped_column(Text)
    process: Mapped[str | None] = mapped_column(Text)
    weird: Mapped[str | None] = mapped_column(Text)  # a JSON list (revision 0002)
    tunnel: Mapped[str | None] = mapped_column(Text)  # revision 0002

    __table_args__ = (
        Index("ix_flows_task_start", "task", "start"),
        Index("ix_flows_verdict", "verdict"),
        Index("ix_flows_flow_id", "flow_id"),
    )


class TaskEvent(Base):
    """A task event (task-started, dns-refused, ...); its findings are rows of findings."""

    __tablename__ = "task_events"

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    task: Mapped[str | None] = mapped_column(TASK_ID)
    time: Mapped[int] = mapped_column(BigInteger)
    event: Mapped[str] = mapped_column(WORD)
    capture_run_id: Mapped[int | None] = mapped_column(ForeignKey("capture_runs.id"))

    __table_args__ = (Index("ix_task_events_task_time", "task", "time"),)


class Finding(Base):
    """One finding of a flow row or of a task event row (exactly one of the two)."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    flow_row: Mapped[int | None] = mapped_column(ForeignKey("flows.id"))
    task_event_row: Mapped[int | None] = mapped_column(ForeignKey("task_events.id"))
    position: Mapped[int] = mapped_column(Integer)
    finding_id: Mapped[str] = mapped_column(String(64))
    severity: Mapped[str] = mapped_column(WORD)
    waived: Mapped[bool] = mapped_column(Boolean)
    evidence: Mapped[str] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint("(flow_row IS NULL AND task_event_row IS NOT NULL)"
                        " OR (flow_row IS NOT NULL AND task_event_row IS NULL)",
                        name="one_owner"),
        Index("ix_findings_finding_id", "finding_id"),
        # Foreign keys are not indexed by themselves on PostgreSQL.
        Index("ix_findings_flow_row", "flow_row"),
        Index("ix_findings_task_event_row", "task_event_row"),
    )


class DnsBinding(Base):
    """A name bound to an address for a task by a DNS answer the task saw."""

    __tablename__ = "dns_bindings"

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    task: Mapped[str | None] = mapped_column(TASK_ID)
    name: Mapped[str] = mapped_column(Text)
    address: Mapped[str] = mapped_column(ADDRESS)
    ttl: Mapped[int] = mapped_column(BigInteger)
    time: Mapped[int] = mapped_column(BigInteger)
    flow_id: Mapped[str | None] = mapped_column(FLOW_ID)
    resolver: Mapped[str | None] = mapped_column(ADDRESS)  # revision 0002
    resolver_port: Mapped[int | None] = mapped_column(Integer)  # revision 0002

    __table_args__ = (Index("ix_dns_bindings_task_address_time", "task", "address", "time"),)


class LedgerEntry(Base):
    """One entry of a host's hash chain (db.ledger): the rows of one task one write added
    or changed, or a prune's anchor.

    ``body`` lists the rows, one ``TABLE ID DIGEST`` line each (DIGEST: SHA-256 of the
    row's canonical encoding), or holds a prune's canonical record; ``digest`` is its
    SHA-256. ``hash`` is SHA-256 of the canonical header (host, seq, prev, time, op,
    task, key id, digest); ``mac`` is HMAC-SHA256 of ``hash`` under the task's key.
    """

    __tablename__ = "ledger"

    host: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    time: Mapped[int] = mapped_column(BigInteger)
    op: Mapped[str] = mapped_column(WORD)
    task: Mapped[str | None] = mapped_column(TASK_ID)
    key_id: Mapped[str] = mapped_column(String(32))
    digest: Mapped[str] = mapped_column(String(64))
    prev: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)

    __table_args__ = (CheckConstraint("op IN ('insert', 'update', 'carry', 'prune')",
                                      name="op"),)
