"""``egress doctor``: what ``egress run`` needs from this host, checked, with a fix for each gap.

Every check is a small function returning a ``Check`` (name, status, detail, fix), status
``ok``, ``warn`` or ``fail``. Kernel features are probed inside a scratch network namespace
this module creates and always deletes (``egdoc<pid><hex>``), so the host's ruleset is never
touched: nftables through libnftables (the same wrapper egress run uses), the inline gate's
NFQUEUE through iptables-nft, an NFLOG bind, the conntrack sysctls. The host's own ruleset is
only read (``list ruleset``), to find other tables whose drop our accept cannot override.

The pure parts (ruleset analysis, mountinfo parsing, pool overlap) take plain data and are
tested on hand-built input; the rest reads the host. KERNEL.md says which facts are quirks of
some kernels; this is where they are detected at run time.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from egress.config import Config

OK, WARN, FAIL = "ok", "warn", "fail"
_RANK = {OK: 0, WARN: 1, FAIL: 2}

TASK_IFACES = "egt+"
"""egress's task interfaces (``egt<hex>``) as iptables and firewalld write a wildcard."""
TASK_IFACES_NFT = "egt*"
"""The same as nft writes it (iptables-nft's ``egt+`` lists as ``"egt*"``)."""
OWN_TABLES = {("inet", "egress"), ("inet", "egress_nat")}
"""Our own tables: never reported as another firewall."""
IPTABLES_TABLES = {"filter", "mangle", "nat", "raw", "security"}
IPTABLES_BUILTIN = {"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"}
CGROUP_ROOT = "/sys/fs/cgroup"
CAP_NET_ADMIN = 12
CLONE_NEWNET = 0x40000000
PROBE_TABLE = "egress_doctor"
TIMEOUT_S = 30


class Check(NamedTuple):
    """One line of the report. ``facts`` carries what was found, for ``--json`` readers."""

    name: str
    status: str
    detail: str
    fix: str = ""
    facts: dict | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail,
                "fix": self.fix, "facts": self.facts or {}}


def worst(checks: list[Check]) -> str:
    return max((c.status for c in checks), key=_RANK.__getitem__, default=OK)


# ====================================================================== pure parts

# ---------------------------------------------------------------- privileges

def capabilities(status_text: str) -> int:
    """CapEff from the text of /proc/PID/status (0 when absent)."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split(":", 1)[1].strip(), 16)
    return 0


def privileges_check(euid: int, cap_eff: int) -> Check:
    admin = bool(cap_eff >> CAP_NET_ADMIN & 1)
    facts = {"euid": euid, "cap_net_admin": admin}
    if euid == 0 and admin:
        return Check("privileges", OK, "root with CAP_NET_ADMIN", facts=facts)
    if admin:
        return Check("privileges", WARN,
                     f"uid {euid} with CAP_NET_ADMIN: the probes run, but egress run needs root",
                     "run egress run as root (sudo)", facts)
    who = "root without CAP_NET_ADMIN (a container dropping capabilities?)" if euid == 0 \
        else f"uid {euid}, not root and without CAP_NET_ADMIN"
    return Check("privileges", FAIL,
                 f"{who}: egress run refuses to start, and the kernel probes below are skipped",
                 "run as root: sudo egress doctor (and sudo egress run ...)", facts)


# ---------------------------------------------------------------- cgroups

@dataclass
class CgroupLayout:
    """Where cgroup2 and the v1 hierarchies are mounted (from /proc/self/mountinfo)."""

    cgroup2: list[str] = field(default_factory=list)
    v1: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """``v2`` (cgroup2 at /sys/fs/cgroup), ``hybrid`` (cgroup2 below it beside v1),
        ``elsewhere`` (cgroup2 only outside /sys/fs/cgroup), ``v1`` or ``none``."""
        if CGROUP_ROOT in self.cgroup2:
            return "v2"
        under = [m for m in self.cgroup2 if m.startswith(CGROUP_ROOT + "/")]
        if under:
            return "hybrid"
        if self.cgroup2:
            return "elsewhere"
        return "v1" if self.v1 else "none"

    @property
    def mount(self) -> str | None:
        """The cgroup2 mount nft can use (at or under /sys/fs/cgroup), else the first."""
        usable = [m for m in self.cgroup2 if m == CGROUP_ROOT or m.startswith(CGROUP_ROOT + "/")]
        return (usable or self.cgroup2 or [None])[0]


def _unescape(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and path[i + 1:i + 4].isdigit() and len(path[i + 1:i + 4]) == 3:
            out.append(chr(int(path[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> CgroupLayout:
    layout = CgroupLayout()
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        fstype, point = right.split()[0], _unescape(fields[4])
        if fstype == "cgroup2":
            layout.cgroup2.append(point)
        elif fstype == "cgroup":
            layout.v1.append(point)
    return layout


def cgroup_check(layout: CgroupLayout) -> Check:
    kind, mount = layout.kind, layout.mount
    facts = {"layout": kind, "cgroup2": mount, "v1": len(layout.v1)}
    if kind == "v2":
        return Check("cgroup", OK, f"cgroup2 only, at {CGROUP_ROOT}: socket cgroupv2 paths are "
                                   "the cgroup's own (egress/t1)", facts=facts)
    if kind == "hybrid":
        rel = os.path.relpath(mount, CGROUP_ROOT)
        return Check("cgroup", WARN,
                     f"hybrid: {len(layout.v1)} v1 hierarchies under {CGROUP_ROOT}, cgroup2 at "
                     f"{mount}; nft resolves socket cgroupv2 paths under {CGROUP_ROOT}, so "
                     f"egress writes them as {rel}/... (a v1 path would load and never match)",
                     "nothing for egress run (it matches by interface); for uid/cgroup matches "
                     "name cgroups by their cgroup2 path; pure cgroup2: boot with "
                     "systemd.unified_cgroup_hierarchy=1", facts)
    if kind == "elsewhere":
        return Check("cgroup", WARN,
                     f"cgroup2 mounted at {mount}, outside {CGROUP_ROOT} where nft resolves "
                     "socket cgroupv2 paths: cgroup matches cannot load",
                     f"mount cgroup2 at {CGROUP_ROOT} (or {CGROUP_ROOT}/unified)", facts)
    what = "only cgroup v1 mounted" if kind == "v1" else "no cgroup mounted in this mount " \
        "namespace (ip netns exec remounts /sys and hides /sys/fs/cgroup)"
    return Check("cgroup", WARN, f"{what}: cgroup matches (socket cgroupv2) are unavailable; "
                                 "egress run itself matches by interface",
                 f"run from the host's mount namespace (nsenter --net=, not ip netns exec), "
                 f"or mount cgroup2 at {CGROUP_ROOT}", facts)


# ---------------------------------------------------------------- other firewalls

@dataclass(frozen=True)
class Blocker:
    """A base chain of another table that drops what our table accepts."""

    family: str
    table: str
    chain: str
    hook: str
    why: str                    # "policy drop", or the final rule's verdict
    kind: str                   # docker, firewalld, iptables, nft
    passes_tasks: bool = False  # already lets egt* through (a fix is in place)

    @property
    def where(self) -> str:
        return f"table {self.family} {self.table} chain {self.chain}"


def _objects(ruleset: dict, kind: str) -> list[dict]:
    return [o[kind] for o in ruleset.get("nftables", []) if isinstance(o, dict) and kind in o]


_QUIET = {"counter", "log", "limit", "comment"}


def _final_verdict(rule: dict) -> str | None:
    """``drop`` or ``reject`` when the rule drops everything (no match before its verdict)."""
    expr = rule.get("expr") or []
    if not expr:
        return None
    *head, last = expr
    if not isinstance(last, dict) or not any(k in last for k in ("drop", "reject")):
        return None
    if all(isinstance(e, dict) and set(e) <= _QUIET for e in head):
        return "drop" if "drop" in last else "reject"
    return None


def _reachable(start: str, rules: list[dict]) -> list[dict]:
    """The rules of chain ``start`` and of every chain it jumps or goes to, in its table."""
    by_chain: dict[str, list[dict]] = {}
    for r in rules:
        by_chain.setdefault(r.get("chain"), []).append(r)
    seen, todo, out = {start}, [start], []
    while todo:
        for r in by_chain.get(todo.pop(), []):
            out.append(r)
            for e in r.get("expr") or []:
                for verb in ("jump", "goto"):
                    target = (e.get(verb) or {}).get("target") if isinstance(e, dict) else None
                    if isinstance(target, str) and target not in seen:
                        seen.add(target)
                        todo.append(target)
    return out


def _passes(rules: list[dict]) -> set[str]:
    """What the rules let through before any drop: ``iifname``/``oifname`` when a rule
    matches egt* and accepts (or jumps on), ``established`` for a plain
    ``ct state established,related accept``."""
    out = set()
    for rule in rules:
        expr = [e for e in rule.get("expr") or [] if isinstance(e, dict)]
        if not any(k in e for e in expr for k in ("accept", "goto", "jump")):
            continue
        matches = [e["match"] for e in expr if isinstance(e.get("match"), dict)]
        for match in matches:
            left, right = match.get("left"), match.get("right")
            if not isinstance(left, dict) or match.get("op", "==") not in ("==", "in"):
                continue
            values = right.get("set", []) if isinstance(right, dict) else \
                right if isinstance(right, list) else [right]
            key = (left.get("meta") or {}).get("key")
            if key in ("iifname", "oifname") and any(
                    isinstance(v, str) and v.startswith("egt") for v in values):
                out.add(key)
            if (left.get("ct") or {}).get("key") == "state" and "established" in values \
                    and len(matches) == 1 and any("accept" in e for e in expr):
                out.add("established")
    return out


def foreign_blockers(ruleset: dict, hooks: tuple[str, ...] = ("forward", "input")) -> list[Blocker]:
    """Base chains of other tables, at ``hooks``, that drop by policy or by a final
    catch-all rule (firewalld's ``reject``): our accept does not override them."""
    chains = _objects(ruleset, "chain")
    rules = _objects(ruleset, "rule")
    by_table: dict[tuple[str, str], list[dict]] = {}
    for r in rules:
        by_table.setdefault((r.get("family"), r.get("table")), []).append(r)
    out = []
    for c in chains:
        family, table, name, hook = c.get("family"), c.get("table"), c.get("name"), c.get("hook")
        if hook not in hooks or (family, table) in OWN_TABLES \
                or family not in ("ip", "ip6", "inet"):
            continue
        own_rules = [r for r in by_table.get((family, table), []) if r.get("chain") == name]
        why = "policy drop" if c.get("policy") == "drop" else None
        if why is None and own_rules:
            final = _final_verdict(own_rules[-1])
            why = f"a final {final} rule" if final else None
        if why is None:
            continue
        table_chains = {x.get("name") for x in chains
                        if (x.get("family"), x.get("table")) == (family, table)}
        if table == "firewalld":
            kind = "firewalld"
        elif family in ("ip", "ip6") and table == "filter" and "DOCKER-USER" in table_chains:
            kind = "docker"
        elif family in ("ip", "ip6") and table in IPTABLES_TABLES and name in IPTABLES_BUILTIN:
            kind = "iptables"
        else:
            kind = "nft"
        through = _passes(_reachable(name, by_table.get((family, table), [])))
        passes = "iifname" in through and (hook == "input" or kind == "firewalld"
                                           or bool({"oifname", "established"} & through))
        out.append(Blocker(family, table, name, hook, why, kind, passes))
    return out


def _fix(b: Blocker) -> str:
    ipt = "ip6tables" if b.family == "ip6" else "iptables"
    if b.kind == "firewalld":
        return (f"firewall-cmd --permanent --zone=trusted --add-interface={TASK_IFACES} && "
                "firewall-cmd --reload")
    if b.kind == "docker" and b.hook == "forward":
        return (f"{ipt} -I DOCKER-USER -i {TASK_IFACES} -j ACCEPT; {ipt} -I DOCKER-USER -o "
                f"{TASK_IFACES} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")
    if b.kind in ("docker", "iptables"):
        if b.hook == "input":
            return "; ".join(f"{ipt} -I {b.chain} -i {TASK_IFACES} -p {p} --dport 53 -j ACCEPT"
                             for p in ("udp", "tcp"))
        return (f"{ipt} -I {b.chain} -i {TASK_IFACES} -j ACCEPT; {ipt} -I {b.chain} -o "
                f"{TASK_IFACES} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")
    at = f"nft insert rule {b.family} {b.table} {b.chain}"
    if b.hook == "input":
        return f"{at} iifname \"{TASK_IFACES_NFT}\" meta l4proto {{ tcp, udp }} th dport 53 accept"
    return (f"{at} iifname \"{TASK_IFACES_NFT}\" accept; {at} oifname \"{TASK_IFACES_NFT}\" "
            "ct state established,related accept")


def firewall_checks(ruleset: dict) -> list[Check]:
    """One line per other table that would drop task traffic (firewalld once), or one ok."""
    blockers = foreign_blockers(ruleset)
    out: list[Check] = []
    firewalld = [b for b in blockers if b.kind == "firewalld"]
    if firewalld or any(t.get("name") == "firewalld" for t in _objects(ruleset, "table")):
        passes = bool(firewalld) and all(b.passes_tasks for b in firewalld)
        facts = {"kind": "firewalld", "chains": [b.where for b in firewalld]}
        if passes:
            out.append(Check("firewall", OK, "firewalld: egt* interfaces are in a zone that "
                                             "lets them through", facts=facts))
        else:
            b = firewalld[0] if firewalld else Blocker("inet", "firewalld", "filter_FORWARD",
                                                      "forward", "its zones", "firewalld")
            out.append(Check("firewall", WARN,
                             "firewalld (table inet firewalld) rejects forwarded and incoming "
                             "traffic of interfaces outside its zones: task traffic and DNS "
                             "to the task resolver would be refused whatever egress allows",
                             _fix(b), facts))
    for b in blockers:
        if b.kind == "firewalld":
            continue
        facts = {"kind": b.kind, "family": b.family, "table": b.table, "chain": b.chain,
                 "hook": b.hook, "why": b.why, "passes_tasks": b.passes_tasks}
        owner = {"docker": "Docker's ", "iptables": "iptables' "}.get(b.kind, "")
        if b.passes_tasks:
            out.append(Check("firewall", OK, f"{owner}{b.where} (hook {b.hook}, {b.why}) "
                                             f"already lets {TASK_IFACES_NFT} through",
                             facts=facts))
            continue
        what = "task traffic" if b.hook == "forward" else "DNS to the task resolver"
        out.append(Check("firewall", WARN,
                         f"{owner}{b.where} (hook {b.hook}) has {b.why}: it drops {what} "
                         "that egress allows (an accept in our table does not override a drop "
                         "in another)", _fix(b), facts))
    if not out:
        tables = sorted(f"{t.get('family')} {t.get('name')}" for t in _objects(ruleset, "table")
                        if (t.get("family"), t.get("name")) not in OWN_TABLES)
        out.append(Check("firewall", OK, "no other table drops forwarded or incoming traffic"
                         + (f" (tables: {', '.join(tables)})" if tables else " (no other tables)"),
                         facts={"tables": tables}))
    return out


# ---------------------------------------------------------------- address pools

def route_networks(routes: list[dict]) -> list:
    """The destinations of ``ip -j route`` entries, less defaults and egress's own task
    links (``dev egt...``, routes of live runs)."""
    out = []
    for r in routes:
        dst = r.get("dst")
        if not isinstance(dst, str) or dst == "default" or str(r.get("dev", "")).startswith("egt"):
            continue
        with contextlib.suppress(ValueError):
            out.append(ipaddress.ip_network(dst, strict=False))
    return out


def pool_check(name: str, pool: str, routes: list[dict]) -> Check:
    """The pool against the host's routes: free (ok), partly taken (warn: egress skips the
    subnets those routes cover), or wholly taken (fail: no task network can be made)."""
    net = ipaddress.ip_network(pool)
    hits = sorted({r for r in route_networks(routes)
                   if r.version == net.version and r.overlaps(net)},
                  key=lambda r: (r.network_address, r.prefixlen))
    pieces = ipaddress.collapse_addresses(r if r.subnet_of(net) else net for r in hits)
    covered = sum(p.num_addresses for p in pieces)
    facts = {"pool": pool, "overlaps": [str(r) for r in hits]}
    key = f"pools.ipv{net.version}"
    if not hits:
        return Check(name, OK, f"{pool} overlaps no route of this host", facts=facts)
    listed = ", ".join(map(str, hits[:5])) + (f" and {len(hits) - 5} more" if len(hits) > 5 else "")
    if covered >= net.num_addresses:
        return Check(name, FAIL, f"{pool} is covered by the host's routes ({listed}): no task "
                                 "network can be carved from it",
                     f"set {key} in /etc/egress/config.toml to a free range", facts)
    return Check(name, WARN, f"{pool} overlaps routes of this host ({listed}): egress skips the "
                             "subnets they cover, but task addresses may look like those networks",
                 f"set {key} in /etc/egress/config.toml to a range no route uses", facts)


# ---------------------------------------------------------------- forwarding

def ipv6_forwarding_check(proc_sys: str = "/proc/sys") -> Check:
    conf = Path(proc_sys) / "net/ipv6/conf"
    if not conf.exists():
        return Check("ipv6-forwarding", WARN, "IPv6 is disabled on this host: tasks get an "
                                              "IPv6 address egress cannot route",
                     "enable IPv6 (ipv6.disable=0), or expect IPv4 only", {"mode": "none"})
    force = sorted(glob.glob(str(conf / "*" / "force_forwarding")))
    if force:
        return Check("ipv6-forwarding", OK, "force_forwarding present (Linux 6.17+): egress "
                                            "forwards IPv6 per interface, RA handling untouched",
                     facts={"mode": "per-interface"})
    return Check("ipv6-forwarding", WARN,
                 "no force_forwarding (kernel before 6.17): while tasks run egress turns on "
                 "global IPv6 forwarding (all.forwarding=1), with accept_ra=2 on the uplink so "
                 "it keeps its router advertisements",
                 "nothing to do; Linux 6.17+ forwards per interface", {"mode": "global"})


def ipv4_forwarding_check(proc_sys: str = "/proc/sys") -> Check:
    path = Path(proc_sys) / "net/ipv4/ip_forward"
    try:
        value = path.read_text().strip()
    except OSError:
        return Check("ipv4-forwarding", FAIL, "no IPv4 stack (net.ipv4.ip_forward missing)",
                     "a kernel with IPv4", {"ip_forward": None})
    state = "on" if value == "1" else "off"
    return Check("ipv4-forwarding", OK,
                 f"net.ipv4.ip_forward={value} (global {state}); egress enables forwarding only "
                 "on the task's veth and the uplink, and restores it",
                 facts={"ip_forward": value})


# ====================================================================== host probes

TOOLS = {"ip": ("iproute2", FAIL, "makes the task's namespace and links"),
         "nft": ("nftables", FAIL, "loads the NAT table"),
         "nsenter": ("util-linux", FAIL, "configures the task's namespace"),
         "iptables-nft": ("iptables", WARN, "loads the inline gate where nft has no queue"),
         "unshare": ("util-linux", WARN, "the lab and manual checks"),
         "setpriv": ("util-linux", WARN, "the lab and manual checks"),
         "useradd": ("passwd", WARN, "creates the task user on first use")}
"""Command -> (Debian package, status when missing, what egress uses it for)."""


def which(tool: str) -> str | None:
    """On PATH, or in the sbin directories sudo's PATH may lack."""
    found = shutil.which(tool)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        if os.access(f"{d}/{tool}", os.X_OK):
            return f"{d}/{tool}"
    return None


def tools_check(find: Callable[[str], str | None] = which, task_user_exists: bool = False) -> Check:
    missing = {t: spec for t, spec in TOOLS.items() if not find(t)}
    if task_user_exists:
        missing.pop("useradd", None)
    facts = {"missing": sorted(missing)}
    if not missing:
        return Check("tools", OK, ", ".join(TOOLS), facts=facts)
    status = max((s for _p, s, _w in missing.values()), key=_RANK.__getitem__)
    detail = "missing: " + "; ".join(f"{t} ({w})" for t, (_p, _s, w) in missing.items())
    packages = sorted({p for p, _s, _w in missing.values()})
    return Check("tools", status, detail, f"apt-get install {' '.join(packages)}", facts)


def _task_user_exists() -> bool:
    import pwd
    from egress.enforce.sandbox import DEFAULT_USER
    try:
        pwd.getpwnam(DEFAULT_USER)
        return True
    except KeyError:
        return False


def _run(*cmd: str, input: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, input=input,
                              timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(list(cmd), 127, "", str(e))


def _err(done: subprocess.CompletedProcess) -> str:
    return " ".join((done.stderr or done.stdout or f"exit status {done.returncode}").split())


class ScratchNetns:
    """A network namespace made for the probes (``egdoc<pid><hex>``), always deleted."""

    def __init__(self):
        self.name = f"egdoc{os.getpid()}{secrets.token_hex(3)}"
        self.error: str | None = None
        self.removed = False

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def __enter__(self) -> "ScratchNetns":
        done = _run("ip", "netns", "add", self.name)
        if done.returncode != 0:     # ip removes what it half-made; the name may be another's
            self.error = _err(done)
        return self

    def __exit__(self, *exc) -> None:
        if self.error is None:
            self._delete()

    def _delete(self) -> None:
        done = _run("ip", "netns", "delete", self.name)
        self.removed = done.returncode == 0 or not os.path.exists(self.path)

    def exec(self, *cmd: str, input: str | None = None) -> subprocess.CompletedProcess:
        return _run("ip", "netns", "exec", self.name, *cmd, input=input)


def in_netns(path: str, fn: Callable):
    """Run ``fn`` in a thread that entered the network namespace at ``path`` (setns changes
    the calling thread only; the mount namespace stays ours, so nft sees /sys/fs/cgroup)."""
    out: dict = {}

    def body():
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            out["error"] = e
            return
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                out["error"] = OSError(err, f"setns {path}: {os.strerror(err)}")
                return
        finally:
            os.close(fd)
        try:
            out["value"] = fn()
        except BaseException as e:       # handed to the caller's thread
            out["error"] = e

    thread = threading.Thread(target=body, name="egress-doctor-probe")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


@dataclass
class Probes:
    """What the scratch namespace showed."""

    nft_error: str | None = None          # libnftables could not load, or the table failed
    features: dict[str, str | None] = field(default_factory=dict)   # feature -> error or None
    removed: bool = False
    nflog: str | None = "not tried"       # None: bound
    conntrack: dict[str, str | None] = field(default_factory=dict)  # sysctl -> value or None
    xt_nfqueue: dict[str, str | None] = field(default_factory=dict)  # family -> error or None


FEATURES = ("set with timeouts", "ct state", "ct mark", "log group", "reject with tcp reset",
            "masquerade")
"""What egress's ruleset uses; each is loaded alone so a refusal names the missing one."""
KERNEL_OPTION = {"inet table": "CONFIG_NF_TABLES, CONFIG_NF_TABLES_INET",
                 "set with timeouts": "CONFIG_NF_TABLES_SET",
                 "ct state": "CONFIG_NFT_CT", "ct mark": "CONFIG_NFT_CT, CONFIG_NF_CONNTRACK_MARK",
                 "log group": "CONFIG_NFT_LOG, CONFIG_NETFILTER_NETLINK_LOG",
                 "reject with tcp reset": "CONFIG_NFT_REJECT, CONFIG_NFT_REJECT_INET",
                 "masquerade": "CONFIG_NFT_NAT, CONFIG_NFT_MASQ",
                 "socket cgroupv2": "CONFIG_NFT_SOCKET, CONFIG_SOCK_CGROUP_DATA",
                 "queue": "CONFIG_NFT_QUEUE",
                 "NFQUEUE": "CONFIG_NFT_COMPAT, CONFIG_NETFILTER_XT_TARGET_NFQUEUE"}


def _probe_rules(cfg: Config, cgroup: tuple[int, str] | None) -> dict[str, str]:
    t = f"inet {PROBE_TABLE}"
    mask = cfg.netfilter.mark_mask
    bit = mask & -mask
    group = cfg.netfilter.log_group
    rules = {
        "set with timeouts": f"add set {t} s4 {{ type ipv4_addr; flags timeout; }}\n"
                             f"add element {t} s4 {{ 192.0.2.1 timeout 30s }}",
        "ct state": f"add rule {t} forward_filter ct state established,related accept",
        "ct mark": f"add rule {t} forward_filter meta mark & {mask:#010x} == {bit:#010x} "
                   f"ct mark set ct mark | {bit:#010x}\n"
                   f"add rule {t} forward_filter ct mark & {mask:#010x} == {bit:#010x} accept",
        "log group": f"add rule {t} forward_filter ct original packets < 3 log group {group} "
                     "snaplen 256 queue-threshold 16",
        "reject with tcp reset": f"add rule {t} forward_filter meta l4proto tcp "
                                 "reject with tcp reset",
        "masquerade": f"add rule {t} postrouting ip saddr {cfg.pools.ipv4} masquerade",
        "queue": f"add rule {t} gate queue num {cfg.netfilter.queue}",
    }
    if cgroup is not None:
        level, path = cgroup
        rules["socket cgroupv2"] = (f"add rule {t} output_filter socket cgroupv2 level {level} "
                                    f"\"{path}\" accept")
    return rules


_CHAINS = {"forward_filter": "filter hook forward priority 0",
           "output_filter": "filter hook output priority 0",
           "gate": "filter hook forward priority 10",
           "postrouting": "nat hook postrouting priority srcnat"}
PROBE_BASE = f"add table inet {PROBE_TABLE}\n" + "".join(
    f"add chain inet {PROBE_TABLE} {name} {{ type {spec}; policy accept; }}\n"
    for name, spec in _CHAINS.items())


def probe_cgroup(layout: CgroupLayout, self_cgroup: str) -> tuple[int, str] | None:
    """(level, path) of this process's own cgroup as nft's ``socket cgroupv2`` wants it
    (relative to /sys/fs/cgroup), or None when there is no path to name."""
    mount = layout.mount
    if mount is None or not (mount == CGROUP_ROOT or mount.startswith(CGROUP_ROOT + "/")):
        return None
    own = next((ln.split("::", 1)[1] for ln in self_cgroup.splitlines()
                if ln.startswith("0::")), None)
    if own is None:
        return None
    parts = [p for p in own.split("/") if p]
    rel = os.path.relpath(mount, CGROUP_ROOT)
    path = "/".join(([rel] if rel != "." else []) + parts)
    return (len(parts), path) if path else None


def _scratch_probes(cfg: Config, cgroup: tuple[int, str] | None) -> Probes:
    """Runs in a thread inside the scratch namespace."""
    from egress.enforce.nft import Nft, NftError
    got = Probes()
    try:
        nft = Nft()
    except NftError as e:
        got.nft_error = str(e)
        return got
    try:
        try:
            nft.run(PROBE_BASE)
        except NftError as e:
            got.nft_error = f"inet table: {e}"
            return got
        for name, text in _probe_rules(cfg, cgroup).items():
            try:
                nft.run(text)
                got.features[name] = None
            except NftError as e:
                got.features[name] = str(e)
        for name in ("nf_conntrack_acct", "nf_conntrack_timestamp"):
            try:
                got.conntrack[name] = Path(f"/proc/sys/net/netfilter/{name}").read_text().strip()
            except OSError:
                got.conntrack[name] = None
        try:
            from egress.enforce.nflog import NflogReader
            NflogReader(cfg.netfilter.log_group).close()
            got.nflog = None
        except (OSError, TimeoutError) as e:
            got.nflog = str(e)
        try:
            nft.run(f"delete table inet {PROBE_TABLE}")
            got.removed = True
        except NftError:
            got.removed = False
    finally:
        nft.close()
    return got


def _xt_nfqueue(ns: ScratchNetns, queue: int) -> dict[str, str | None]:
    """The gate's iptables-nft form, per family: a user chain in mangle with -j NFQUEUE."""
    out: dict[str, str | None] = {}
    for family, tool in (("ipv4", "iptables-nft"), ("ipv6", "ip6tables-nft")):
        if not which(tool):
            out[family] = f"{tool} not found"
            continue
        done = ns.exec(tool, "-t", "mangle", "-N", "EGRESS-DOCTOR")
        if done.returncode == 0:
            done = ns.exec(tool, "-t", "mangle", "-A", "EGRESS-DOCTOR", "-j", "NFQUEUE",
                           "--queue-num", str(queue))
        out[family] = None if done.returncode == 0 else _err(done)
        ns.exec(tool, "-t", "mangle", "-F", "EGRESS-DOCTOR")
        ns.exec(tool, "-t", "mangle", "-X", "EGRESS-DOCTOR")
    return out


def _short(error: str) -> str:
    """nft's one-line error without the echoed command."""
    return error.split(": add ")[0].split(": delete ")[0]


def nftables_check(p: Probes) -> Check:
    facts = {"features": {k: v is None for k, v in p.features.items()
                          if k in FEATURES}, "removed": p.removed}
    if p.nft_error:
        return Check("nftables", FAIL, p.nft_error,
                     "install nftables and libnftables1; a kernel with "
                     + KERNEL_OPTION["inet table"], facts)
    refused = [k for k in FEATURES if p.features.get(k)]
    if refused:
        return Check("nftables", FAIL,
                     "refused in a scratch namespace: " + "; ".join(
                         f"{k}: {_short(p.features[k])}" for k in refused),
                     "a kernel with " + ", ".join(KERNEL_OPTION[k] for k in refused)
                     + " (or modprobe the matching nft_* modules)", facts)
    loaded = ", ".join(FEATURES)
    if not p.removed:
        return Check("nftables", WARN, f"loaded ({loaded}) but the scratch table did not "
                                       "delete; the scratch namespace was deleted with it",
                     "", facts)
    return Check("nftables", OK, f"libnftables loads; a scratch namespace took an inet table "
                                 f"with {loaded}, then deleted it", facts=facts)


def socket_cgroup_check(p: Probes, cgroup: tuple[int, str] | None) -> Check:
    if cgroup is None:
        return Check("socket-cgroupv2", WARN, "not probed: no cgroup2 path under "
                                              f"{CGROUP_ROOT} to name (see cgroup)",
                     "only uid/cgroup task matches need it; egress run matches by interface",
                     {"loads": None})
    error = p.features.get("socket cgroupv2", "not tried")
    level, path = cgroup
    if error is None:
        return Check("socket-cgroupv2", OK, f"socket cgroupv2 level {level} \"{path}\" loads",
                     facts={"loads": True})
    return Check("socket-cgroupv2", WARN, f"socket cgroupv2 refused: {_short(error)}",
                 "only uid/cgroup task matches need it; a kernel with "
                 + KERNEL_OPTION["socket cgroupv2"], {"loads": False})


def gate_check(p: Probes, queue: int) -> Check:
    nft_error = p.features.get("queue", "not tried")
    nft_queue = nft_error is None
    xt = p.xt_nfqueue
    xt_ok = [f for f, e in xt.items() if e is None]
    facts = {"nft_queue": nft_queue, "nft_queue_error": None if nft_queue else _short(nft_error),
             "iptables_nfqueue": {f: e is None for f, e in xt.items()},
             "path": "nft queue" if nft_queue else ("iptables-nft" if xt_ok else None)}
    xt_text = (", ".join(f"{f} {'loads' if e is None else 'refused: ' + e}"
                         for f, e in xt.items()) or "not tried")
    if nft_queue:
        return Check("inline-gate", OK, f"nft queue num {queue} loads: the gate uses nft queue "
                                        f"(iptables-nft -j NFQUEUE: {xt_text})", facts=facts)
    absent = f"nft queue statement absent ({_short(nft_error)})"
    if len(xt_ok) == len(xt) == 2:
        return Check("inline-gate", OK, f"{absent}; the gate uses iptables-nft -j NFQUEUE "
                                        f"--queue-num {queue} in a mangle chain of ours: "
                                        f"{xt_text}", facts=facts)
    if xt_ok:
        return Check("inline-gate", WARN, f"{absent}; iptables-nft -j NFQUEUE: {xt_text}: "
                                          "enforce mode is gated for " + " and ".join(xt_ok)
                                          + " only",
                     "apt-get install iptables; a kernel with " + KERNEL_OPTION["NFQUEUE"], facts)
    return Check("inline-gate", FAIL, f"{absent}, and iptables-nft -j NFQUEUE: {xt_text}: "
                                      "no inline gate for enforce mode",
                 "a kernel with " + KERNEL_OPTION["queue"] + " or " + KERNEL_OPTION["NFQUEUE"]
                 + "; apt-get install iptables", facts)


def nflog_check(p: Probes, group: int) -> Check:
    rule = p.features.get("log group", "not tried")
    facts = {"rule": rule is None, "bind": p.nflog is None, "group": group}
    if rule is None and p.nflog is None:
        return Check("nflog", OK, f"a log group {group} rule loads and a netlink reader binds "
                                  f"group {group} (in the scratch namespace)", facts=facts)
    problems = ([f"rule refused: {_short(rule)}"] if rule else []) + \
        ([f"bind failed: {p.nflog}"] if p.nflog else [])
    return Check("nflog", FAIL, "; ".join(problems) + ": flows rejected before conntrack "
                                                      "confirms them would leave no record",
                 "a kernel with " + KERNEL_OPTION["log group"]
                 + " (modprobe nfnetlink_log)", facts)


def conntrack_check(p: Probes) -> Check:
    values = p.conntrack
    facts = {"sysctls": values}
    missing = [k for k, v in values.items() if v is None]
    if not values or missing:
        return Check("conntrack", FAIL,
                     f"missing in a namespace with a ct rule: {', '.join(missing or ['all'])}",
                     "a kernel with CONFIG_NF_CONNTRACK and CONFIG_NF_CONNTRACK_TIMESTAMP",
                     facts)
    now = ", ".join(f"{k}={v}" for k, v in values.items())
    return Check("conntrack", OK, f"present ({now} in a new namespace); they are per network "
                                  "namespace and egress sets both to 1 where it tracks flows",
                 facts=facts)


def _skipped(name: str, why: str) -> Check:
    return Check(name, WARN, f"not checked: {why}", "run as root: sudo egress doctor")


def _host_ruleset() -> dict:
    """The host's ruleset, read only: libnftables, else ``nft -j list ruleset``."""
    try:
        from egress.enforce.nft import Nft
        with Nft() as nft:
            return nft.list_json("ruleset")
    except Exception:                                  # libnftables missing: try the CLI
        done = _run("nft", "-j", "list", "ruleset")
        if done.returncode != 0:
            raise RuntimeError(_err(done))
        return json.loads(done.stdout) if done.stdout.strip() else {"nftables": []}


def _routes(version: int) -> list[dict]:
    done = _run("ip", f"-{version}", "-j", "route", "show", "table", "all")
    if done.returncode != 0:
        raise RuntimeError(_err(done))
    return json.loads(done.stdout or "[]")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


# ====================================================================== all of it

NEEDS_ROOT = ("netns", "nftables", "socket-cgroupv2", "inline-gate", "nflog", "conntrack",
              "firewall")


def host_lookups_check(nsswitch: str, nscd_socket: bool) -> Check:
    """The host agent redirects a task's DNS on port 53 to its resolver; lookups that go
    over a unix socket instead (nss-resolve to systemd-resolved, nscd) are not redirected,
    so such a task's names are neither bound to it nor refused."""
    hosts = next((line.split(":", 1)[1].split() for line in nsswitch.splitlines()
                  if line.strip().startswith("hosts:")), [])
    sources = [word for word in hosts if not word.startswith("[")]
    problems, fixes = [], []
    if "resolve" in sources and ("dns" not in sources
                                 or sources.index("resolve") < sources.index("dns")):
        problems.append("nsswitch.conf looks names up through nss-resolve (systemd-resolved's "
                        "socket) before DNS")
        fixes.append("put dns before resolve on the hosts: line of /etc/nsswitch.conf (or "
                     "remove resolve)")
    if nscd_socket:
        problems.append("nscd answers lookups over /run/nscd/socket")
        fixes.append("turn off nscd's hosts cache (enable-cache hosts no in /etc/nscd.conf)")
    facts = {"hosts": hosts, "nscd": nscd_socket}
    if problems:
        return Check("host-lookups", WARN, "; ".join(problems) + ": the agent cannot bind or "
                     "refuse those names per task (egress run is not affected: its tasks "
                     "see neither)", "; ".join(fixes), facts)
    return Check("host-lookups", OK, f"names are looked up by {' '.join(hosts) or 'default'}: "
                 "a task's DNS goes over port 53, where the agent redirects it", facts=facts)


def run_checks(cfg: Config | None = None) -> list[Check]:
    """Every check, in the order the report shows them."""
    cfg = cfg or Config()
    checks = [privileges_check(os.geteuid(), capabilities(_read("/proc/self/status")))]
    privileged = checks[0].facts["cap_net_admin"]
    checks.append(tools_check(task_user_exists=_task_user_exists()))
    layout = parse_mountinfo(_read("/proc/self/mountinfo"))
    cgroup = probe_cgroup(layout, _read("/proc/self/cgroup"))
    if not privileged:
        checks += [_skipped(n, "needs CAP_NET_ADMIN") for n in NEEDS_ROOT]
    else:
        checks += _namespace_checks(cfg, cgroup)
        try:
            checks += firewall_checks(_host_ruleset())
        except Exception as e:
            checks.append(Check("firewall", WARN, f"cannot read the host's ruleset: {e}",
                                "check by hand: nft list ruleset"))
    checks += [ipv4_forwarding_check(), ipv6_forwarding_check(), cgroup_check(layout),
               host_lookups_check(_read("/etc/nsswitch.conf"),
                                  os.path.exists("/run/nscd/socket"))]
    for version, pool in ((4, cfg.pools.ipv4), (6, cfg.pools.ipv6)):
        try:
            checks.append(pool_check(f"pool-ipv{version}", pool, _routes(version)))
        except (RuntimeError, ValueError) as e:
            checks.append(Check(f"pool-ipv{version}", WARN, f"cannot list routes: {e}",
                                "check by hand: ip route show table all"))
    return checks


def _namespace_checks(cfg: Config, cgroup: tuple[int, str] | None) -> list[Check]:
    with ScratchNetns() as ns:
        if ns.error:
            out = [Check("netns", FAIL, f"cannot make a network namespace: {ns.error}",
                         "run as root on the host (not inside a restricted container); "
                         "a kernel with CONFIG_NET_NS", {"name": ns.name})]
            return out + [Check(n, FAIL, "not checked: no scratch network namespace", "see netns")
                          for n in ("nftables", "inline-gate", "nflog", "conntrack")]
        try:
            probes = in_netns(ns.path, lambda: _scratch_probes(cfg, cgroup))
        except OSError as e:
            probes = Probes(nft_error=f"cannot enter the scratch namespace: {e}")
        probes.xt_nfqueue = _xt_nfqueue(ns, cfg.netfilter.queue)
    netns = (Check("netns", OK, f"made and deleted a scratch network namespace ({ns.name})",
                   facts={"name": ns.name, "removed": True}) if ns.removed else
             Check("netns", FAIL, f"made {ns.name} but could not delete it",
                   f"ip netns delete {ns.name}", {"name": ns.name, "removed": False}))
    if probes.nft_error:
        dead = [Check(n, FAIL, f"not checked: {probes.nft_error}", "see nftables")
                for n in ("nflog", "conntrack")]
        return [netns, nftables_check(probes), socket_cgroup_check(probes, cgroup),
                gate_check(probes, cfg.netfilter.queue), *dead]
    return [netns, nftables_check(probes), socket_cgroup_check(probes, cgroup),
            gate_check(probes, cfg.netfilter.queue), nflog_check(probes, cfg.netfilter.log_group),
            conntrack_check(probes)]


def report(checks: list[Check]) -> dict:
    """The ``--json`` document."""
    return {"status": worst(checks), "kernel": os.uname().release,
            "checks": [c.to_json() for c in checks]}
