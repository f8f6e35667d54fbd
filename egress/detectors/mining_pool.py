"""mining-pool: a known mining pool by name, or a mining port with mining-shaped traffic.

Two ways, told apart by the evidence's ``reason``:

- ``known-pool``: a name the flow was made to (server name, SNI, HTTP Host),
  or one the task resolved to its destination, is a known pool's, at start
  or gate. The pools ship as data, ``mining_pools.toml`` beside this module,
  with the list it was curated from and that list's licence.
- ``mining-port-and-shape``: at the flow's end, on its totals: a usual
  stratum port, a long-lived, low-volume, small-packet conversation with both
  sides talking, and a payload that is TLS, stratum or unrecognised. This is
  what TLS-wrapped mining to an unlisted pool looks like; the port alone
  proves nothing (DESIGN principle 4), and neither does the shape alone (an
  idle SSH session has it too, and is told apart by its protocol).

Critical: no purpose declares its way out of it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from egress.detectors import Context, Window
from egress.detectors.hostlist import (HostListError, HostSet, check_keys, fail, flow_names,
                                       host_patterns, load_toml, read_text, text_field)
from egress.records import Finding, FlowRecord, Step

DEFAULT_PATH = Path(__file__).with_name("mining_pools.toml")

MIN_DURATION_S = 60
"""A miner holds its pool connection for minutes to days; a request, a download or a
health check is done well within a minute."""
MAX_BYTES_PER_MIN = 64 * 1024
"""Each way. Stratum sends a job every block or refresh and a share every few seconds
at most (a few KiB a minute, ~20 KiB for a fast GPU); a transfer or a stream runs far
above this."""
MAX_MEAN_PACKET = 512
"""Bytes, each way. A Monero job notification is ~450-500 B on the wire and a share
~300 B, and ACKs pull the mean down; bulk transfers run at the MTU (~1,400-1,500 B)."""
MIN_PACKETS_PER_MIN = 1
"""Each way. Jobs go one way and shares (or at least the ACKs) the other all the while;
a connection silent one way is not mining."""
SHAPE_APPS = frozenset({"tls", "unknown", "stratum"})
"""What a pool speaks: stratum in clear, stratum inside TLS (seen as tls), or a dialect
no identifier knows. SSH, HTTP, DNS and the rest are told apart by protocol."""

_TOP_KEYS = ("source", "licence", "ports", "pool")
_PORTS_KEYS = ("ports", "source")
_POOL_KEYS = ("name", "hosts", "source")


class PoolListError(HostListError):
    """``FILE: KEY: problem``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Pool:
    name: str
    """Our short name for the pool operator."""
    hosts: tuple[str, ...]
    """Normalised names, or ``*.`` + suffix for the names below a suffix."""
    source: str
    """Where the entry was checked: the base list, or the pool's own page."""


class PoolList:
    """Known pools, looked up by name, and the usual stratum ports."""

    def __init__(self, pools: list[Pool], ports: frozenset[int], *, source: str,
                 licence: str, ports_source: str):
        self.pools = tuple(pools)
        self.ports = ports
        self.source = source
        self.licence = licence
        self.ports_source = ports_source
        self._hosts: HostSet[Pool] = HostSet()
        for p in pools:
            for host in p.hosts:
                self._hosts.add(host, p)

    def lookup(self, name: str) -> Pool | None:
        """The pool a normalised name belongs to (exact, or below a ``*.`` suffix)."""
        return self._hosts.match(name)


def parse(text: str, path: str | Path = "<mining pools>") -> PoolList:
    """The list from TOML text; raises PoolListError naming the key at fault."""
    data = load_toml(PoolListError, text, path)
    check_keys(PoolListError, path, "", data, _TOP_KEYS)
    source = text_field(PoolListError, path, "source", data.get("source"))
    licence = text_field(PoolListError, path, "licence", data.get("licence"))

    ports_table = data.get("ports")
    if not isinstance(ports_table, dict):
        raise fail(PoolListError, path, "ports", "required, a [ports] table")
    check_keys(PoolListError, path, "ports", ports_table, _PORTS_KEYS)
    values = ports_table.get("ports")
    if not isinstance(values, list) or not values:
        raise fail(PoolListError, path, "ports.ports", "required, a non-empty list of ports")
    ports: set[int] = set()
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
            raise fail(PoolListError, path, "ports.ports", f"{v!r} is not a port")
        if v in ports:
            raise fail(PoolListError, path, "ports.ports", f"{v} is listed twice")
        ports.add(v)
    ports_source = text_field(PoolListError, path, "ports.source", ports_table.get("source"))

    entries = data.get("pool", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise fail(PoolListError, path, "pool", "expected [[pool]] tables")
    pools: list[Pool] = []
    names: set[str] = set()
    claimed: HostSet[str] = HostSet()
    for i, entry in enumerate(entries):
        where = f"pool[{i}]"
        check_keys(PoolListError, path, where, entry, _POOL_KEYS)
        name = text_field(PoolListError, path, f"{where}.name", entry.get("name"))
        if name in names:
            raise fail(PoolListError, path, f"{where}.name", f"{name!r} is listed twice")
        names.add(name)
        hosts = host_patterns(PoolListError, path, f"{where}.hosts", entry.get("hosts"))
        src = text_field(PoolListError, path, f"{where}.source", entry.get("source"))
        for host in hosts:
            before = claimed.add(host, where)
            if before is not None:
                raise fail(PoolListError, path, f"{where}.hosts",
                           f"{host} is listed already in {before}")
        pools.append(Pool(name=name, hosts=tuple(hosts), source=src))
    return PoolList(pools, frozenset(ports), source=source, licence=licence,
                    ports_source=ports_source)


def load(path: str | Path | None = None) -> PoolList:
    """The list from a file; without a path, the packaged list (read once)."""
    if path is None:
        return _packaged()
    return parse(read_text(PoolListError, path), path)


@functools.cache
def _packaged() -> PoolList:
    return parse(read_text(PoolListError, DEFAULT_PATH), DEFAULT_PATH)


def mining_shaped(flow: FlowRecord) -> bool:
    """Do the flow's totals look like a miner talking to its pool (see the bounds above)?"""
    if flow.end is None or flow.app not in SHAPE_APPS:
        return False
    duration_s = (flow.end - flow.start) / 1_000_000
    if duration_s < MIN_DURATION_S:
        return False
    minutes = duration_s / 60
    for size, packets in ((flow.bytes_out, flow.packets_out), (flow.bytes_in, flow.packets_in)):
        if packets < MIN_PACKETS_PER_MIN * minutes:
            return False
        if size >= MAX_BYTES_PER_MIN * minutes or size >= MAX_MEAN_PACKET * packets:
            return False
    return True


class MiningPool:
    name = "mining-pool"
    steps = frozenset({Step.START, Step.GATE, Step.END})  # names at start and gate; shape at end
    window = Window(packets=8, bytes=16384)               # enough for a ClientHello and its SNI

    def __init__(self, pools: PoolList | None = None):
        self.pools = pools if pools is not None else load()

    def inspect(self, flow: FlowRecord, ctx: Context):
        if ctx.step is Step.END:
            if flow.proto == "tcp" and flow.dport in self.pools.ports and mining_shaped(flow):
                return [Finding.make("mining-pool", name=None, port=flow.dport,
                                     reason="mining-port-and-shape")]
            return []
        for name in flow_names(flow, (b.name for b in ctx.names)):  # the first listed one
            if self.pools.lookup(name) is not None:
                return [Finding.make("mining-pool", name=name, port=flow.dport,
                                     reason="known-pool")]
        return []
