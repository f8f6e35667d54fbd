"""Parameter types that validate at the edge, and the flow filters every listing shares."""

from __future__ import annotations

import re
import time

import click

from egress.records import FINDINGS, RecordError, Verdict, parse_time
from tagging.manifest import check_task_id

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^(\d+)([smhdw])$")


def now_us() -> int:
    return time.time_ns() // 1000


class TimeType(click.ParamType):
    """``1h`` (that long before now), or an ISO 8601 time with a zone; to µs UTC."""

    name = "time"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = _DURATION.match(value.strip())
        if m:
            return now_us() - int(m.group(1)) * _UNITS[m.group(2)] * 1_000_000
        try:
            return parse_time(value.strip())
        except RecordError:
            self.fail(f"{value!r} is neither a duration (30m, 1h, 2d) nor an ISO 8601 "
                      "time with a zone (2026-03-11T02:14:07Z)", param, ctx)


class TaskIdType(click.ParamType):
    name = "task"

    def convert(self, value, param, ctx):
        try:
            return check_task_id(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


TIME = TimeType()
TASK_ID = TaskIdType()


def flow_filters(command):
    """--task, --since, --until, --verdict, --finding: the same on every listing."""
    options = [
        click.option("--task", type=TASK_ID, help="Only this task's flows and events."),
        click.option("--since", type=TIME, help="From this time: 1h, 30m, 2d or ISO 8601."),
        click.option("--until", type=TIME, help="Before this time: a duration ago or ISO 8601."),
        click.option("--verdict", type=click.Choice([v.value for v in Verdict]),
                     help="Only flows with this verdict."),
        click.option("--finding", type=click.Choice(sorted(FINDINGS)), metavar="ID",
                     help="Only flows and events with this finding id."),
    ]
    for option in reversed(options):
        command = option(command)
    return command
