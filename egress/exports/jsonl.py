"""The contract's JSON lines: flow records and task events in time order (``--json``)."""

from __future__ import annotations

import json
from typing import Iterator, Sequence

from egress.records import FlowRecord, TaskEvent


def line(record: FlowRecord | TaskEvent) -> str:
    """One record as one compact JSON object."""
    return json.dumps(record.to_json(), separators=(",", ":"))


def lines(flows: Sequence[FlowRecord], events: Sequence[TaskEvent] = ()) -> Iterator[str]:
    """Flows by start and task events by time, merged (a flow first at the same time)."""
    ordered = sorted([*flows, *events],
                     key=lambda r: r.start if isinstance(r, FlowRecord) else r.time)
    return (line(r) for r in ordered)
