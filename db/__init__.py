"""The store: SQLAlchemy models, migrations, and the ledger of flows, tasks and findings.

May import ``egress.records`` and ``tagging`` only (DESIGN.md's layout).
"""

from db.engine import default_url, resolve_url
from db.errors import StoreError
from db.mapping import CaptureRun, Task
from egress.records import NameBinding
from db.queries import FlowFilter
from db.store import Store
from db.recorder import StoreRecorder

__all__ = ["NameBinding", "CaptureRun", "FlowFilter", "Store", "StoreError", "StoreRecorder", "Task",
           "default_url", "resolve_url"]
