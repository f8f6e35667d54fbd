"""What reaches Python of a live task's traffic: the first packets of each flow, by NFLOG.

A table of its own (``inet egress_rec``), so recording and enforcing change
independently. Its chain runs before the enforcing one (priority -190, after
conntrack at -200, before ``inet egress`` at -180), so a first packet that
the purpose rejects is on the record too: conntrack reports nothing for a
flow rejected before its entry is confirmed (KERNEL.md). Counting packets
per direction needs conntrack accounting (``nf_conntrack_acct=1``), which
the task network turns on.
"""

from __future__ import annotations

TABLE = "inet egress_rec"
PRIORITY = -190
"""Before the enforcing chains (configuration netfilter.priority, -180 by default)."""
SNAPLEN = 65535


def rules(group: int, packets: int) -> str:
    """The table, its chain and the interface set; idempotent."""
    t = TABLE
    return f"""add table {t}
add set {t} ifaces {{ type ifname; }}
add chain {t} forward_record {{ type filter hook forward priority {PRIORITY}; policy accept; }}
flush chain {t} forward_record
add rule {t} forward_record iifname @ifaces ct direction original ct original packets <= {packets} log group {group} snaplen {SNAPLEN}
add rule {t} forward_record oifname @ifaces ct direction reply ct reply packets <= {packets} log group {group} snaplen {SNAPLEN}
"""


def add(interface: str) -> str:
    return f'add element {TABLE} ifaces {{ "{interface}" }}\n'


def remove(interface: str) -> str:
    """Works whether or not the element is there (added before it is deleted)."""
    return add(interface) + f'delete element {TABLE} ifaces {{ "{interface}" }}\n'
