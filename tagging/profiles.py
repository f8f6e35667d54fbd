"""Built-in destination profiles, shipped as TOML data beside this module."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources

from tagging.rules import AllowRule, RuleError


class ProfileError(ValueError):
    """A profile name we do not ship, or a broken profile file."""


@dataclass(frozen=True)
class Profile:
    name: str
    """The name a manifest's ``profiles`` uses."""
    description: str
    """What the bundle covers, one line."""
    source: str
    """Where the list comes from, one line, so a reviewer can check it."""
    rules: tuple[AllowRule, ...]
    """Its allow rules, expanded."""


def _folder():
    return resources.files("tagging") / "profiles"


def names() -> list[str]:
    """Every built-in profile, sorted."""
    return sorted(p.name[:-5] for p in _folder().iterdir() if p.name.endswith(".toml"))


_CACHE: dict[str, Profile] = {}


def load(name: str) -> Profile:
    if name in _CACHE:
        return _CACHE[name]
    if name not in names():
        raise ProfileError(f"no built-in profile {name!r} (have: {', '.join(names())})")
    path = f"tagging/profiles/{name}.toml"
    try:
        data = tomllib.loads((_folder() / f"{name}.toml").read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(data) - {"description", "source", "allow"})
    if unknown:
        raise ProfileError(f"{path}: {unknown[0]}: unknown key")
    for key in ("description", "source"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ProfileError(f"{path}: {key}: required, a one-line string")
    rules = []
    for i, table in enumerate(data.get("allow", [])):
        origin = f"profile {name} allow[{i}]"
        try:
            rules.append(AllowRule.parse(table, origin))
        except RuleError as e:
            raise ProfileError(f"{path}: allow[{i}].{e}") from None
    profile = Profile(name=name, description=data["description"], source=data["source"],
                      rules=tuple(rules))
    _CACHE[name] = profile
    return profile
