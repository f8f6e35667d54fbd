"""Where the third-party corpora are: ../shared/corpora beside the repository.

CI lays shared/ beside the clone; a missing corpus there is a failure, never a
skip (the corpora values must be reproduced in CI). Elsewhere it is a skip.
"""

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CORPORA = SHARED / "corpora"


def corpus(name: str) -> Path:
    """The folder of one corpus; fails under CI=true when it is missing, else skips."""
    path = CORPORA / name
    if not path.is_dir():
        message = f"no corpus at {path}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI must have ../shared beside the clone)")
        pytest.skip(message)
    return path
