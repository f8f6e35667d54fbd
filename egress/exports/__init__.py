"""Exports: stored records in the formats other tools read.

``jsonl`` is the contract itself (flow records and task events, one JSON
object a line); ``zeek`` is a Zeek conn.log; ``eve`` is Suricata EVE
``flow`` events. The last two carry final flow records only (the latest
record of each flow); each module says what maps to what.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from egress.records import FlowRecord, TaskEvent

FORMATS = ("jsonl", "zeek", "eve")


def render(fmt: str, flows: Sequence[FlowRecord], events: Sequence[TaskEvent] = (), *,
           now_us: int | None = None) -> Iterator[str]:
    """The lines of one export (without line ends). ``now_us``: when the log was written
    (Zeek's #open and #close); the current time when not given."""
    if fmt == "jsonl":
        from egress.exports import jsonl
        return jsonl.lines(flows, events)
    if fmt == "zeek":
        from egress.exports import zeek
        return zeek.conn_log(flows, now_us=now_us)
    if fmt == "eve":
        from egress.exports import eve
        return eve.flow_events(flows)
    raise ValueError(f"{fmt!r} is not an export format ({', '.join(FORMATS)})")
