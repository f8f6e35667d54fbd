"""The store: SQLAlchemy models, migrations, and the ledger of flows, tasks and findings.

May import ``egress.records`` and ``tagging`` only (DESIGN.md's layout).

Names are exported on first use (PEP 562), so that ``db.background`` can be
imported by a replay without loading SQLAlchemy in the process that judges;
``tests/db/test_exports.py`` imports every one of them.
"""

import importlib

_EXPORTS = {
    "BackgroundRecorder": "db.background", "WriterError": "db.background",
    "CaptureRun": "db.mapping", "Task": "db.mapping",
    "default_url": "db.engine", "resolve_url": "db.engine",
    "FlowFilter": "db.queries", "NameBinding": "egress.records",
    "Store": "db.store", "StoreError": "db.errors", "StoreRecorder": "db.recorder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'db' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
