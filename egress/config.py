"""Host configuration: ``/etc/egress/config.toml`` or ``--config``; every key optional.

Unknown keys are refused with the file and key named, like manifests.

```toml
database = "postgresql://egress@db.internal/egress"   # default: SQLite, see db.default_url
retention_days = 90                 # records older than this may be pruned

[pools]                             # address pools for task networks
ipv4 = "10.213.0.0/16"              # checked against existing routes before use
ipv6 = "fd65:6772:6573::/48"

[resolver]
upstream = ["192.0.2.53"]           # where the task resolver forwards; default: the host's
min_ttl = 3600                      # seconds a DNS answer binds at least

[netfilter]
queue = 3                           # first NFQUEUE number of the gate (one per run)
log_group = 7                       # first NFLOG group (two per run: packets, refusals)
mark_mask = 0x00f00000              # the packet and ct mark bits egress may use (4 bits)
priority = -180                     # base nft priority of our enforcing chains
first_packets = 64                  # packets a flow direction logged whole; default: 64

[ledger]                            # each also an environment variable, which wins
key = "/var/lib/egress/ledger.key"  # EGRESS_LEDGER_KEY: the host secret (0600)
host_id = "web-1"                   # EGRESS_HOST_ID: this host's chain; default: host name
checkpoints = "/mnt/audit/egress-checkpoints.jsonl"   # EGRESS_CHECKPOINTS: appended to
checkpoint_interval = 300           # EGRESS_CHECKPOINT_INTERVAL: seconds, live writers
syslog = "/dev/log"                 # EGRESS_SYSLOG: where checkpoints go to syslog
```
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from egress.names import DEFAULT_MIN_TTL_S

DEFAULT_PATH = Path("/etc/egress/config.toml")


class ConfigError(ValueError):
    """``FILE: KEY: problem``."""


@dataclass(frozen=True)
class Pools:
    ipv4: str = "10.213.0.0/16"
    """IPv4 pool task networks are carved from (a /30 each)."""
    ipv6: str = "fd65:6772:6573::/48"
    """IPv6 ULA pool task networks are carved from (a /64 each)."""


@dataclass(frozen=True)
class Resolver:
    upstream: tuple[str, ...] = ()
    """Addresses the task resolver forwards to; empty means the host's resolv.conf."""
    min_ttl: int = DEFAULT_MIN_TTL_S
    """Seconds a DNS answer binds a name to an address at least."""


@dataclass(frozen=True)
class Netfilter:
    queue: int = 3
    """NFQUEUE number of the inline gate."""
    log_group: int = 7
    """NFLOG group that carries first packets and DNS."""
    mark_mask: int = 0x00F00000
    """Mark bits egress owns; other tools (Docker, Cilium, ...) use other bits."""
    priority: int = -180
    """Base priority of our enforcing nft chains: after conntrack (-200), before the
    gate in mangle (-150); the recorder's chain runs just before them."""
    first_packets: int | None = None
    """Packets of each flow and direction logged whole (NFLOG); None: the window the
    detectors declare (64). Fewer costs less and identifies less; watched flows are
    followed past it, headers only."""


@dataclass(frozen=True)
class Ledger:
    """Where the ledger's key and checkpoints are (db.ledgerkeys, db.checkpoints read them
    from the environment; ``environment`` gives them from here where it does not)."""
    key: str | None = None
    host_id: str | None = None
    checkpoints: str | None = None
    checkpoint_interval: int | None = None
    syslog: str | None = None

    ENV = {"key": "EGRESS_LEDGER_KEY", "host_id": "EGRESS_HOST_ID",
           "checkpoints": "EGRESS_CHECKPOINTS",
           "checkpoint_interval": "EGRESS_CHECKPOINT_INTERVAL", "syslog": "EGRESS_SYSLOG"}

    def environment(self, env: dict) -> dict:
        """The variables this sets that ``env`` does not already have."""
        return {var: str(getattr(self, key)) for key, var in self.ENV.items()
                if getattr(self, key) is not None and not env.get(var)}


@dataclass(frozen=True)
class Config:
    database: str | None = None
    """The store's URL; None means the default (see db.default_url)."""
    retention_days: int | None = None
    """Days records are kept before ``prune`` may remove them; None keeps them."""
    pools: Pools = field(default_factory=Pools)
    resolver: Resolver = field(default_factory=Resolver)
    netfilter: Netfilter = field(default_factory=Netfilter)
    ledger: Ledger = field(default_factory=Ledger)
    source: str | None = None
    """The file it was read from; None for the built-in defaults."""


def load(path: str | Path | None = None) -> Config:
    """Read ``path``, or the default file when it exists; defaults otherwise."""
    explicit = path is not None
    path = Path(path) if explicit else DEFAULT_PATH
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: no such file") from None
        return Config()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse(raw, str(path))


def parse(raw: bytes, source: str = "<config>") -> Config:
    def fail(key: str | None, problem: str):
        raise ConfigError(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")

    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        fail(None, f"not valid TOML: {e}")

    def keys(table: dict, allowed: tuple, prefix: str = ""):
        for key in table:
            if key not in allowed:
                fail(prefix + key, f"unknown key (expected one of {', '.join(allowed)})")

    def integer(table, key, prefix, lo, hi):
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            fail(prefix + key, f"{value!r} is not a whole number from {lo} to {hi}")
        return value

    def section(name: str, allowed: tuple) -> dict:
        table = data.get(name, {})
        if not isinstance(table, dict):
            fail(name, "expected a table")
        keys(table, allowed, name + ".")
        return table

    keys(data, ("database", "retention_days", "pools", "resolver", "netfilter", "ledger"))
    out: dict = {"source": source}
    if "database" in data:
        if not isinstance(data["database"], str) or not data["database"]:
            fail("database", "expected a database URL or SQLite path")
        out["database"] = data["database"]
    if "retention_days" in data:
        out["retention_days"] = integer(data, "retention_days", "", 1, 36500)

    pools = section("pools", ("ipv4", "ipv6"))
    for key, version in (("ipv4", 4), ("ipv6", 6)):
        if key in pools:
            try:
                net = ipaddress.ip_network(pools[key], strict=True)
            except (ValueError, TypeError) as e:
                fail(f"pools.{key}", str(e))
            if net.version != version:
                fail(f"pools.{key}", f"{net} is not an IPv{version} network")
    out["pools"] = Pools(**pools)

    resolver = section("resolver", ("upstream", "min_ttl"))
    upstream = resolver.get("upstream", [])
    if not isinstance(upstream, list):
        fail("resolver.upstream", "expected a list of addresses")
    for i, address in enumerate(upstream):
        try:
            ipaddress.ip_address(address)
        except (ValueError, TypeError):
            fail(f"resolver.upstream[{i}]", f"{address!r} is not an IP address")
    min_ttl = integer(resolver, "min_ttl", "resolver.", 0, 86400) if "min_ttl" in resolver \
        else DEFAULT_MIN_TTL_S
    out["resolver"] = Resolver(upstream=tuple(upstream), min_ttl=min_ttl)

    nf = section("netfilter", ("queue", "log_group", "mark_mask", "priority", "first_packets"))
    checked = {}
    for key, lo, hi in (("queue", 0, 65535), ("log_group", 0, 65535),
                        ("mark_mask", 1, 0xFFFFFFFF), ("priority", -400, 400),
                        ("first_packets", 8, 4096)):
        if key in nf:
            checked[key] = integer(nf, key, "netfilter.", lo, hi)
    out["netfilter"] = Netfilter(**checked)

    ledger = section("ledger", tuple(Ledger.ENV))
    for key, value in ledger.items():
        if key == "checkpoint_interval":
            integer(ledger, key, "ledger.", 1, 86400)
        elif not isinstance(value, str) or not value:
            fail(f"ledger.{key}", "expected a non-empty string")
    out["ledger"] = Ledger(**ledger)
    return Config(**out)
