"""The lab fixture: needs root (namespaces) and the lab's tools; under CI both must be there."""

import os

import pytest

from tests.lab.lab import Lab, missing_tools


@pytest.fixture
def lab(tmp_path):
    problem = None
    if os.geteuid() != 0:
        problem = "the lab needs root (network namespaces)"
    elif missing_tools():
        problem = f"the lab needs {', '.join(missing_tools())} (tests/system-deps.sh installs them)"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    with Lab(tmp_path) as built:
        yield built
