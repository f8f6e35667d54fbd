"""The store as a replay's recorder: one capture run, its tasks, records and bindings."""

from __future__ import annotations

import time
from importlib import metadata

from db import checkpoints
from db.store import Store
from egress.records import FlowRecord, Mode, NameBinding, TaskEvent
from tagging.manifest import Purpose


def _now_us() -> int:
    return time.time_ns() // 1000


def _version() -> str:
    try:
        return metadata.version("egress")
    except metadata.PackageNotFoundError:
        return "unknown"


class StoreRecorder:
    """Implements ``egress.replay.Recorder`` over a Store."""

    def __init__(self, store: Store, *, kind: str, sources: list[str]):
        """Live runs also export checkpoints of this host's chain to syslog; every run to
        $EGRESS_CHECKPOINTS when set (at most one every $EGRESS_CHECKPOINT_INTERVAL s, and
        one at the end)."""
        self.store = store
        self._checkpoints = checkpoints.Periodic(
            checkpoints.Exporter.from_env(syslog=kind == "live"), checkpoints.interval_s())
        self.run_id = store.add_capture_run(kind, sources, _now_us(), _version())

    def task(self, task: str, purpose: Purpose, mode: Mode, started: int) -> None:
        self.store.add_task(task, purpose, started, capture_run_id=self.run_id, mode=mode)

    def records(self, batch: list[FlowRecord | TaskEvent]) -> None:
        self.store.write(batch, capture_run_id=self.run_id)
        self._checkpoints.tick(self.store)

    def bindings(self, batch: list[NameBinding]) -> None:
        self.store.add_bindings(batch)

    def end_task(self, task: str, ended: int) -> None:
        self.store.end_task(task, ended)

    def finish(self, result, inputs: dict) -> None:
        """Close the run with its counters: flows per task, and the inputs' (packets, losses)."""
        self.finish_counters(inputs, {t or "": s.flows for t, s in result.tasks.items()})

    def finish_counters(self, inputs: dict, flows: dict) -> None:
        self.store.finish_capture_run(self.run_id, _now_us(), dict(inputs, flows=flows))
        self._checkpoints.tick(self.store, final=True)
