"""What the host agent adds for each task beside its ruleset: recording and DNS.

``inet egress_agent`` holds, per task, chains reached by the same match as its ruleset
(``meta skuid`` or ``socket cgroupv2`` verdict maps, output hook):

- recording (priority -190, before the enforcing chains): the first packets of each of
  the task's flows go to NFLOG with the prefix ``task:ID``, so a shared host's flows are
  told apart by the socket that sent them, not by address; the host's other sockets of
  ordinary users (uid 1000 and above) are logged ``task:`` (untagged, and flagged);
- DNS (a nat chain at priority -190, before the enforcing chains see the packet): the
  task's lookups on port 53, to whatever server, go to its own resolver on the agent
  (127.0.1.N:53), so names are bound per task and refused names never leave, also on
  hosts with a local stub resolver reached over port 53.

Replies of a local socket cannot be matched by its owner on the input hook, so the
recording chain puts a connlabel on each new flow (``ct label set N``: bit N is the
task's, UNTAGGED_LABEL untagged), and the input chain ``replies`` logs the first reply
packets of labelled flows under the same prefix. The label also tells a restarted agent
whose its open flows are (a conntrack dump carries it). Flows the gate marked watched
(SSH, unknown bytes) are followed further, headers only, both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

from egress.enforce.recording import HEADERS, WATCH_PACKETS, WATCH_PREFIX
from egress.enforce.ruleset import Match, nft_cgroup_path

TABLE = "inet egress_agent"
PRIORITY = -190
PREFIX = "task:"
UNTAGGED_LABEL = 127
LABELS = range(1, UNTAGGED_LABEL)
"""The connlabel bits tasks take, one each (bit 0 is left to other tools)."""
UNTAGGED_MIN_UID = 1000
"""Sockets of users from this uid on that no task claims are recorded as untagged; system
users' (root, daemons) are left alone: they are the host's, not an agent's."""


def _key(match: Match) -> tuple[str, str, str]:
    """(expression, value as nft writes it, map name) of a match on the output hook."""
    if match.kind == "uid":
        return "meta skuid", str(match.value), "rec_uid"
    level = str(match.value).count("/") + 1
    return (f"socket cgroupv2 level {level}", f'"{nft_cgroup_path(str(match.value))}"',
            f"rec_cgroup_l{level}")


@dataclass(frozen=True)
class Recording:
    """What the agent records of the host's flows."""
    group: int
    """The NFLOG group."""
    packets: int
    """First packets logged per flow direction."""
    watch: int = 0
    """The gate's watch mark: such flows are followed further, headers only."""
    interfaces: tuple[str, ...] = ()
    """Only flows leaving by these; none given: every interface but loopback."""

    def scope(self) -> str:
        if not self.interfaces:
            return 'oifname "lo" return'
        names = ", ".join(f'"{name}"' for name in self.interfaces)
        return f"oifname != {{ {names} }} return"


def _base(rec: Recording) -> list[str]:
    t, group, packets = TABLE, rec.group, rec.packets
    lines = [f"add table {t}",
             f"add map {t} rec_uid {{ type uid : verdict; }}",
             f"add map {t} dns_uid {{ type uid : verdict; }}"]
    for n in range(1, 9):
        lines += [f"add map {t} rec_cgroup_l{n} {{ typeof socket cgroupv2 level {n} : "
                  "verdict; }",
                  f"add map {t} dns_cgroup_l{n} {{ typeof socket cgroupv2 level {n} : "
                  "verdict; }"]
    # Before the DNS redirect's nat chain: a redirected lookup is recorded as the task sent it.
    lines += [f"add chain {t} record {{ type filter hook output priority {PRIORITY - 5}; "
              "policy accept; }", f"flush chain {t} record",
              f"add rule {t} record {rec.scope()}",
              f"add rule {t} record meta skuid vmap @rec_uid"]
    lines += [f"add rule {t} record socket cgroupv2 level {n} vmap @rec_cgroup_l{n}"
              for n in range(1, 9)]
    lines += [f"add rule {t} record meta skuid >= {UNTAGGED_MIN_UID} ct state new "
              f"ct label set {UNTAGGED_LABEL}",
              f"add rule {t} record meta skuid >= {UNTAGGED_MIN_UID} ct direction original "
              f'ct original packets <= {packets} log prefix "{PREFIX}" group {group}',
              f"add chain {t} replies {{ type filter hook input priority {PRIORITY}; "
              "policy accept; }"]
    lines += [f"add chain {t} dns {{ type nat hook output priority {PRIORITY}; "
              "policy accept; }", f"flush chain {t} dns",
              f"add rule {t} dns meta skuid vmap @dns_uid"]
    lines += [f"add rule {t} dns socket cgroupv2 level {n} vmap @dns_cgroup_l{n}"
              for n in range(1, 9)]
    return lines


def base(rec: Recording) -> str:
    """The table and its base chains, with the untagged recording: loaded when the agent
    starts, before any task."""
    return "\n".join(_base(rec)) + "\n" + replies(rec, [])


def _watched(direction: str, rec: Recording) -> str:
    return (f"ct mark & {rec.watch:#x} == {rec.watch:#x} ct direction {direction} "
            f"ct {direction} packets > {rec.packets} "
            f"ct {direction} packets <= {WATCH_PACKETS} "
            f'log prefix "{WATCH_PREFIX}" group {rec.group} snaplen {HEADERS}')


def replies(rec: Recording, tasks: list[tuple[str, int]]) -> str:
    """The input chain, rewritten whole as tasks come and go: the first reply packets of
    each task's flows (``(task, label)``) and of untagged ones, and watched flows' headers."""
    t = TABLE
    lines = [f"flush chain {t} replies"]
    for task, label in [*tasks, ("", UNTAGGED_LABEL)]:
        lines.append(f"add rule {t} replies ct label {label} ct direction reply "
                     f"ct reply packets <= {rec.packets} "
                     f'log prefix "{PREFIX}{task}" group {rec.group}')
    if rec.watch:
        lines.append(f"add rule {t} replies {_watched('reply', rec)}")
    return "\n".join(lines) + "\n"


def _chains(task_prefix: str) -> tuple[str, str]:
    return f"{task_prefix}_rec", f"{task_prefix}_dns"


def add(task: str, task_prefix: str, match: Match, resolver: str, label: int,
        recording: Recording) -> str:
    """The task's recording and DNS chains, and their dispatch entries. ``label``: the
    connlabel bit of its flows (see ``replies``)."""
    t, (rec, dns) = TABLE, _chains(task_prefix)
    group, packets = recording.group, recording.packets
    expr, value, rec_map = _key(match)
    dns_map = rec_map.replace("rec_", "dns_")
    lines = _base(recording) + [
        f"add chain {t} {rec}", f"flush chain {t} {rec}",
        f"add rule {t} {rec} ct state new ct label set {label}",
        f"add rule {t} {rec} ct direction original ct original packets <= {packets} "
        f'log prefix "{PREFIX}{task}" group {group}',
        *([f"add rule {t} {rec} {_watched('original', recording)}"] if recording.watch else []),
        f"add rule {t} {rec} accept",          # claimed: not logged again as untagged
        f"add chain {t} {dns}", f"flush chain {t} {dns}",
        f"add rule {t} {dns} meta l4proto {{ tcp, udp }} th dport 53 ip daddr != {resolver} "
        f"dnat ip to {resolver}:53",
        f"add element {t} {rec_map} {{ {value} : jump {rec} }}",
        f"add element {t} {dns_map} {{ {value} : jump {dns} }}"]
    return "\n".join(lines) + "\n"


def remove(task_prefix: str, match: Match) -> str:
    t, (rec, dns) = TABLE, _chains(task_prefix)
    _, value, rec_map = _key(match)
    dns_map = rec_map.replace("rec_", "dns_")
    lines = []
    for vmap, chain in ((rec_map, rec), (dns_map, dns)):
        lines += [f"add chain {t} {chain}",
                  f"add element {t} {vmap} {{ {value} : jump {chain} }}",
                  f"delete element {t} {vmap} {{ {value} }}",
                  f"flush chain {t} {chain}", f"delete chain {t} {chain}"]
    return "\n".join(lines) + "\n"
