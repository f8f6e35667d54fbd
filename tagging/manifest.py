"""Purpose manifests: a task's declared purpose, parsed strictly (DESIGN.md).

A bad manifest is refused with the file, the key and what is wrong, in one
line. The parsed ``Purpose`` carries its expanded rules (profiles included)
and the file's SHA-256, so a later replay judges with exactly what was in
force.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from egress.records import FINDINGS, Mode
from tagging import profiles
from tagging.rules import AllowRule, RuleError

MANIFEST_VERSION = 1
TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
TOP_KEYS = ("version", "purpose", "task", "mode", "profiles", "waive", "allow", "limits")
LIMIT_KEYS = ("bytes_out", "connections")


class ManifestError(ValueError):
    """``FILE: KEY: problem``: one line naming what is wrong."""

    def __init__(self, source: str, key: str | None, problem: str):
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + problem)
        self.source, self.key, self.problem = source, key, problem


def check_task_id(task: str) -> str:
    """A task id: 1-64 of letters, digits, ``.``, ``_``, ``:``, ``-``, starting alphanumeric."""
    if not isinstance(task, str) or not TASK_ID.match(task):
        raise ValueError(f"{task!r} is not a task id (1-64 letters, digits, '.', '_', ':', '-')")
    return task


@dataclass(frozen=True)
class Limits:
    bytes_out: int | None = None
    """IP bytes the task may send over its life, DNS included; None is no limit."""
    connections: int | None = None
    """Flows the task may open over its life; None is no limit."""


@dataclass(frozen=True)
class Purpose:
    """A parsed manifest: what a task declared, with every rule expanded."""

    purpose: str
    """The declared purpose, shown in reports."""
    task: str | None
    """The task id the manifest names; the command line's --task wins."""
    mode: Mode
    """audit or enforce, as declared (the command line may only tighten it)."""
    profiles: tuple[str, ...]
    """Built-in profiles included."""
    waive: frozenset[str]
    """Finding ids raised without flag."""
    rules: tuple[AllowRule, ...]
    """Every allow rule: the profiles' first, then the manifest's own."""
    limits: Limits = field(default_factory=Limits)
    """Totals over the task's life."""
    sha256: str | None = None
    """SHA-256 of the manifest file's bytes; None for a purpose built in code."""
    source: str = "<purpose>"
    """Where it was read from, for messages."""

    def effective_mode(self, requested: Mode | str | None) -> Mode:
        """The mode to run in: the command line may tighten audit to enforce, never loosen."""
        if requested is None:
            return self.mode
        requested = Mode(requested)
        if self.mode is Mode.ENFORCE and requested is Mode.AUDIT:
            raise ManifestError(self.source, "mode",
                                "the manifest says enforce; the command line may not loosen it to audit")
        return requested

    def to_json(self) -> dict:
        """The expanded purpose as stored with a task."""
        return {"version": MANIFEST_VERSION, "purpose": self.purpose, "task": self.task,
                "mode": str(self.mode), "profiles": list(self.profiles),
                "waive": sorted(self.waive),
                "limits": {"bytes_out": self.limits.bytes_out,
                           "connections": self.limits.connections},
                "rules": [r.to_json() for r in self.rules], "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: dict, source: str = "<stored purpose>") -> "Purpose":
        """Read back a stored expanded purpose (strict: unknown keys are an error)."""
        keys = {"version", "purpose", "task", "mode", "profiles", "waive", "limits",
                "rules", "sha256"}
        if not isinstance(data, dict) or set(data) != keys:
            raise ManifestError(source, None, f"stored purpose: expected keys {sorted(keys)}")
        if data["version"] != MANIFEST_VERSION:
            raise ManifestError(source, "version", f"unknown version {data['version']!r}")
        return cls(purpose=data["purpose"], task=data["task"], mode=Mode(data["mode"]),
                   profiles=tuple(data["profiles"]), waive=frozenset(data["waive"]),
                   rules=tuple(AllowRule.from_json(r) for r in data["rules"]),
                   limits=Limits(**data["limits"]), sha256=data["sha256"], source=source)


def load(path: str | Path) -> Purpose:
    """Read and check a manifest file; ManifestError names the file and key."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ManifestError(str(path), None, f"cannot read: {e.strerror}") from None
    return parse(raw, source=str(path))


def parse(raw: bytes | str, source: str = "<manifest>") -> Purpose:
    """Check a manifest's text; the same rules as ``load``."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ManifestError(source, None, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(source, None, f"not valid TOML: {e}") from None

    def fail(key, problem):
        raise ManifestError(source, key, problem)

    for key in data:
        if key not in TOP_KEYS:
            fail(key, f"unknown key (expected one of {', '.join(TOP_KEYS)})")

    if "version" not in data:
        fail("version", "required (version = 1)")
    if data["version"] != MANIFEST_VERSION or isinstance(data["version"], bool):
        fail("version", f"this egress reads version {MANIFEST_VERSION}, not {data['version']!r}")

    text = data.get("purpose")
    if not isinstance(text, str) or not text.strip():
        fail("purpose", "required: a sentence saying what the task is for")

    task = data.get("task")
    if task is not None:
        try:
            check_task_id(task)
        except ValueError as e:
            fail("task", str(e))

    mode = data.get("mode", "audit")
    if mode not in ("audit", "enforce"):
        fail("mode", f"{mode!r} is not audit or enforce")

    names = data.get("profiles", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        fail("profiles", "expected a list of profile names")
    rules: list[AllowRule] = []
    if len(set(names)) != len(names):
        fail("profiles", "lists a profile twice")
    for i, name in enumerate(names):
        try:
            rules.extend(profiles.load(name).rules)
        except profiles.ProfileError as e:
            fail(f"profiles[{i}]", str(e))

    waive = data.get("waive", [])
    if not isinstance(waive, list):
        fail("waive", "expected a list of finding ids")
    if len({str(w) for w in waive}) != len(waive):
        fail("waive", "lists a finding id twice")
    for i, fid in enumerate(waive):
        kind = FINDINGS.get(fid) if isinstance(fid, str) else None
        if kind is None:
            fail(f"waive[{i}]", f"{fid!r} is not a finding id")
        if not kind.waivable:
            fail(f"waive[{i}]", f"{fid} ({kind.severity}) can never be waived")

    allow = data.get("allow", [])
    if not isinstance(allow, list):
        fail("allow", "expected [[allow]] tables")
    for i, table in enumerate(allow):
        try:
            rules.append(AllowRule.parse(table, f"allow[{i}]"))
        except RuleError as e:
            fail(f"allow[{i}].{e.key}", e.problem)

    limits_table = data.get("limits", {})
    if not isinstance(limits_table, dict):
        fail("limits", "expected a [limits] table")
    for key, value in limits_table.items():
        if key not in LIMIT_KEYS:
            fail(f"limits.{key}", f"unknown key (expected {' or '.join(LIMIT_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(f"limits.{key}", f"{value!r} is not a positive whole number")

    return Purpose(purpose=text.strip(), task=task, mode=Mode(mode), profiles=tuple(names),
                   waive=frozenset(waive), rules=tuple(rules), limits=Limits(**limits_table),
                   sha256=hashlib.sha256(raw).hexdigest(), source=source)
