"""Checkpoints: a chain's head (host, seq, hash, time), signed, for keeping off the host.

One JSON object a line::

    {"schema":1,"kind":"ledger-checkpoint","host":"web-1","seq":1234,"hash":"9f..",
     "time":"2026-11-28T02:10:00.000000Z","key":"k5e1c..","mac":"41.."}

``mac`` is HMAC-SHA256, under the host key (db.ledgerkeys, no task), of the
canonical object without ``mac``. Live writers export one at an interval (to
syslog, and to ``$EGRESS_CHECKPOINTS`` when set), ``egress checkpoint`` on
demand, ``egress prune`` before it removes anything; ``egress verify
--checkpoints FILE`` proves the store still holds every head in the file.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import models
from db.canonical import canonical
from db.errors import StoreError
from db.ledger import head
from db.ledgerkeys import KeyRing
from egress.records import RecordError, format_time, parse_time

FILE_ENV = "EGRESS_CHECKPOINTS"
INTERVAL_ENV = "EGRESS_CHECKPOINT_INTERVAL"
SYSLOG_ENV = "EGRESS_SYSLOG"
"""The syslog socket checkpoints go to (default /dev/log)."""
DEFAULT_INTERVAL_S = 300
KIND = "ledger-checkpoint"
FIELDS = ("schema", "kind", "host", "seq", "hash", "time", "key", "mac")


@dataclass(frozen=True)
class Checkpoint:
    host: str
    seq: int
    hash: str
    time: int
    """When it was taken, µs UTC."""
    key: str
    mac: str = ""

    def body(self) -> bytes:
        return canonical({"schema": 1, "kind": KIND, "host": self.host, "seq": self.seq,
                          "hash": self.hash, "time": format_time(self.time), "key": self.key})

    def signed(self, keys: KeyRing) -> "Checkpoint":
        """This checkpoint signed with the ring's current key."""
        unsigned = replace(self, key=keys.current, mac="")
        return replace(unsigned, mac=keys.sign(unsigned.key, None, unsigned.body()))

    def valid(self, keys: KeyRing) -> bool:
        return keys.check(self.key, None, self.body(), self.mac)

    def line(self) -> str:
        obj = json.loads(self.body())
        obj["mac"] = self.mac
        return json.dumps({k: obj[k] for k in FIELDS}, separators=(",", ":"))


def take(s: Session, keys: KeyRing, hosts: list[str] | None = None) -> list[Checkpoint]:
    """Signed checkpoints of the heads of the given chains (every chain in the store for None)."""
    if hosts is None:
        e = models.LedgerEntry
        hosts = list(s.execute(select(e.host).group_by(e.host).order_by(e.host)).scalars())
    now = time.time_ns() // 1000
    out = []
    for host in hosts:
        seq, h, _ = head(s, host)
        if seq:
            out.append(Checkpoint(host, seq, h, now, keys.current).signed(keys))
    return out


def parse(text: str, where: str) -> Checkpoint:
    """One checkpoint line (a syslog prefix before the ``{`` is ignored); ValueError naming
    ``where`` and what is wrong."""
    start = text.find("{")
    try:
        obj = json.loads(text[start:]) if start >= 0 else None
    except ValueError as e:
        raise ValueError(f"{where}: not a JSON object ({e})") from None
    if not isinstance(obj, dict) or obj.get("kind") != KIND:
        raise ValueError(f"{where}: not a ledger checkpoint")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown or set(obj) != set(FIELDS):
        problem = f"unknown key {unknown[0]}" if unknown else \
            f"missing {', '.join(sorted(set(FIELDS) - set(obj)))}"
        raise ValueError(f"{where}: {problem}")
    if obj["schema"] != 1:
        raise ValueError(f"{where}: schema {obj['schema']!r} is not 1")
    types = {"host": str, "seq": int, "hash": str, "time": str, "key": str, "mac": str}
    for name, kind in types.items():
        if not isinstance(obj[name], kind) or isinstance(obj[name], bool):
            raise ValueError(f"{where}: {name}: expected a {kind.__name__}")
    try:
        when = parse_time(obj["time"])
    except RecordError as e:
        raise ValueError(f"{where}: time: {e}") from None
    return Checkpoint(obj["host"], obj["seq"], obj["hash"], when, obj["key"], obj["mac"])


def read(path: str | Path) -> list[tuple[str, Checkpoint]]:
    """Every checkpoint of a file, each with its place (``FILE:LINE``); blank and # lines
    skipped. ValueError on the first bad line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read checkpoints {path}: {getattr(e, 'strerror', e)}") \
            from None
    out = []
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            where = f"{path}:{number}"
            out.append((where, parse(line, where)))
    return out


class Exporter:
    """Where checkpoints go: a file appended to, and/or syslog (the journal)."""

    def __init__(self, file: str | Path | None = None, syslog: bool = False):
        self.file = Path(file) if file else None
        self.syslog = syslog

    @classmethod
    def from_env(cls, *, syslog: bool) -> "Exporter":
        return cls(os.environ.get(FILE_ENV) or None, syslog)

    def __bool__(self) -> bool:
        return self.file is not None or self.syslog

    def export(self, checkpoints: list[Checkpoint]) -> None:
        lines = [c.line() for c in checkpoints]
        if self.file is not None and lines:
            try:
                with open(self.file, "a", encoding="utf-8") as f:
                    f.write("".join(line + "\n" for line in lines))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise StoreError(f"cannot append checkpoints to {self.file}: {e.strerror}") \
                    from None
        if self.syslog and lines:
            to_syslog(lines)


def to_syslog(lines: list[str]) -> None:
    """Each line to the syslog socket (``$EGRESS_SYSLOG``, else /dev/log: the journal on
    systemd hosts), as ``egress[PID]: LINE``, facility daemon. No socket there: nothing is
    sent (the file, if any, still has them)."""
    import logging
    import logging.handlers
    address = os.environ.get(SYSLOG_ENV) or "/dev/log"
    try:
        handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    except OSError:
        return
    handler.setFormatter(logging.Formatter(f"egress[{os.getpid()}]: %(message)s"))
    handler.handleError = lambda record: None          # a full or gone socket: not fatal
    handler.append_nul = False          # a trailing NUL would end up in the journal's line
    try:
        for line in lines:
            handler.emit(logging.LogRecord("egress", logging.WARNING, __file__, 0, line,
                                           None, None))
    finally:
        handler.close()


def interval_s() -> float:
    """$EGRESS_CHECKPOINT_INTERVAL seconds, default 300."""
    value = os.environ.get(INTERVAL_ENV)
    if not value:
        return DEFAULT_INTERVAL_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise StoreError(f"{INTERVAL_ENV}={value!r} is not a number of seconds above 0")
    return seconds


class Periodic:
    """A live writer's checkpoints of its own chain: at most one an interval, and at the end."""

    def __init__(self, exporter: Exporter, every_s: float):
        self.exporter = exporter
        self.every_s = every_s
        self._last = time.monotonic()

    def tick(self, store, *, final: bool = False) -> None:
        if not self.exporter or not store.ledger_on:
            return
        if final or time.monotonic() - self._last >= self.every_s:
            with store.session() as s:
                taken = take(s, store.ledger.keys, [store.ledger.host])
            self.exporter.export(taken)
            self._last = time.monotonic()
