"""Replay: judge recorded traffic under a purpose, as the live agent would have.

Sources give whole flows; the replay orders them by start, lets DNS answers
bind names for their task before later flows are judged, runs each flow
through the judge's steps, and hands records, task events and DNS bindings
to a recorder (the store, passed in) in batches.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from egress.judge import Judge, TaskPolicy
from egress.names import DnsBindings
from egress.records import (FlowRecord, Mode, NameBinding, Severity, TaskEvent, Verdict)
from tagging.manifest import Purpose

BATCH = 500
@dataclass(frozen=True)
class Rebind:
    """A binding the store already has (a restarted agent's): the judge takes it back, the
    recorder does not write it again."""
    binding: NameBinding


FLUSH = "flush"
"""An item a live source puts between records when a second has passed: what is judged is
written now, not when a batch fills (a live record is never held back for long)."""


class Recorder(Protocol):
    """Where a replay's results go; ``db.StoreRecorder`` is the store's."""

    def task(self, task: str, purpose: Purpose, mode: Mode, started: int) -> None: ...
    def records(self, batch: list[FlowRecord | TaskEvent]) -> None: ...
    def bindings(self, batch: list[NameBinding]) -> None: ...
    def end_task(self, task: str, ended: int) -> None: ...


@dataclass
class TaskSummary:
    task: str | None
    flows: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    verdicts: Counter = field(default_factory=Counter)
    """Flows by verdict."""
    severities: Counter = field(default_factory=Counter)
    """Counted (not waived) findings by severity, flows and task events."""
    findings: Counter = field(default_factory=Counter)
    """Counted findings by id."""


@dataclass
class ReplayResult:
    tasks: dict[str | None, TaskSummary]
    skipped: Counter
    """Input the sources could not use, by reason."""
    violations: bool
    """A flow flagged or blocked, or a task event of medium severity or above."""
    unbound: Counter = field(default_factory=Counter)
    """DNS answers that bound no name, by why (an undeclared resolver)."""


def _reset(flow: FlowRecord, task: str | None) -> FlowRecord:
    """The observation only: a recorded judgement is not evidence for a new one."""
    flow.task, flow.mode, flow.verdict, flow.decided_at, flow.action = task, None, None, None, None
    flow.rule, flow.findings, flow.server_name, flow.name_source = None, [], None, None
    return flow


def replay(items: Iterable[FlowRecord | NameBinding], purpose: Purpose | None, *,
           purposes: dict[str, Purpose] | None = None,
           task: str | None = None, mode: Mode | None = None,
           min_ttl_s: int | None = None, recorder: Recorder | None = None,
           on_record: Callable[[FlowRecord | TaskEvent], None] | None = None,
           skipped: Counter | None = None,
           own_resolvers: frozenset[str] = frozenset(),
           action_of: Callable[[FlowRecord], object] | None = None,
           task_lifecycle: bool = True) -> ReplayResult:
    """Judge a source's items under ``purpose``, in the order the source gives them.

    A source gives DNS bindings when the answer was seen and flows when they
    end (a capture), or both in start order (a flow log). ``task`` (or the
    purpose's own) owns every tagged flow and binding; without either, each
    keeps the task it was recorded with. ``purposes`` gives tasks their own
    purpose (a tasks file); ``purpose`` is for every other task. Untagged
    flows stay untagged and are flagged. ``own_resolvers``: live, the addresses of the
    task's own resolver, whose answers bind names. ``action_of``: live, what the kernel
    did with a judged flow (the record's ``action``; null in replay). ``task_lifecycle``
    False: tasks start and end elsewhere (the host agent's, when told), so no task-started
    or task-ended event and no task row is written here.
    """
    purposes = purposes if purposes is not None else {}   # live: filled as tasks start
    owner = task or (purpose.task if purpose else None)
    run_mode = purpose.effective_mode(mode) if purpose else Mode(mode or Mode.AUDIT)
    judge = Judge([], mode=run_mode,
                  bindings=DnsBindings(min_ttl_s) if min_ttl_s is not None else DnsBindings())

    summaries: dict[str | None, TaskSummary] = {}
    pending: list[FlowRecord | TaskEvent] = []
    pending_names: list[NameBinding] = []
    spans: dict[str, list[int]] = {}    # task -> [first start, last end]
    violations = False

    def emit(record: FlowRecord | TaskEvent) -> None:
        nonlocal violations
        summary = summaries.setdefault(record.task, TaskSummary(record.task))
        counted = [f for f in record.findings if not f.waived]
        summary.severities.update(str(f.severity) for f in counted)
        summary.findings.update(f.id for f in counted)
        if isinstance(record, FlowRecord):
            summary.flows += 1
            summary.bytes_out += record.bytes_out
            summary.bytes_in += record.bytes_in
            summary.verdicts[str(record.verdict)] += 1
            violations |= record.verdict is not Verdict.ALLOW
        else:
            violations |= any(f.severity.rank >= Severity.MEDIUM.rank for f in counted)
        pending.append(record)
        if on_record:
            on_record(record)

    def flush() -> None:
        if recorder is not None:
            if pending_names:
                recorder.bindings(list(pending_names))
            if pending:
                recorder.records(list(pending))
        pending.clear()
        pending_names.clear()

    def begin(t: str, at: int) -> None:
        p = purposes.get(t, purpose)
        if p is None:
            raise ValueError(f"flows of task {t!r} need a purpose to be judged by (--purpose)")
        task_mode = p.effective_mode(mode)
        judge.policies[t] = TaskPolicy(t, p, task_mode, own_resolvers)
        spans[t] = [at, at]
        if not task_lifecycle:
            return
        if recorder is not None:
            recorder.task(t, p, task_mode, at)
        emit(TaskEvent(task=t, time=at, event="task-started"))

    unbound: Counter = Counter()
    for item in items:
        if item is FLUSH:
            flush()
            continue
        if isinstance(item, Rebind):
            if judge.admits(item.binding):
                judge.bindings.add(item.binding)
            continue
        if isinstance(item, NameBinding):
            if owner and item.task is not None:
                item = dataclasses.replace(item, task=owner)
            if item.task is not None and item.task not in spans:
                begin(item.task, item.time)
            if judge.admits(item):
                judge.bindings.add(item)
                pending_names.append(item)
            else:
                unbound[f"from {item.resolver}:{item.resolver_port}, a resolver the purpose "
                        "does not declare"] += 1
            continue
        flow = _reset(item, owner if (owner and item.task is not None) else item.task)
        if flow.task is not None:
            if flow.task not in spans:
                begin(flow.task, flow.start)
            span = spans[flow.task]
            span[0] = min(span[0], flow.start)
            span[1] = max(span[1], flow.end or flow.start)
        judge.judge_flow(flow)
        flow.observation = None     # judged: what was seen stays out of the store and output
        if action_of is not None:
            flow.action = action_of(flow)
        emit(flow)
        for event in judge.events():
            emit(event)
        if len(pending) >= BATCH:
            flush()

    for t, (_, last) in spans.items() if task_lifecycle else ():
        emit(TaskEvent(task=t, time=last, event="task-ended"))
        if recorder is not None:
            recorder.end_task(t, last)
    flush()
    return ReplayResult(tasks=summaries, skipped=skipped if skipped is not None else Counter(),
                        violations=violations, unbound=unbound)
