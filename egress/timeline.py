"""A task's story in time order: DNS lookups, flows opened and closed, findings, blocks,
kills and task events, each with the process where known.

Built from what the store returns (flow records, their latest version each; task events;
DNS bindings), passed in: this module reads no database. The store keeps no time per
finding, so a flow's findings, block or kill are placed when its verdict was decided:
at its start for the ``start`` and ``gate`` steps (the first payload follows the start
by a round trip), at its last packet for ``watch`` and ``end``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby
from typing import Iterable

from egress.records import (SCHEMA, Action, FlowRecord, NameBinding, ProcessInfo, Step,
                            TaskEvent, Verdict, format_time)

ENTRIES = ("task-started", "dns", "flow-open", "finding", "block", "kill", "flow-close",
           "task-event", "task-ended")
"""Entry kinds; at equal times they sort in this order (a flow opens before its finding,
which comes before the block it caused and before the flow closes)."""

_RANK = {name: i for i, name in enumerate(ENTRIES)}


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One line of a timeline. ``detail`` holds the kind's own fields (see the README)."""

    time: int
    """Microseconds since the epoch, UTC."""
    entry: str
    """One of ENTRIES."""
    task: str | None
    flow_id: str | None = None
    """The flow the entry is about; None for task events and lookups seen by our resolver."""
    detail: dict = field(default_factory=dict)
    process: ProcessInfo | None = None
    """The flow's process, where known."""

    def to_json(self) -> dict:
        process = None
        if self.process is not None:
            process = {k: getattr(self.process, k)
                       for k in ("pid", "ppid", "uid", "exe", "cmdline")}
        return {"schema": SCHEMA, "kind": "timeline", "time": format_time(self.time),
                "entry": self.entry, "task": self.task, "flow_id": self.flow_id,
                "detail": self.detail, "process": process}


def build(flows: Iterable[FlowRecord], events: Iterable[TaskEvent] = (),
          bindings: Iterable[NameBinding] = ()) -> list[Entry]:
    """The entries of these records, in time order.

    ``bindings``: DNS answers our own resolver gave (live); those a recorded DNS flow
    carried (``flow_id`` set) are that flow's lookup and are not repeated.
    """
    entries: list[Entry] = []
    for flow in flows:
        entries += _flow_entries(flow)
    for event in events:
        entries.append(_event_entry(event))
    entries += _resolver_lookups(b for b in bindings if b.flow_id is None)
    order = {id(e): i for i, e in enumerate(entries)}
    return sorted(entries, key=lambda e: (e.time, _RANK[e.entry], order[id(e)]))


def decided_time(flow: FlowRecord) -> int:
    """When the flow's verdict was decided, as near as the record tells (module doc)."""
    if flow.decided_at in (Step.WATCH, Step.END) and flow.end is not None:
        return flow.end
    return flow.start


def _flow_entries(flow: FlowRecord) -> list[Entry]:
    def entry(time: int, kind: str, **detail) -> Entry:
        return Entry(time=time, entry=kind, task=flow.task, flow_id=flow.flow_id,
                     detail=detail, process=flow.process)

    verdict = None if flow.verdict is None else str(flow.verdict)
    decided = None if flow.decided_at is None else str(flow.decided_at)
    out = []
    if flow.app == "dns" and flow.dns is not None:
        out.append(entry(flow.start, "dns", source="flow",
                         resolver=endpoint(flow.dst, flow.dport),
                         lookups=[{"name": q.name, "type": q.type, "answers": list(q.answers),
                                   "rcode": q.rcode} for q in flow.dns.queries],
                         verdict=verdict))
    else:
        out.append(entry(flow.start, "flow-open", proto=flow.proto,
                         src=endpoint(flow.src, flow.sport),
                         dst=endpoint(flow.dst, flow.dport), server_name=flow.server_name,
                         app=flow.app, verdict=verdict, decided_at=decided, rule=flow.rule,
                         mode=None if flow.mode is None else str(flow.mode)))
    when = decided_time(flow)
    for f in flow.findings:
        out.append(entry(when, "finding", decided_at=decided, **f.to_json()))
    if flow.verdict is Verdict.BLOCK:
        action = None if flow.action is None else str(flow.action)
        if flow.action is Action.KILLED:
            out.append(entry(flow.end if flow.end is not None else when, "kill",
                             action=action, decided_at=decided))
        else:
            out.append(entry(when, "block", action=action, decided_at=decided))
    if flow.app != "dns" and flow.event == "final" and flow.end is not None:
        out.append(entry(flow.end, "flow-close", conn_state=flow.conn_state,
                         duration_s=round((flow.end - flow.start) / 1e6, 6),
                         bytes_out=flow.bytes_out, bytes_in=flow.bytes_in,
                         packets_out=flow.packets_out, packets_in=flow.packets_in,
                         verdict=verdict))
    return out


def _event_entry(event: TaskEvent) -> Entry:
    kind = event.event if event.event in ("task-started", "task-ended") else "task-event"
    return Entry(time=event.time, entry=kind, task=event.task,
                 detail={"event": event.event, "findings": [f.to_json() for f in event.findings]})


def _resolver_lookups(bindings: Iterable[NameBinding]) -> list[Entry]:
    """One entry per answer of our resolver: its bindings share task, time and resolver."""
    def key(b: NameBinding):
        return (b.task or "", b.time, b.resolver or "", b.resolver_port or 0)

    out = []
    for _, group in groupby(sorted(bindings, key=key), key=key):
        rows = list(group)
        names: dict[str, list[str]] = {}
        for b in rows:
            names.setdefault(b.name, [])
            if b.address not in names[b.name]:
                names[b.name].append(b.address)
        first = rows[0]
        resolver = None if first.resolver is None else endpoint(first.resolver,
                                                                 first.resolver_port)
        out.append(Entry(time=first.time, entry="dns", task=first.task, detail={
            "source": "resolver", "resolver": resolver,
            "lookups": [{"name": n, "type": None, "answers": a, "rcode": "NOERROR"}
                        for n, a in names.items()],
            "verdict": None}))
    return out


def endpoint(address: str, port: int | None) -> str:
    """``address:port``, an IPv6 address in brackets; the address alone without a port."""
    host = f"[{address}]" if ":" in address else address
    return host if port is None else f"{host}:{port}"
