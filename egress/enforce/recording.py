"""What reaches Python of a live task's traffic: the first packets of each flow and all its
DNS (to and from its resolver, on the host), by NFLOG.

A table of its own (``inet egress_rec``), so recording and enforcing change
independently. Its chain runs before the enforcing one (priority -190, after
conntrack at -200, before ``inet egress`` at -180), so a first packet that
the purpose rejects is on the record too: conntrack reports nothing for a
flow rejected before its entry is confirmed (KERNEL.md). Counting packets
per direction needs conntrack accounting (``nf_conntrack_acct=1``), which
the task network turns on.

Each run reads an NFLOG group of its own (the kernel gives a group to one
reader per namespace), so each task's interface jumps, through verdict maps,
to chains of its own that log to its group.
"""

from __future__ import annotations

TABLE = "inet egress_rec"
PRIORITY = -190
"""Before the enforcing chains (configuration netfilter.priority, -180 by default)."""
SNAPLEN = 65535
WATCH_PREFIX = "egress-watch"
"""The NFLOG prefix of the headers-only feed of watched flows (a snap length of HEADERS)."""
HEADERS = 128
WATCH_PACKETS = 2048
"""Packets a direction of a watched flow is followed for, headers only (the watch cap)."""


def _base() -> list[str]:
    t = TABLE
    lines = [f"add table {t}"]
    for vmap in ("by_in", "by_out", "dns_in", "dns_out"):
        lines.append(f"add map {t} {vmap} {{ type ifname : verdict; }}")
    for chain, hook, rules in (
            ("forward_record", "forward", ["iifname vmap @by_in", "oifname vmap @by_out"]),
            # the task's DNS goes to the host (its resolver), not through it
            ("input_record", "input", ["iifname vmap @dns_in"]),
            ("output_record", "output", ["oifname vmap @dns_out"])):
        lines += [f"add chain {t} {chain} {{ type filter hook {hook} priority {PRIORITY}; "
                  "policy accept; }", f"flush chain {t} {chain}"]
        lines += [f"add rule {t} {chain} {rule}" for rule in rules]
    return lines


def _chains(interface: str) -> tuple[str, str, str, str]:
    return (f"r_{interface}_out", f"r_{interface}_back", f"r_{interface}_dnsq",
            f"r_{interface}_dnsa")


def add(interface: str, group: int, packets: int, watch: int = 0) -> str:
    """Log the first ``packets`` packets of each flow through ``interface``, each way; and,
    for flows whose conntrack mark has the ``watch`` bit, their headers up to WATCH_PACKETS."""
    t, (out, back, query, answer) = TABLE, _chains(interface)
    log = f"log group {group} snaplen {SNAPLEN}"
    watched = (f'log prefix "{WATCH_PREFIX}" group {group} snaplen {HEADERS}')
    lines = _base() + [
        f"add chain {t} {out}", f"flush chain {t} {out}",
        f"add rule {t} {out} ct direction original ct original packets <= {packets} "
        f"log group {group} snaplen {SNAPLEN}",
        f"add chain {t} {back}", f"flush chain {t} {back}",
        f"add rule {t} {back} ct direction reply ct reply packets <= {packets} "
        f"log group {group} snaplen {SNAPLEN}",
        f'add element {t} by_in {{ "{interface}" : jump {out} }}',
        f'add element {t} by_out {{ "{interface}" : jump {back} }}',
        f"add chain {t} {query}", f"flush chain {t} {query}",
        f"add rule {t} {query} meta l4proto {{ tcp, udp }} th dport 53 {log}",
        f"add chain {t} {answer}", f"flush chain {t} {answer}",
        f"add rule {t} {answer} meta l4proto {{ tcp, udp }} th sport 53 {log}",
        f'add element {t} dns_in {{ "{interface}" : jump {query} }}',
        f'add element {t} dns_out {{ "{interface}" : jump {answer} }}']
    if watch:
        for chain, direction in ((out, "original"), (back, "reply")):
            lines.append(f"add rule {t} {chain} ct mark & {watch:#x} == {watch:#x} "
                         f"ct direction {direction} ct {direction} packets > {packets} "
                         f"ct {direction} packets <= {WATCH_PACKETS} {watched}")
    return "\n".join(lines) + "\n"


def remove(interface: str) -> str:
    """Works whether or not the task's entries are there (each added before deleted)."""
    t, (out, back, query, answer) = TABLE, _chains(interface)
    lines = _base()
    for vmap, chain in (("by_in", out), ("by_out", back), ("dns_in", query),
                        ("dns_out", answer)):
        lines += [f"add chain {t} {chain}",
                  f'add element {t} {vmap} {{ "{interface}" : jump {chain} }}',
                  f'delete element {t} {vmap} {{ "{interface}" }}',
                  f"flush chain {t} {chain}", f"delete chain {t} {chain}"]
    return "\n".join(lines) + "\n"
