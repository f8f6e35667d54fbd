"""Sources of flows for replay: capture files and flow logs, told apart by their content."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from egress.records import FlowRecord, NameBinding
from egress.sources.flowlog import SourceError, flowlog_items


class Inputs:
    """What a replay reads: its items in order, and what it could not use."""

    def __init__(self, paths: list[str], attribution, window=None):
        """``attribution``: who owns a captured flow (``tagging.attribution.Attribution``);
        ``window``: what of each flow identification and detectors see (default: live)."""
        from egress.sources.capture import CaptureSource, sniff
        kinds = {sniff(p) for p in paths}
        if len(kinds) > 1:
            raise SourceError("give captures or flow logs, not both in one replay")
        self.skipped: Counter = Counter()
        self.capture = None
        if kinds == {"capture"}:
            self.capture = CaptureSource(paths, attribution, window=window)
            self.items: Iterable[FlowRecord | NameBinding] = self.capture
        else:
            self.items = flowlog_items(paths, self.skipped)

    def counters(self) -> dict:
        """Packets, malformed and skipped input by reason, for the summary and the store."""
        out: dict = {"skipped": dict(self.skipped)}
        if self.capture is not None:
            st = self.capture.stats
            out.update(packets=st.packets, decoded=st.decoded, snapped=st.snapped,
                       malformed=dict(st.malformed),
                       not_ip=dict(st.other), truncated=dict(st.truncated),
                       flow_table=dict(st.table))
        return out


__all__ = ["Inputs", "SourceError"]
