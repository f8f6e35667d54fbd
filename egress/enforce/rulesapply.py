"""``egress rules apply`` / ``egress rules remove``: one task's ruleset in or out of the
kernel, from the shared generator, in one transaction each, touching nothing else.

Applying is ``generate_nft`` as one libnftables transaction; with ``resolve_now`` the
host rules' names are resolved by this host's resolver and their addresses added to the
task's sets (for ``ttl`` seconds), for firewalls without egress's resolver. Removing needs
only the match: the task is the one whose chain the match's dispatch map jumps to, and
everything of that task (its dispatch entries, chains and sets, by their prefix) goes.
"""

from __future__ import annotations

import socket

from egress.enforce.nft import Nft, NftError
from egress.enforce.ruleset import (TABLE, Match, TaskRules, elements_for_name, generate_nft,
                                    refresh_elements)


class RulesError(RuntimeError):
    pass


def _addresses(name: str) -> list[str]:
    try:
        found = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return sorted({info[4][0].split("%")[0] for info in found})


def apply(rules: TaskRules, *, resolve_now: bool = False, ttl: int = 3600,
          nft: Nft | None = None) -> list[str]:
    """Load the task's ruleset; the names resolved now (``name -> addresses``), if asked."""
    text, resolved = generate_nft(rules), []
    if resolve_now:
        for rule in rules.purpose.rules:
            if rule.host is None or rule.host.startswith("*."):
                continue                    # wildcards name no address to resolve
            pairs = elements_for_name(rules.purpose, rule.host)
            addresses = _addresses(rule.host)
            text += "".join(refresh_elements(rules, a, pairs, ttl) for a in addresses)
            resolved.append(f"{rule.host} -> {', '.join(addresses) or 'nothing'}")
    own = nft is None
    nft = nft or Nft()
    try:
        nft.run(text)
    except NftError as e:
        raise RulesError(f"loading the rules of task {rules.task}: {e}") from None
    finally:
        if own:
            nft.close()
    return resolved


def _maps(match: Match) -> list[str]:
    if match.kind == "interface":
        return ["dispatch_forward", "dispatch_input"]
    if match.kind == "uid":
        return ["dispatch_uid"]
    return [f"dispatch_cgroup_l{str(match.value).count('/') + 1}"]


def _key_matches(key, match: Match) -> bool:
    """Is a dispatch map's key (as nft lists it) the match's?"""
    if match.kind == "cgroup":             # listed as a path, relative to the cgroup2 mount
        return str(key).strip("/").endswith(str(match.value).strip("/"))
    return str(key) == str(match.value)


def remove(match: Match, *, nft: Nft | None = None) -> list[str]:
    """Remove the task the match dispatches to; the objects removed (empty: none was)."""
    own = nft is None
    nft = nft or Nft()
    try:
        try:
            listing = nft.list_json(f"table {TABLE}")
        except NftError:
            return []                       # no table: nothing of ours is loaded
        entries = listing.get("nftables", [])
        jumps: dict[str, tuple] = {}        # map -> (key as listed, chain)
        for item in entries:
            m = item.get("map")
            if not m or m.get("name") not in _maps(match):
                continue
            for elem in m.get("elem", []) or []:
                key, verdict = elem if isinstance(elem, list) else (None, None)
                target = (verdict or {}).get("jump", {}).get("target")
                if target and _key_matches(key, match):
                    jumps[m["name"]] = (key, target)
        if not jumps:
            return []
        prefix = next(iter(jumps.values()))[1].rsplit("_", 1)[0] + "_"
        lines, removed = [], []
        for vmap, (key, chain) in jumps.items():
            shown = f'"{key}"' if isinstance(key, str) else str(key)
            lines.append(f"delete element {TABLE} {vmap} {{ {shown} }}")
            removed.append(f"{vmap} {shown} -> {chain}")
        chains = sorted({i["chain"]["name"] for i in entries
                         if "chain" in i and i["chain"]["name"].startswith(prefix)})
        sets = sorted({i["set"]["name"] for i in entries
                       if "set" in i and i["set"]["name"].startswith(prefix)})
        lines += [f"flush chain {TABLE} {c}" for c in chains]
        lines += [f"delete chain {TABLE} {c}" for c in chains]
        lines += [f"delete set {TABLE} {s}" for s in sets]
        try:
            nft.run("\n".join(lines) + "\n")
        except NftError as e:
            raise RulesError(f"removing the rules of {match}: {e}") from None
        return removed + [f"chain {c}" for c in chains] + [f"set {s}" for s in sets]
    finally:
        if own:
            nft.close()
