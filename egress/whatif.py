"""What if: a task's stored flows judged again under another purpose, nothing written.

The judge's stored inputs are the final records of the task's flows (their
sub-records: tls, ssh, http, stratum, dns, quic, process) and the DNS
answers the task saw, in time order; they go through the replay pipeline
(``egress.replay``) as a flow log's records do, with no recorder.

What the store does not keep cannot be looked at again: packet sizes and
times (the watch feed), echo payloads. A finding the store holds that the
same inputs, judged again under the purpose stored with the task, do not
give back rests on what only the original run saw (a reverse SSH tunnel
told by its traffic, an ICMP tunnel by its payloads). Such a finding stands
under the new purpose too, unless it is one the purpose's own rules raise
(those are judged anew) or the new purpose blocks the flow in enforce mode
(the kernel would have cut it first); the new purpose's ``waive`` applies.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from egress.judge import POLICY_IDS
from egress.records import (SCHEMA, Finding, FlowRecord, Mode, NameBinding, Severity,
                            TaskEvent, Verdict, verdict_for)
from egress.replay import replay
from egress.sources.flowlog import ordered_items
from tagging.manifest import Purpose

PURPOSE_BOUND = POLICY_IDS | {"budget-exceeded"}
"""Findings a purpose decides (its rules and limits): judged anew, never carried over."""


@dataclass
class StoredTask:
    """What the store holds of one task: the judge's inputs and its stored judgement."""

    id: str
    purpose: Purpose
    """The expanded purpose stored with the task."""
    mode: Mode
    """The mode it was judged in."""
    flows: list[FlowRecord]
    """The latest record of each of its flows."""
    bindings: list[NameBinding]
    """The DNS answers stored for it."""
    events: list[TaskEvent]
    """Its stored task events."""


@dataclass
class Change:
    """A flow whose verdict or findings the new purpose changes."""

    before: FlowRecord
    """As stored."""
    after: FlowRecord
    """As judged under the new purpose."""
    carried: list[Finding]
    """Findings kept from the store (the inputs they rest on are not stored)."""


@dataclass
class WhatIf:
    flows: int
    """Flows judged again."""
    before: Counter
    """Stored verdicts."""
    after: Counter
    """Verdicts under the new purpose."""
    changes: list[Change]
    events: list[TaskEvent]
    """Task events with findings under the new purpose (carried ones included)."""
    carried: int = 0
    """Findings kept from the store, over every flow."""
    transitions: Counter = field(default_factory=Counter)
    """(old verdict, new verdict) of the changed flows."""

    def to_json(self, purpose: Purpose) -> dict:
        """One JSON document: the counts, each change (stored and new judgement, the
        contract's fields) and the task events with findings."""
        def judgement(flow: FlowRecord) -> dict:
            data = flow.to_json()
            return {k: data[k] for k in ("verdict", "decided_at", "rule", "findings")}

        changes = []
        for c in self.changes:
            data = c.after.to_json()
            head = {k: data[k] for k in ("flow_id", "task", "community_id", "proto", "src",
                                         "sport", "dst", "dport", "start", "app",
                                         "server_name")}
            changes.append(dict(head, before=judgement(c.before), after=judgement(c.after),
                                kept=[f.id for f in c.carried]))
        return {"schema": SCHEMA, "kind": "what-if", "purpose": purpose.source,
                "sha256": purpose.sha256, "flows": self.flows,
                "before": {v.value: self.before[v.value] for v in Verdict},
                "after": {v.value: self.after[v.value] for v in Verdict},
                "changes": changes, "events": [e.to_json() for e in self.events],
                "kept": self.carried, "violations": self.violations}

    @property
    def violations(self) -> bool:
        """As replay counts them: a flow flagged or blocked, or a task event of medium
        severity or above."""
        return any(v != Verdict.ALLOW.value for v, n in self.after.items() if n) or any(
            f.severity.rank >= Severity.MEDIUM.rank and not f.waived
            for e in self.events for f in e.findings)


def _judge(tasks: list[StoredTask], purposes: dict[str, Purpose], mode: Mode | None,
           min_ttl_s: int | None) -> tuple[dict[str, FlowRecord], list[TaskEvent]]:
    """Every stored flow judged by the replay pipeline under ``purposes``; nothing kept
    from the stored judgement (replay resets it), nothing written."""
    flows = copy.deepcopy([f for t in tasks for f in t.flows])
    carried = {f.flow_id for f in flows}
    answers = [b for t in tasks for b in t.bindings if b.flow_id not in carried]
    judged: dict[str, FlowRecord] = {}
    events: list[TaskEvent] = []

    def keep(record: FlowRecord | TaskEvent) -> None:
        if isinstance(record, FlowRecord):
            judged[record.flow_id] = record
        elif record.findings:
            events.append(record)

    replay(ordered_items(flows, answers), None, purposes=purposes, mode=mode,
           min_ttl_s=min_ttl_s, on_record=keep,
           # answers no stored flow carries came from the task's own resolver (live)
           own_resolvers=frozenset(b.resolver for b in answers if b.resolver))
    return judged, events


def _same(a: Finding, b: Finding) -> bool:
    return a.id == b.id and a.evidence == b.evidence


def _unrepeated(stored: list[Finding], again: list[Finding]) -> list[Finding]:
    """Stored findings the stored inputs do not give back (purpose-bound ones aside)."""
    return [f for f in stored if f.id not in PURPOSE_BOUND
            and not any(_same(f, g) for g in again)]


def _carry(flow: FlowRecord, findings: list[Finding], waive: frozenset[str],
           decided_at) -> list[Finding]:
    """Add the carried findings to a newly judged flow; its verdict follows."""
    added = []
    for f in findings:
        if not any(_same(f, g) for g in flow.findings):
            f = dataclasses.replace(f, waived=f.id in waive)
            flow.findings.append(f)
            added.append(f)
    if not added:
        return added
    worst = max((f.severity for f in flow.findings if not f.waived),
                key=lambda s: s.rank, default=None)
    verdict = verdict_for(worst, flow.mode or Mode.AUDIT)
    if verdict is not flow.verdict:
        flow.verdict, flow.decided_at = verdict, decided_at
    return added


def _finding_keys(flow: FlowRecord) -> list:
    return sorted((f.id, f.waived) for f in flow.findings)


def what_if(tasks: list[StoredTask], purpose: Purpose, *, mode: Mode | str | None = None,
            min_ttl_s: int | None = None) -> WhatIf:
    """The stored flows of ``tasks`` judged under ``purpose`` (``mode`` may tighten its
    mode), compared with what is stored. Nothing is written."""
    stored = {f.flow_id: f for t in tasks for f in t.flows}
    baseline, baseline_events = _judge(
        tasks, {t.id: dataclasses.replace(t.purpose, mode=t.mode) for t in tasks}, None,
        min_ttl_s)
    judged, events = _judge(tasks, {t.id: purpose for t in tasks},
                            Mode(mode) if mode else None, min_ttl_s)
    result = WhatIf(flows=len(judged), before=Counter(), after=Counter(), changes=[],
                    events=events)
    for flow_id, after in judged.items():
        before = stored[flow_id]
        cut = after.mode is Mode.ENFORCE and after.verdict is Verdict.BLOCK
        carried = [] if cut else _carry(     # a blocked flow was cut: nothing later happened
            after, _unrepeated(before.findings, baseline[flow_id].findings), purpose.waive,
            before.decided_at)
        result.carried += len(carried)
        result.before[str(before.verdict)] += 1
        result.after[str(after.verdict)] += 1
        if after.verdict is not before.verdict or _finding_keys(after) != _finding_keys(before):
            result.changes.append(Change(before=before, after=after, carried=carried))
            result.transitions[(str(before.verdict), str(after.verdict))] += 1
    for t in tasks:
        for event in t.events:
            lost = _unrepeated(event.findings, [f for e in baseline_events
                                                if e.event == event.event for f in e.findings])
            if lost:
                result.carried += len(lost)
                result.events.append(dataclasses.replace(event, findings=[
                    dataclasses.replace(f, waived=f.id in purpose.waive) for f in lost]))
    result.events.sort(key=lambda e: e.time)
    return result
