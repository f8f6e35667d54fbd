"""The lab fixtures: the lab needs root (namespaces) and the lab's tools; under CI both must be
there. ``recorded`` runs a scenario live in a new lab, and also replays the capture of the same
scenario committed under tests/lab/captures, so the detectors are tested on real tools' traffic
even where the lab cannot run, and a change in a tool's behaviour shows as a live failure."""

import os
import shutil
from pathlib import Path

import pytest

from tests.lab.lab import Lab, missing_tools
from tests.lab.pair import skip_or_fail

CAPTURES = Path(__file__).parent / "captures"
"""Captures of each scenario, recorded by the lab; re-record with EGRESS_LAB_RECORD=1."""


def _lab_problem() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces)"
    if missing_tools():
        return f"the lab needs {', '.join(missing_tools())} (tests/system-deps.sh installs them)"
    return None


@pytest.fixture
def lab(tmp_path):
    problem = _lab_problem()
    if problem:
        skip_or_fail(problem)
    with Lab(tmp_path) as built:
        yield built


@pytest.fixture(params=["live", "committed"])
def recorded(request, tmp_path):
    """``recorded(name, scenario)``: the pcap of ``scenario(lab)`` (which returns its capture),
    recorded now in a new lab ("live") or the one committed as captures/NAME.pcap."""
    def get(name: str, scenario) -> Path:
        committed = CAPTURES / f"{name}.pcap"
        if request.param == "committed":
            assert committed.exists(), f"{committed} is missing: record it with EGRESS_LAB_RECORD=1"
            return committed
        problem = _lab_problem()
        if problem:
            skip_or_fail(problem)
        with Lab(tmp_path) as built:
            capture = scenario(built)
        if os.environ.get("EGRESS_LAB_RECORD") == "1":
            CAPTURES.mkdir(exist_ok=True)
            shutil.copyfile(capture, committed)
        return capture
    return get
