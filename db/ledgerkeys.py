"""The ledger's keys: host secrets in a root-only file, and the per-task HMAC keys from them.

The file (``ledger.key`` beside the default store, or ``$EGRESS_LEDGER_KEY``)
holds one secret a line, ``ID HEX`` (32 random bytes), the newest last::

    # egress ledger keys: keep this file 0600 and a copy off this host.
    k5e1c0a9f3b2d7e64 9f0c...(64 hex digits)

New entries are signed with the last key and carry its id, so entries signed
before a rotation (a line appended) still verify as long as the old line
stays. Each task gets its own key, HKDF-SHA256 of the secret with the task id
as info: handing one task's key to a reviewer gives away no other task's.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from pathlib import Path

from db.engine import ROOT_DB, data_home

ENV = "EGRESS_LEDGER_KEY"
KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
SECRET = re.compile(r"^[0-9a-f]{64}$")
SALT = b"egress-ledger-v1"
HEADER = ("# egress ledger keys: keep this file 0600 and a copy off this host.\n"
          "# One key a line, \"ID SECRET\", the newest last: new entries are signed with it.\n")


class LedgerKeyError(Exception):
    """The key file is missing, unreadable, readable by others or malformed (one line)."""


def default_path() -> Path:
    """$EGRESS_LEDGER_KEY, else beside the default store: /var/lib/egress as root, else XDG."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    if os.geteuid() == 0:
        return ROOT_DB.with_name("ledger.key")
    return data_home() / "egress" / "ledger.key"


def new_line() -> str:
    """A fresh ``ID SECRET`` line."""
    return f"k{secrets.token_hex(8)} {secrets.token_hex(32)}\n"


class KeyRing:
    """The secrets of one key file; the last one signs."""

    def __init__(self, keys: dict[str, bytes], path: Path):
        if not keys:
            raise LedgerKeyError(f"ledger key file {path}: has no key")
        self.path = path
        self._secrets = keys
        self.current = list(keys)[-1]
        self._derived: dict[tuple[str, str | None], bytes] = {}

    @classmethod
    def load(cls, path: Path | str | None = None, *, create: bool = False) -> "KeyRing":
        """Read the key file; with ``create``, make it (0600) with one new key if missing."""
        path = Path(path) if path is not None else default_path()
        if create and not path.exists():
            _create(path)
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise LedgerKeyError(f"no ledger key file at {path} (set {ENV}, or --key)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise LedgerKeyError(f"cannot read ledger key file {path}: {e}") from None
        if mode & 0o077:
            raise LedgerKeyError(f"ledger key file {path} is open to other users "
                            f"(mode {mode & 0o777:o}); chmod 600 it")
        return cls(_parse(text, path), path)

    def __contains__(self, key_id: str) -> bool:
        return key_id in self._secrets

    def task_key(self, key_id: str, task: str | None) -> bytes:
        """The HMAC key of a task (or, for None, of the host: checkpoints, prunes)."""
        derived = self._derived.get((key_id, task))
        if derived is None:
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.kdf.hkdf import HKDF
            info = b"host" if task is None else b"task\0" + task.encode("utf-8")
            derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=SALT,
                           info=info).derive(self._secrets[key_id])
            self._derived[(key_id, task)] = derived
        return derived

    def sign(self, key_id: str, task: str | None, data: bytes) -> str:
        return hmac.digest(self.task_key(key_id, task), data, "sha256").hex()

    def check(self, key_id: str, task: str | None, data: bytes, mac: str) -> bool:
        return hmac.compare_digest(self.sign(key_id, task, data), mac)


def _parse(text: str, path: Path) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not KEY_ID.match(parts[0]) or not SECRET.match(parts[1]):
            raise LedgerKeyError(f"ledger key file {path}: line {number}: expected "
                            "\"ID SECRET\" (an id of letters, digits, . _ -; 64 hex digits)")
        if parts[0] in keys:
            raise LedgerKeyError(f"ledger key file {path}: line {number}: key id {parts[0]} again")
        keys[parts[0]] = bytes.fromhex(parts[1])
    return keys


def _create(path: Path) -> None:
    """Write the new file whole, then link it into place: a concurrent writer never reads a
    half-written file, and the first of two to link wins."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(HEADER + new_line())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass                    # another writer made it first: use theirs
    except OSError as e:
        raise LedgerKeyError(f"cannot create ledger key file {path}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
