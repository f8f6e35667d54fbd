"""Detectors: small plug-ins, each one module with one ``inspect`` entry point.

A detector declares the steps at which it looks and the observation window
it needs, so that the live recorder can provide exactly that window and
replay applies the same one. It returns findings; it never changes the
flow. One that raises becomes an ``internal-error`` finding (the judge's
job), never a crash and never a silent allow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

from egress.names import NameBinding
from egress.records import Finding, FlowRecord, Step, TaskEvent
from tagging.manifest import Purpose
from tagging.rules import AllowRule


@dataclass(frozen=True)
class Window:
    """What of a flow a detector needs to see."""

    packets: int = 0
    """The first N packets of each direction (with payload)."""
    bytes: int = 0
    """The first N payload bytes of each direction."""
    watch: bool = False
    """A headers-only feed (sizes, directions, times) of the whole flow, up to a cap."""


@dataclass(frozen=True)
class Context:
    """What a detector may know besides the flow; passed in, never global."""

    step: Step
    """The step being judged."""
    purpose: Purpose | None
    """The owning task's purpose; None for untagged flows."""
    names: tuple[NameBinding, ...]
    """The DNS bindings of the flow's destination for its task, latest first."""
    rule: AllowRule | None = None
    """The allow rule the purpose matched at start or gate; None when none did, and at
    later steps (the purpose's rules are looked at only at start and gate)."""


class Detector(Protocol):
    name: str
    """The detector's name, used in internal-error evidence."""
    steps: frozenset[Step]
    """The steps at which it inspects."""
    window: Window
    """The observation window it needs."""

    def inspect(self, flow: FlowRecord, ctx: Context) -> Iterable[Finding]: ...


class TaskDetector(Protocol):
    """A detector of a task's behaviour over many flows (dns-tunnel: names over time).

    It sees each of the task's flows once, when the flow ends, keeps what it
    needs per task itself, and returns task events (with their findings).
    """

    name: str
    """The detector's name, used in internal-error evidence."""
    window: Window
    """The observation window it needs of each flow."""

    def observe(self, flow: FlowRecord, ctx: Context) -> Iterable[TaskEvent]: ...


GATE = Window(packets=8, bytes=16 * 1024)
"""What identification itself needs at the gate: a post-quantum ClientHello fits."""
FULL = Window(packets=1_000_000, bytes=1 << 20, watch=True)
"""``--window full``: everything a capture has (a megabyte a direction, every packet)."""


def live_window(detectors=None, task_detectors=None) -> Window:
    """The window live recording provides: what identification and every detector need.

    Replay applies it by default, so a capture gives the verdicts live would have.
    """
    windows = [GATE] + [d.window for d in (default_detectors() if detectors is None
                                           else detectors)]
    windows += [d.window for d in (default_task_detectors() if task_detectors is None
                                   else task_detectors)]
    return Window(packets=max(w.packets for w in windows), bytes=max(w.bytes for w in windows),
                  watch=any(w.watch for w in windows))


def default_task_detectors() -> list[TaskDetector]:
    """Every task-level detector that ships."""
    from egress.detectors import dns_tunnel
    return [dns_tunnel.DnsTunnel()]


def default_detectors() -> list[Detector]:
    """Every detector that ships, in the order they run."""
    from egress.detectors import (metadata, stratum, ech, encrypted_dns, icmp_tunnel,
                                  reverse_ssh, spend, mining_pool)
    return [metadata.MetadataEndpoint(), stratum.MiningStratum(),
            ech.EncryptedClientHello(), encrypted_dns.EncryptedDns(), icmp_tunnel.IcmpTunnel(),
            reverse_ssh.ReverseSshTunnel(), spend.SpendEndpoint(), mining_pool.MiningPool()]
