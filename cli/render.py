"""Rendering with rich: colour on a terminal, plain text otherwise or with NO_COLOR."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

from rich.console import Console
from rich.table import Table
from rich import box
from rich.markup import escape
from rich.text import Text

from egress.exports import jsonl
from egress.records import FlowRecord, NameBinding, TaskEvent, format_time
from tagging.manifest import Purpose
from tagging.profiles import Profile

VERDICT_STYLE = {"allow": "green", "flag": "yellow", "block": "bold red"}
SEVERITY_STYLE = {"info": "dim", "low": "cyan", "medium": "yellow", "high": "red",
                  "critical": "bold red"}


def console(stderr: bool = False) -> Console:
    plain = os.environ.get("NO_COLOR") is not None or not (sys.stderr if stderr else sys.stdout).isatty()
    return Console(stderr=stderr, no_color=plain, highlight=False, soft_wrap=plain,
                   width=None if not plain else 200)


class _Table(Table):
    """A table whose plain-string cells are text, never markup (names come from traffic)."""

    def add_row(self, *cells, **kw):
        super().add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **kw)


def _table(con: Console, *columns: str) -> Table:
    fancy = not con.no_color
    table = _Table(box=box.SIMPLE_HEAD if fancy else None, show_edge=False,
                   pad_edge=False, header_style="bold" if fancy else "")
    for c in columns:
        table.add_column(c, overflow="fold")
    return table


def short_time(us: int | None) -> str:
    return "-" if us is None else format_time(us)[:19].replace("T", " ") + "Z"


def endpoint(address: str, port: int | None) -> str:
    host = f"[{address}]" if ":" in address else address
    return host if port is None else f"{host}:{port}"


def styled(text: str, style: str | None) -> str:
    """Markup for ``text`` in ``style``; the text is escaped (names come from traffic)."""
    return f"[{style}]{escape(text)}[/]" if style else escape(text)


json_line = jsonl.line
"""One record as the contract's compact JSON (egress.exports.jsonl)."""


# ---------------------------------------------------------------- purposes

def purpose(con: Console, p: Purpose, mode) -> None:
    con.print(escape(f"{p.source}: ok (sha256 {p.sha256})"))
    con.print(escape(f"purpose:  {p.purpose}"))
    con.print(escape(f"task:     {p.task or '-'}"))
    con.print(f"mode:     {mode}")
    con.print(escape(f"profiles: {', '.join(p.profiles) or '-'}"))
    con.print(f"waive:    {', '.join(sorted(p.waive)) or '-'}")
    limits = [f"{k}={v:,}" for k, v in (("bytes_out", p.limits.bytes_out),
                                        ("connections", p.limits.connections)) if v]
    con.print(f"limits:   {', '.join(limits) or '-'}")
    rules(con, p.rules, title=f"{len(p.rules)} effective allow rules")


def rules(con: Console, rs, title: str | None = None) -> None:
    if title:
        con.print(title + ":")
    table = _table(con, "origin", "destination", "transport", "ports", "protocol")
    for r in rs:
        ports = "-" if r.ports is None else ",".join(
            str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in r.ports)
        proto = r.protocol or "by port (" + ", ".join(
            f"{lo}:{r.protocol_for(lo)}" for lo, hi in (r.ports or ()) if lo == hi) + ")"
        table.add_row(r.origin, r.destination(), "/".join(r.transports), ports, proto)
    con.print(table)


def profile_list(con: Console, profiles: list[Profile]) -> None:
    table = _table(con, "profile", "rules", "covers")
    for p in profiles:
        table.add_row(p.name, str(len(p.rules)), p.description)
    con.print(table)


def profile(con: Console, p: Profile) -> None:
    con.print(escape(f"{p.name}: {p.description}"))
    con.print(escape(f"source: {p.source}"))
    rules(con, p.rules)


# ------------------------------------------------------------------- flows

def flows(con: Console, records: list[FlowRecord]) -> None:
    table = _table(con, "start (UTC)", "flow", "task", "proto", "destination", "name",
                   "app", "verdict", "findings")
    for f in records:
        table.add_row(short_time(f.start), f.flow_id, f.task or "-", f.proto,
                      endpoint(f.dst, f.dport), _name(f), f.app or "-", _verdict(f.verdict),
                      _findings(f.findings) if f.findings else "-")
    con.print(table)


def _verdict(verdict) -> Text:
    return Text(str(verdict), style=VERDICT_STYLE.get(str(verdict), ""))


def _findings(findings, kept=()) -> Text:
    """Finding ids by severity; ``(waived)``, and ``(kept)`` for those in ``kept``."""
    return Text(" ").join(
        Text(x.id + ("(waived)" if x.waived else "") + ("(kept)" if x in kept else ""),
             style="" if x.waived else SEVERITY_STYLE[x.severity]) for x in findings)


def _name(f: FlowRecord) -> str:
    """The flow's server name; for a lookup, what it asked (``?pypi.org A``)."""
    if f.server_name:
        return f.server_name
    if f.dns is not None and f.dns.queries:
        q = f.dns.queries[0]
        more = f" +{len(f.dns.queries) - 1}" if len(f.dns.queries) > 1 else ""
        return f"?{q.name} {q.type}{more}"
    return "-"


def events(con: Console, records: list[TaskEvent]) -> None:
    table = _table(con, "time (UTC)", "task", "event", "findings")
    for e in records:
        table.add_row(short_time(e.time), e.task or "-", e.event,
                      " ".join(f.id for f in e.findings) or "-")
    con.print(table)


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _evidence(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_evidence(v)}" for k, v in value.items() if v is not None)
    if isinstance(value, list):
        return "[" + ", ".join(_evidence(v) for v in value) + "]"
    return str(value)


def explain(con: Console, f: FlowRecord, bindings: list[NameBinding]) -> None:
    con.print(f"flow {f.flow_id}  ({f.event})")
    def line(key: str, value: str, markup: str = "") -> None:
        con.print(f"  {key:<13}" + escape(value) + markup)
    line("task", f"{f.task or '- (untagged)'}  mode {f.mode or '-'}")
    line("tuple", f"{f.proto} {endpoint(f.src, f.sport)} -> {endpoint(f.dst, f.dport)}"
         f"  ({f.direction}, IPv{f.ip_version})")
    if f.nat:
        line("nat", endpoint(f.nat.src, f.nat.sport))
    line("community id", f.community_id or "-")
    line("time", f"{format_time(f.start)} .. {format_time(f.end) if f.end else '-'}"
         f"  state {f.conn_state or '-'}  observed {f.observed}")
    if f.weird:
        line("weird", ", ".join(f.weird))
    if f.tunnel:
        line("tunnel", f"{f.tunnel.kind} to {endpoint(f.tunnel.host or '?', f.tunnel.port)}")
    line("app", f.app or "- (no payload)")
    line("name", f"{f.server_name} (from {f.name_source})" if f.server_name else "-")
    for part in ("tls", "http", "ssh", "stratum", "quic"):
        sub = getattr(f, part)
        if sub is not None:
            line(part, _evidence(dataclasses.asdict(sub)))
    if f.dns is not None:
        for q in f.dns.queries:
            line("dns", f"{q.name} {q.type} {q.rcode or '-'} -> {', '.join(q.answers) or '-'}")
    line("traffic", f"out {f.bytes_out:,} B / {f.packets_out:,} pkts, "
                    f"in {f.bytes_in:,} B / {f.packets_in:,} pkts")
    con.print(f"  {'verdict':<13}" + styled(str(f.verdict), VERDICT_STYLE.get(str(f.verdict)))
              + escape(f", decided at {f.decided_at or '-'}; action {f.action or '- (replay)'}"))
    line("rule", f.rule or "- (no allow rule matched)")
    if f.process:
        line("process", _evidence(dataclasses.asdict(f.process)))
    con.print("  findings:" if f.findings else "  findings:    none")
    for x in f.findings:
        tag = " (waived)" if x.waived else ""
        con.print(f"    {styled(x.severity.value, SEVERITY_STYLE[x.severity])} {x.id}{tag}: "
                  + escape(_evidence(_plain(x.evidence))))
    if bindings:
        con.print("  DNS bindings of the destination for this task (latest first):")
        for b in bindings:
            con.print(escape(f"    {b.name} -> {b.address}  at {short_time(b.time)}  ttl {b.ttl}s"
                             f"  (dns flow {b.flow_id or '-'})"))
    else:
        con.print("  DNS bindings: none (no answer gave the task this address)")


@contextlib.contextmanager
def progress(enabled: bool = True):
    """A progress line on a terminal (stderr) while a replay runs; yields a wrapper for items."""
    if not enabled or not sys.stderr.isatty() or os.environ.get("NO_COLOR") is not None:
        yield lambda items: items
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    bar = Progress(SpinnerColumn(), TextColumn("replaying: {task.completed:,} flows judged"),
                   TimeElapsedColumn(), console=console(stderr=True), transient=True)

    def wrap(items):
        job = bar.add_task("replay", total=None)
        for n, item in enumerate(items, 1):
            if n % 500 == 0:
                bar.update(job, completed=n)
            yield item

    with bar:
        yield wrap


def input_warnings(con: Console, counters: dict) -> None:
    """What the inputs lost or skipped, one line each (nothing lost silently)."""
    if counters.get("snapped"):
        con.print(f"warning: {counters['snapped']:,} packet(s) cut short by the capture's snap "
                  "length: payload past it was not seen")
    for path, where in sorted(counters.get("truncated", {}).items()):
        con.print(escape(f"warning: {path}: {where}; packets before it were read"))
    for reason, n in sorted(counters.get("malformed", {}).items()):
        con.print(escape(f"skipped {n:,} malformed packet(s): {reason}"))
    for reason, n in sorted(counters.get("skipped", {}).items()):
        con.print(escape(f"skipped {n:,} input record(s): {reason}"))


def replay_summary(con: Console, result, counters: dict) -> None:
    table = _table(con, "task", "flows", "bytes out", "bytes in", "allow", "flag", "block",
                   "critical", "high", "medium", "low")
    for t in sorted(result.tasks.values(), key=lambda s: (s.task is None, s.task or "")):
        v, s = t.verdicts, t.severities
        table.add_row(t.task or "(untagged)", f"{t.flows:,}", f"{t.bytes_out:,}", f"{t.bytes_in:,}",
                      str(v["allow"]), Text(str(v["flag"]), style="yellow" if v["flag"] else ""),
                      Text(str(v["block"]), style="bold red" if v["block"] else ""),
                      str(s["critical"]), str(s["high"]), str(s["medium"]), str(s["low"]))
    con.print(table)
    for t in result.tasks.values():
        if t.findings:
            con.print(escape(f"{t.task or '(untagged)'}: " + ", ".join(
                f"{fid} x{n}" for fid, n in t.findings.most_common())))
    if "packets" in counters:
        not_ip = sum(counters["not_ip"].values())
        con.print(f"{counters['packets']:,} packets, {counters['decoded']:,} decoded"
                  + (f", {not_ip:,} not IP" if not_ip else ""))
    for why, n in sorted(getattr(result, "unbound", {}).items()):
        con.print(escape(f"{n:,} DNS answer(s) bound no name: {why}"))
    input_warnings(con, counters)


def run_summary(con: Console, task: str, mode, result) -> None:
    """The task's egress at the end of ``egress run``: flows, resolver, findings."""
    if result.flows is not None:
        replay_summary(con, result.flows, {})
    r = result.resolver
    con.print(escape(f"task {task} ({mode}): command exited {result.command_status}; "
                     f"DNS {r.get('queries', 0):,} queries, {r.get('forwarded', 0):,} forwarded, "
                     f"{r.get('refused', 0):,} refused"))
    refused: dict[str, list[str]] = {}
    for e in result.events:
        for f in e.findings:
            if e.event == "dns-refused":
                refused.setdefault(f.evidence.name, []).append(f.evidence.qtype or "?")
    for name, types in list(refused.items())[:20]:
        con.print(escape(f"  refused: {name} ({', '.join(sorted(set(types)))})"))
    if len(refused) > 20:
        con.print(f"  ... and {len(refused) - 20:,} more names refused")
    g = result.gate
    if g:
        lat = sorted(result.gate_latency_us)
        p50 = lat[len(lat) // 2] / 1000 if lat else 0
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000 if lat else 0
        con.print(f"gate: {g.get('allowed', 0):,} flows allowed, {g.get('blocked', 0):,} blocked "
                  f"before their first payload left; {p50:.2f} ms median, {p99:.2f} ms p99 "
                  "in the gate (queueing not counted)")
    for line in result.notes:
        con.print(escape(line))
    for line in result.losses:
        con.print(escape(f"warning: {line}"))


def cleanup_report(con: Console, done: list[str]) -> None:
    if not done:
        con.print("nothing to clean: no run of egress was left behind")
    for line in done:
        con.print(escape(line))


def what_if(con: Console, result, purpose_source: str) -> None:
    """The flows a new purpose would judge otherwise, old -> new and why, then the counts."""
    if result.changes:
        table = _table(con, "flow", "task", "destination", "name", "app", "stored", "now",
                       "why now")
        for c in result.changes:
            f = c.after
            why = Text("; ").join([*([_findings(f.findings, c.carried)] if f.findings else []),
                                   *([Text(f"rule {f.rule}")] if f.rule else [])]) or Text("-")
            table.add_row(f.flow_id, f.task or "-", endpoint(f.dst, f.dport), _name(f),
                          f.app or "-", _verdict(c.before.verdict), _verdict(f.verdict), why)
        con.print(table)
    if result.events:
        events(con, result.events)
    counts = ", ".join(f"{verb} {result.after[v]}" for v, verb in
                       (("allow", "allowed"), ("flag", "flagged"), ("block", "blocked")))
    stored = ", ".join(f"{result.before[v]} {v}" for v in ("allow", "flag", "block"))
    con.print(escape(f"{result.flows} flow(s) judged again under {purpose_source}: "
                     f"would now be {counts} (stored: {stored})"))
    moved = ", ".join((f"{a} -> {b}" if a != b else f"{a}, other findings") + f" {n}"
                      for (a, b), n in sorted(result.transitions.items()))
    con.print(f"{len(result.changes)} flow(s) change" + (f": {moved}" if moved else ""))
    if result.carried:
        con.print(f"{result.carried} finding(s) kept from the store (kept): they rest on "
                  "packets the store does not keep")
