"""The kernel side of the gate: who is queued, and what a verdict's mark does afterwards.

nft has no ``queue`` statement on these kernels (KERNEL.md), so the queue
rule is iptables-nft's ``-j NFQUEUE`` in a user chain of ours, ``EGRESS-GATE``
in ``mangle`` (priority -150), reached by one jump per family from FORWARD.
A task's original-direction TCP and UDP packets whose flow has no verdict
bits in its conntrack mark are queued; never with ``--queue-bypass`` in
enforce mode (a dead gate must stop the task's new flows, not open them).

After the gate, ``inet egress_gate`` (priority -140) copies the verdict from
the packet mark to the conntrack mark (later packets of an allowed flow skip
the queue; those of a blocked one meet the blocked-mark reject of
``inet egress``), refuses a packet marked block (a TCP reset, else ICMP
admin-prohibited: the task fails at once), and clears our mark bits so they
never reach routing or other tools.
"""

from __future__ import annotations

import subprocess

from egress.enforce.tasknet import NetError, sh

CHAIN = "EGRESS-GATE"
TABLE = "inet egress_gate"
PRIORITY = -140


def marks(mask: int) -> tuple[int, int, int]:
    """(block, allow, deny): the lowest three values of the mask's bits. Deny is what the
    ruleset marks a first packet it refuses with, for the gate to refuse."""
    block = mask & -mask
    return block, block << 1, block << 2


def watch_mark(mask: int) -> int:
    """A bit of its own, beside allow: the recorder keeps a headers-only feed of the flow
    (SSH, unknown protocols) past its first packets, for the detectors that watch."""
    return (mask & -mask) << 3


def _task_rules(host_if: str, queue: int, mask: int, audit: bool) -> list[list[str]]:
    """A bare SYN is not queued (it carries no payload: Fast Open is off in the task's
    namespace, and a task without CAP_NET_RAW cannot craft one that does), unless the
    ruleset marked it refused (the gate finds its process first)."""
    bypass = ["--queue-bypass"] if audit else []
    common = ["-i", host_if, "-m", "conntrack", "--ctdir", "ORIGINAL",
              "-m", "connmark", "--mark", f"0x0/{mask:#x}"]
    queue_to = ["-j", "NFQUEUE", "--queue-num", str(queue), *bypass]
    _, _, deny = marks(mask)
    return [[*common, "-p", "tcp", "!", "--syn", *queue_to],
            [*common, "-p", "tcp", "--syn", "-m", "mark", "--mark", f"{deny:#x}/{mask:#x}",
             *queue_to],
            [*common, "-p", "udp", *queue_to]]


def _tool(family: int) -> str:
    return "iptables-nft" if family == 4 else "ip6tables-nft"


def add(host_if: str, queue: int, mask: int, audit: bool) -> None:
    """The user chain and its jump (once per family), then this task's queue rules."""
    for family in (4, 6):
        tool = _tool(family)
        if subprocess.run([tool, "-t", "mangle", "-L", CHAIN, "-n"],
                          capture_output=True).returncode != 0:
            sh(tool, "-t", "mangle", "-N", CHAIN)
        if subprocess.run([tool, "-t", "mangle", "-C", "FORWARD", "-j", CHAIN],
                          capture_output=True).returncode != 0:
            sh(tool, "-t", "mangle", "-I", "FORWARD", "1", "-j", CHAIN)
        for rule in _task_rules(host_if, queue, mask, audit):
            sh(tool, "-t", "mangle", "-A", CHAIN, *rule)


def remove(host_if: str, queue: int, mask: int, audit: bool) -> list[str]:
    """This task's queue rules; the chain and its jump stay for other runs."""
    problems = []
    for family in (4, 6):
        for rule in _task_rules(host_if, queue, mask, audit):
            try:
                sh(_tool(family), "-t", "mangle", "-D", CHAIN, *rule)
            except NetError as e:
                problems.append(str(e))
    return problems


def post_gate(mask: int) -> str:
    """The nft chain after the gate; idempotent, shared by every run."""
    block, allow, _ = marks(mask)
    watch = watch_mark(mask)
    verdict = mask & ~watch
    t = TABLE
    return f"""add table {t}
add chain {t} post_gate {{ type filter hook forward priority {PRIORITY}; policy accept; }}
flush chain {t} post_gate
add rule {t} post_gate meta mark & {verdict:#x} == {allow:#x} ct mark set ct mark | {allow:#x}
add rule {t} post_gate meta mark & {watch:#x} == {watch:#x} ct mark set ct mark | {watch:#x}
add rule {t} post_gate meta mark & {mask:#x} == {block:#x} ct mark set ct mark | {block:#x}
add rule {t} post_gate meta mark & {mask:#x} == {block:#x} meta l4proto tcp reject with tcp reset
add rule {t} post_gate meta mark & {mask:#x} == {block:#x} reject with icmpx type admin-prohibited
add rule {t} post_gate meta mark & {mask:#x} != 0 meta mark set meta mark & {~mask & 0xFFFFFFFF:#x}
"""
