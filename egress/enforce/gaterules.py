"""The kernel side of the gate: who is queued, and what a verdict's mark does afterwards.

nft has no ``queue`` statement on these kernels (KERNEL.md), so the queue
rule is iptables-nft's ``-j NFQUEUE`` in a user chain of ours, ``EGRESS-GATE``
in ``mangle`` (priority -150), reached by one jump per family from FORWARD
(``egress run``'s tasks, by their interface); the host agent's tasks are its own
sockets, by uid or cgroup, in ``EGRESS-LOCAL-GATE`` reached from OUTPUT.
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
LOCAL_CHAIN = "EGRESS-LOCAL-GATE"
"""The host agent's: its tasks' own sockets, reached from OUTPUT."""
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


def _task_rules(who: list[str], queue: int, mask: int, audit: bool,
                every_syn: bool = False) -> list[list[str]]:
    """``who``: the iptables match of the task's packets (its interface, or its sockets'
    owner). Under egress run a bare SYN is not queued (it carries no payload: Fast Open is
    off in the task's namespace, and a task without CAP_NET_RAW cannot craft one that does),
    unless the ruleset marked it refused (the gate finds its process first). ``every_syn``:
    a host's own sockets may send data in the SYN (Fast Open is the host's to set), so every
    SYN is queued; the gate lets one without payload go at once."""
    bypass = ["--queue-bypass"] if audit else []
    common = [*who, "-m", "conntrack", "--ctdir", "ORIGINAL",
              "-m", "connmark", "--mark", f"0x0/{mask:#x}"]
    queue_to = ["-j", "NFQUEUE", "--queue-num", str(queue), *bypass]
    _, _, deny = marks(mask)
    syn = ([[*common, "-p", "tcp", "--syn", *queue_to]] if every_syn else
           [[*common, "-p", "tcp", "--syn", "-m", "mark", "--mark", f"{deny:#x}/{mask:#x}",
             *queue_to]])
    return [[*common, "-p", "tcp", "!", "--syn", *queue_to], *syn,
            [*common, "-p", "udp", *queue_to]]


def tool(family: int) -> str:
    return "iptables-nft" if family == 4 else "ip6tables-nft"


def _owner(kind: str, value) -> list[str]:
    """A local task's sockets: its uid, or its cgroup2 path (the kernel resolves xt_cgroup's
    path from cgroup2's root, wherever it is mounted). Never its DNS to the agent's resolver
    on loopback."""
    match = (["-m", "owner", "--uid-owner", str(value)] if kind == "uid"
             else ["-m", "cgroup", "--path", "/" + str(value).lstrip("/")])
    return ["!", "-o", "lo", *match]


def ensure_chain(chain: str, hook: str) -> None:
    """The user chain and its jump from ``hook``, once per family."""
    for family in (4, 6):
        t = tool(family)
        if subprocess.run([t, "-t", "mangle", "-L", chain, "-n"],
                          capture_output=True).returncode != 0:
            sh(t, "-t", "mangle", "-N", chain)
        if subprocess.run([t, "-t", "mangle", "-C", hook, "-j", chain],
                          capture_output=True).returncode != 0:
            sh(t, "-t", "mangle", "-I", hook, "1", "-j", chain)


def _load(chain: str, hook: str, rules: list[list[str]]) -> None:
    """``rules`` appended to ``chain``, each once (a restarted agent loads its tasks again)."""
    ensure_chain(chain, hook)
    for family in (4, 6):
        for rule in rules:
            if subprocess.run([tool(family), "-t", "mangle", "-C", chain, *rule],
                              capture_output=True).returncode != 0:
                sh(tool(family), "-t", "mangle", "-A", chain, *rule)


def unload(chain: str, rules: list[list[str]]) -> list[str]:
    """``rules`` out of ``chain``; the chain and its jump stay for other tasks."""
    problems = []
    for family in (4, 6):
        for rule in rules:
            try:
                sh(tool(family), "-t", "mangle", "-D", chain, *rule)
            except NetError as e:
                problems.append(str(e))
    return problems


def add(host_if: str, queue: int, mask: int, audit: bool) -> None:
    """An egress run task's queue rules: its forwarded packets, by the host's interface."""
    _load(CHAIN, "FORWARD", _task_rules(["-i", host_if], queue, mask, audit))


def remove(host_if: str, queue: int, mask: int, audit: bool) -> list[str]:
    return unload(CHAIN, _task_rules(["-i", host_if], queue, mask, audit))


def add_local(kind: str, value, queue: int, mask: int, audit: bool) -> None:
    """A host agent task's queue rules: its own sockets' packets (OUTPUT), by uid or cgroup."""
    _load(LOCAL_CHAIN, "OUTPUT", _task_rules(_owner(kind, value), queue, mask, audit, True))


def remove_local(kind: str, value, queue: int, mask: int, audit: bool) -> list[str]:
    return unload(LOCAL_CHAIN, _task_rules(_owner(kind, value), queue, mask, audit, True))


def post_gate(mask: int, hook: str = "forward") -> str:
    """The nft chain after the gate; idempotent, shared by every run (``forward``) or by the
    host agent's tasks (``output``: their own sockets)."""
    block, allow, _ = marks(mask)
    watch = watch_mark(mask)
    verdict = mask & ~watch
    t, c = TABLE, "post_gate" if hook == "forward" else f"post_gate_{hook}"
    return f"""add table {t}
add chain {t} {c} {{ type filter hook {hook} priority {PRIORITY}; policy accept; }}
flush chain {t} {c}
add rule {t} {c} meta mark & {verdict:#x} == {allow:#x} ct mark set ct mark | {allow:#x}
add rule {t} {c} meta mark & {watch:#x} == {watch:#x} ct mark set ct mark | {watch:#x}
add rule {t} {c} meta mark & {mask:#x} == {block:#x} ct mark set ct mark | {block:#x}
add rule {t} {c} meta mark & {mask:#x} == {block:#x} meta l4proto tcp reject with tcp reset
add rule {t} {c} meta mark & {mask:#x} == {block:#x} reject with icmpx type admin-prohibited
add rule {t} {c} meta mark & {mask:#x} != 0 meta mark set meta mark & {~mask & 0xFFFFFFFF:#x}
"""
