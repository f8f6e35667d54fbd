"""Filters as data, and the SELECTs they give (SQLAlchemy expressions only)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Select, exists, false, func, select

from egress.records import FINDINGS, Verdict
from db import models


@dataclass(frozen=True, kw_only=True)
class FlowFilter:
    """Which flows (and task events) to list; None leaves a criterion out."""

    task: str | None = None
    """Only this task's flows and events."""
    since: int | None = None
    """Microseconds; a flow matches when it overlaps [since, until)."""
    until: int | None = None
    """Microseconds, exclusive."""
    verdict: Verdict | str | None = None
    """allow, flag or block. Task events have no verdict: none match when it is set."""
    finding: str | None = None
    """A finding id: only flows (and events) that carry it, waived or not."""
    limit: int | None = None
    """At most this many, the earliest first."""
    open_only: bool = False
    """Only flows whose latest record is interim: open when last recorded."""

    def __post_init__(self):
        if self.verdict is not None:
            try:
                object.__setattr__(self, "verdict", Verdict(self.verdict))
            except ValueError:
                raise ValueError(f"{self.verdict!r} is not a verdict (allow, flag, block)") \
                    from None
        if self.finding is not None and self.finding not in FINDINGS:
            raise ValueError(f"{self.finding!r} is not a finding id")
        if self.limit is not None and self.limit < 0:
            raise ValueError("limit must not be negative")


def latest_flows(filt: FlowFilter) -> Select:
    """The latest record of each flow that the filter matches, by start then flow_id."""
    flow = models.Flow
    query = select(*flow.__table__.c).where(flow.latest.is_(True))
    if filt.open_only:
        query = query.where(flow.event == "interim")
    if filt.task is not None:
        query = query.where(flow.task == filt.task)
    if filt.until is not None:
        query = query.where(flow.start < filt.until)
    if filt.since is not None:
        # A flow without an end so far lasted from its start.
        query = query.where(func.coalesce(flow.end, flow.start) >= filt.since)
    if filt.verdict is not None:
        query = query.where(flow.verdict == filt.verdict.value)
    if filt.finding is not None:
        query = query.where(exists().where(models.Finding.flow_row == flow.id,
                                           models.Finding.finding_id == filt.finding))
    query = query.order_by(flow.start, flow.flow_id, flow.id)
    return query if filt.limit is None else query.limit(filt.limit)


def task_events(filt: FlowFilter) -> Select:
    """Task events the filter matches (time in [since, until)), in time order."""
    event = models.TaskEvent
    query = _task_in_time(event, filt)
    if filt.verdict is not None:
        query = query.where(false())
    if filt.finding is not None:
        query = query.where(exists().where(models.Finding.task_event_row == event.id,
                                           models.Finding.finding_id == filt.finding))
    query = query.order_by(event.time, event.id)
    return query if filt.limit is None else query.limit(filt.limit)


def _task_in_time(model, filt: FlowFilter) -> Select:
    """Rows of a table with ``task`` and ``time`` columns: the filter's task, time in
    [since, until)."""
    query = select(*model.__table__.c)
    if filt.task is not None:
        query = query.where(model.task == filt.task)
    if filt.since is not None:
        query = query.where(model.time >= filt.since)
    if filt.until is not None:
        query = query.where(model.time < filt.until)
    return query


def findings_of(owner, row_ids: list[int]) -> Select:
    """Findings rows of the given flow or task event rows, in their recorded order."""
    column = getattr(models.Finding, owner)
    return (select(*models.Finding.__table__.c).where(column.in_(row_ids))
            .order_by(column, models.Finding.position))


def bindings_for(task: str | None, address: str, before: int, limit: int) -> Select:
    """DNS bindings of an address for a task seen at or before a time, newest first."""
    binding = models.DnsBinding
    owner = binding.task.is_(None) if task is None else binding.task == task
    return (select(*binding.__table__.c)
            .where(owner, binding.address == address, binding.time <= before)
            .order_by(binding.time.desc(), binding.id.desc()).limit(limit))


def task_bindings(filt: FlowFilter) -> Select:
    """DNS bindings of the filter's task seen in [since, until), in time order; none when
    the filter names a verdict or a finding (bindings have neither)."""
    binding = models.DnsBinding
    query = _task_in_time(binding, filt)
    if filt.verdict is not None or filt.finding is not None:
        query = query.where(false())
    query = query.order_by(binding.time, binding.id)
    return query if filt.limit is None else query.limit(filt.limit)
