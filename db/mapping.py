"""Rows to records and back: the only place that knows both shapes.

Writing checks each record against the contract first (strict), so what is
written always reads back; reading rebuilds the contract's JSON object and
decodes it strictly, so an unknown field in a stored row is an error.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass
from typing import Any, Mapping

from sqlalchemy import BigInteger, Integer, String

from db import models
from egress.records import (SCHEMA, FlowRecord, contract_fields, Mode, NameBinding, RecordError, TaskEvent,
                            format_time)
from tagging.manifest import ManifestError, Purpose

SUBRECORDS = ("nat", "tls", "http", "ssh", "stratum", "dns", "quic", "process", "weird", "tunnel")
"""FlowRecord fields stored as JSON text columns."""
NULL_MEANS = {"weird": []}
"""What a null JSON column means for fields that are never None (rows older than the column)."""
TIMES = ("start", "end")
SCALARS = tuple(f.name for f in contract_fields(FlowRecord)
                if f.name not in SUBRECORDS and f.name != "findings")
"""FlowRecord fields stored as columns of their own (same names)."""


def dumps(value: Any) -> str:
    """JSON text as we store it: compact, keys in the record's order."""
    return json.dumps(value, sort_keys=False, separators=(",", ":"))


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise RecordError(f"{where}: not valid JSON ({e.msg})") from None


def _check_text(value: Any, where: str) -> None:
    # PostgreSQL refuses NUL in text and both refuse lone surrogates; refuse alike everywhere.
    if isinstance(value, str):
        if "\x00" in value:
            raise RecordError(f"{where}: contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RecordError(f"{where}: not encodable as UTF-8") from None


def _bounds(model) -> dict[str, tuple[type, int, int]]:
    """Per column: the Python type and the range (of length, or of value) it holds."""
    out = {}
    for c in model.__table__.c:
        if isinstance(c.type, String) and c.type.length:
            out[c.name] = (str, 0, c.type.length)
        elif isinstance(c.type, BigInteger):
            out[c.name] = (int, -2**63, 2**63 - 1)
        elif isinstance(c.type, Integer):
            out[c.name] = (int, -2**31, 2**31 - 1)
    return out


# SQLite ignores VARCHAR lengths and stores any 64-bit integer; PostgreSQL enforces its
# types. Check here so both refuse alike, with the field's name.
_FLOW_BOUNDS = _bounds(models.Flow)
_EVENT_BOUNDS = _bounds(models.TaskEvent)
_BINDING_BOUNDS = _bounds(models.DnsBinding)


def _check_bounds(row: dict, bounds: dict[str, tuple[type, int, int]], where: str) -> None:
    for name, (kind, low, high) in bounds.items():
        value = row.get(name)
        if kind is str and isinstance(value, str) and len(value) > high:
            raise RecordError(f"{where}.{name}: longer than {high} characters")
        if kind is int and isinstance(value, int) and not low <= value <= high:
            raise RecordError(f"{where}.{name}: {value} is out of range")


def _check_int(value: Any, where: str, optional: bool = False) -> None:
    # JSON renders times as text, so a float time would pass the round trip rounded: refuse it.
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(f"{where}: expected an integer, not {type(value).__name__}")


# ------------------------------------------------------------------ findings


def finding_rows(obj: dict, owner: str, row_id: int) -> list[dict]:
    """Rows for the ``findings`` of a record's JSON object, owned by one flow or event row."""
    # Every row names both owner columns: executemany needs one set of keys.
    return [{"flow_row": None, "task_event_row": None, owner: row_id, "position": i,
             "finding_id": f["id"], "severity": f["severity"],
             "waived": bool(f.get("waived", False)), "evidence": dumps(f["evidence"])}
            for i, f in enumerate(obj["findings"])]


def _finding_json(row: Mapping) -> dict:
    return {"id": row["finding_id"], "severity": row["severity"], "waived": row["waived"],
            "evidence": _loads(row["evidence"], f"findings[{row['position']}].evidence")}


# --------------------------------------------------------------------- flows


def flow_row(record: FlowRecord, capture_run_id: int | None) -> tuple[dict, dict]:
    """The flows row of a record, and its checked contract JSON object (for findings)."""
    if not isinstance(record, FlowRecord):
        raise RecordError(f"expected a FlowRecord, not {type(record).__name__}")
    _check_int(record.start, "flow.start")
    _check_int(record.end, "flow.end", optional=True)
    # Refuse now what could not be read back: every value is checked as it is encoded.
    obj = record.to_checked_json()
    row = {"capture_run_id": capture_run_id}
    for name in SCALARS:
        value = getattr(record, name)
        _check_text(value, f"flow.{name}")
        row[name] = value.value if isinstance(value, enum.Enum) else value
    _check_bounds(row, _FLOW_BOUNDS, "flow")
    for name in SUBRECORDS:
        row[name] = None if obj[name] is None else dumps(obj[name])
    return row, obj


def flow_from_row(row: Mapping, findings: list[Mapping]) -> FlowRecord:
    """A FlowRecord from its flows row and findings rows (in position order), strictly."""
    obj: dict[str, Any] = {"schema": SCHEMA, "kind": "flow"}
    for name in SCALARS:
        obj[name] = row[name]
    for name in TIMES:
        if row[name] is not None:
            obj[name] = format_time(row[name])
    for name in SUBRECORDS:
        text = row[name]
        obj[name] = NULL_MEANS.get(name) if text is None else _loads(text, f"flow.{name}")
    obj["findings"] = [_finding_json(f) for f in findings]
    return FlowRecord.from_json(obj, strict=True)


# --------------------------------------------------------------- task events


def event_row(event: TaskEvent, capture_run_id: int | None) -> tuple[dict, dict]:
    """The task_events row of an event, and its checked contract JSON object."""
    if not isinstance(event, TaskEvent):
        raise RecordError(f"expected a TaskEvent, not {type(event).__name__}")
    _check_int(event.time, "task-event.time")
    obj = event.to_json()
    checked = TaskEvent.from_json(obj, strict=True)
    for name in ("task", "event"):
        _check_text(getattr(checked, name), f"task-event.{name}")
    row = {"task": checked.task, "time": checked.time, "event": checked.event,
           "capture_run_id": capture_run_id}
    _check_bounds(row, _EVENT_BOUNDS, "task-event")
    return row, obj


def event_from_row(row: Mapping, findings: list[Mapping]) -> TaskEvent:
    """A TaskEvent from its row and findings rows, strictly."""
    obj = {"schema": SCHEMA, "kind": "task-event", "task": row["task"],
           "time": format_time(row["time"]), "event": row["event"],
           "findings": [_finding_json(f) for f in findings]}
    return TaskEvent.from_json(obj, strict=True)


# ---------------------------------------------------- tasks, runs, bindings


@dataclass(frozen=True, kw_only=True)
class Task:
    """A task as stored: the purpose it declared and when it ran."""

    id: str
    purpose: Purpose
    """The expanded purpose in force (rules as they were then)."""
    mode: Mode
    """The mode the task ran in (the purpose's, or tightened by the command line)."""
    sha256: str | None
    """SHA-256 of the manifest file; None for a purpose built in code."""
    started: int
    ended: int | None
    """None while the task runs (or when its end was never recorded)."""
    capture_run_id: int | None = None


def task_from_row(row: Mapping) -> Task:
    where = f"task {row['id']} in the store"
    try:
        purpose = Purpose.from_json(_loads(row["expanded"], f"{where}: purpose"), source=where)
        mode = Mode(row["mode"])
    except (ManifestError, ValueError, TypeError, KeyError) as e:
        raise RecordError(f"{where}: {e}") from None
    return Task(id=row["id"], purpose=purpose, mode=mode, sha256=row["sha256"],
                started=row["started"], ended=row["ended"],
                capture_run_id=row["capture_run_id"])


@dataclass(frozen=True, kw_only=True)
class CaptureRun:
    """One run of a recorder (live capture or replay) and what it counted."""

    id: int
    kind: str
    """``live`` or ``replay``."""
    sources: list[str]
    """Interfaces, files or queries it read."""
    started: int
    ended: int | None
    counters: dict | None
    """Packets, flows, malformed and lost by reason...; None until the run finished."""
    version: str
    """The egress version that recorded it."""


def capture_run_from_row(row: Mapping) -> CaptureRun:
    where = f"capture run {row['id']}"
    sources = _loads(row["sources"], f"{where}: sources")
    counters = None if row["counters"] is None else _loads(row["counters"], f"{where}: counters")
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise RecordError(f"{where}: sources: expected a list of strings")
    if counters is not None and not isinstance(counters, dict):
        raise RecordError(f"{where}: counters: expected an object")
    return CaptureRun(id=row["id"], kind=row["kind"], sources=sources, started=row["started"],
                      ended=row["ended"], counters=counters, version=row["version"])


def binding_row(binding: NameBinding) -> dict:
    if not isinstance(binding, NameBinding):
        raise RecordError(f"expected a NameBinding, not {type(binding).__name__}")
    row = dataclasses.asdict(binding)
    for name in ("task", "name", "address", "flow_id", "resolver"):
        _check_text(row[name], f"binding.{name}")
    for name in ("ttl", "time"):
        _check_int(row[name], f"binding.{name}")
    _check_bounds(row, _BINDING_BOUNDS, "binding")
    return row


def binding_from_row(row: Mapping) -> NameBinding:
    return NameBinding(task=row["task"], name=row["name"], address=row["address"], ttl=row["ttl"],
                       time=row["time"], flow_id=row["flow_id"], resolver=row["resolver"],
                       resolver_port=row["resolver_port"])

