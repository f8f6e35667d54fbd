"""A flow log as a source: JSON lines of flow records (``--json`` output).

Readers of our JSON ignore keys they do not know (the contract is
forward-compatible). A line that is not a flow record is counted by reason
and skipped; a file whose first record is unreadable is not a flow log and
gets a one-line error. Task events in the log are skipped and counted: the
replay raises its own.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Iterable

from egress.names import bindings_from
from egress.records import FlowRecord, NameBinding, RecordError


class SourceError(ValueError):
    """An input that cannot be read at all; one line naming the file."""


def read_flowlog(path: str | Path, skipped: Counter) -> list[FlowRecord]:
    """Every flow record of a JSON-lines file (gzip read transparently)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
    except OSError:
        gzipped = False
    opener = gzip.open if gzipped else open
    flows: list[FlowRecord] = []
    good = 0
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                    if isinstance(data, dict) and data.get("kind") == "task-event":
                        skipped["task-event"] += 1
                        good += 1
                        continue
                    flows.append(FlowRecord.from_json(data))
                    good += 1
                except (ValueError, RecordError) as e:
                    if good == 0:
                        raise SourceError(f"{path}: not a flow log (line {number}: "
                                          f"{_short(e)})") from None
                    skipped[_reason(e)] += 1
    except (OSError, EOFError, UnicodeDecodeError) as e:
        if isinstance(e, FileNotFoundError):
            raise SourceError(f"{path}: no such file") from None
        if good == 0:
            raise SourceError(f"{path}: cannot read: {e}") from None
        skipped["truncated file"] += 1  # keep what was read before the damage
    return flows


def flowlog_items(paths, skipped: Counter) -> list[FlowRecord | NameBinding]:
    """A replay's items from flow logs: in start order, each DNS flow's bindings first."""
    return ordered_items([f for path in paths for f in read_flowlog(path, skipped)])


def ordered_items(flows: Iterable[FlowRecord], bindings: Iterable[NameBinding] = ()
                  ) -> list[FlowRecord | NameBinding]:
    """Whole flow records as a replay's items: in start order, each DNS flow's bindings
    (from its answers) first. ``bindings``: answers no flow here carries (live, those of
    the task's own resolver), each before the flows that start at or after its time."""
    answers = sorted(bindings, key=lambda b: b.time)
    items: list[FlowRecord | NameBinding] = []
    i = 0
    for flow in sorted(flows, key=lambda f: (f.start, f.flow_id)):
        while i < len(answers) and answers[i].time <= flow.start:
            items.append(answers[i])
            i += 1
        items.extend(bindings_from(flow))
        items.append(flow)
    items.extend(answers[i:])
    return items


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:120]


def _reason(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return "invalid JSON"
    return f"not a flow record ({str(e).split(':')[0]})"
