"""One self-contained HTML report of a task: its purpose, a timeline chart of its flows,
the findings with their evidence, and a table per destination.

Nothing is fetched when the page is opened: CSS and SVG are inline, there is no script,
and the page's content security policy forbids loading anything at all. Every value from
the store is escaped (server names, banners and command lines come from the traffic or
the agent, so they are attacker-controlled).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from html import escape
from typing import Iterable, Protocol

from egress.records import (FINDINGS, FlowRecord, NameBinding, Severity, TaskEvent,
                            Verdict, format_time)
from egress.timeline import decided_time, endpoint
from tagging.manifest import Purpose

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
"""Content security policy of the page: inline styles only, nothing loaded."""

VERDICT_COLOUR = {"allow": "#2e7d32", "flag": "#e6a100", "block": "#c62828", None: "#9e9e9e"}
SEVERITY_COLOUR = {"info": "#757575", "low": "#0277bd", "medium": "#e6a100",
                   "high": "#d84315", "critical": "#b71c1c"}

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1180px;
 padding:0 24px 48px;color:#1c1c1c}
h1{font-size:24px;margin:24px 0 4px}h1 code{font-size:22px}h2{font-size:19px;margin:32px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;
 font-size:12.5px}
table{border-collapse:collapse;margin:6px 0 12px;width:100%;font-size:13px}
th,td{text-align:left;vertical-align:top;padding:3px 8px;border-bottom:1px solid #eee;
 overflow-wrap:anywhere}
th{background:#f5f5f5;font-weight:600;white-space:nowrap}td.num{text-align:right}td.n{white-space:nowrap}
table.evidence{width:auto;min-width:50%}table.evidence th{width:190px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:8px 0}dt{color:#555}
dd{margin:0}blockquote{margin:8px 0;padding:8px 14px;border-left:4px solid #1565c0;
 background:#f3f7fc;font-size:16px}
.badge{display:inline-block;padding:0 7px;border-radius:9px;color:#fff;font-size:12px;
 font-weight:600}
.finding{border:1px solid #ddd;border-left:6px solid var(--c);border-radius:4px;
 padding:6px 12px;margin:10px 0}.finding h3{margin:4px 0}.muted{color:#666}
.legend span{margin-right:14px}.legend i{display:inline-block;width:12px;height:12px;
 margin-right:4px;vertical-align:-1px}svg{width:100%;height:auto;display:block}
"""


class StoredTask(Protocol):
    """What the report needs of a stored task (db.mapping.Task has it)."""

    id: str
    purpose: Purpose
    mode: object
    sha256: str | None
    started: int
    ended: int | None


def _e(value) -> str:
    """Text for HTML content or an attribute: escaped, None as a dash."""
    return "-" if value is None else escape(str(value), quote=True)


def _time(us: int | None) -> str:
    return "-" if us is None else format_time(us).replace("T", " ")


def _badge(text: str, colour: str) -> str:
    return f'<span class="badge" style="background:{colour}">{_e(text)}</span>'


def _evidence_value(value) -> str:
    if isinstance(value, list):
        return ", ".join(_evidence_value(v) for v in value) if value else "(none)"
    if isinstance(value, dict):
        return "; ".join(f"{k}={_evidence_value(v)}" for k, v in value.items())
    return str(value)


def render(task: StoredTask, flows: list[FlowRecord], events: list[TaskEvent],
           bindings: Iterable[NameBinding] = (), *, source: str | None = None,
           generated: int | None = None) -> str:
    """The report as one HTML document (a string)."""
    flows = sorted(flows, key=lambda f: (f.start, f.flow_id))
    events = sorted(events, key=lambda e: e.time)
    parts = [_head(task, flows, events), _purpose(task), _chart(task, flows, events),
             _findings(flows, events), _destinations(flows, list(bindings)),
             _foot(source, generated)]
    return "\n".join(parts)


# ------------------------------------------------------------------- parts

def _head(task: StoredTask, flows: list[FlowRecord], events: list[TaskEvent]) -> str:
    verdicts = Counter(str(f.verdict) for f in flows)
    severities = Counter(str(x.severity) for f in flows for x in f.findings if not x.waived)
    severities.update(str(x.severity) for e in events for x in e.findings if not x.waived)
    sev = ", ".join(f"{severities[s]} {s}" for s in reversed(Severity) if severities[s])
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>egress report: task {_e(task.id)}</title><style>{STYLE}</style></head><body>"
        f'<h1>egress report: task <code>{_e(task.id)}</code></h1>'
        f'<p class="muted" id="summary">{len(flows)} flow(s): {verdicts["allow"]} allowed, '
        f'{verdicts["flag"]} flagged, {verdicts["block"]} blocked; '
        f'findings: {_e(sev or "none")}. '
        f"From {_e(_time(task.started))} to {_e(_time(task.ended))} (UTC).</p>")


def _purpose(task: StoredTask) -> str:
    p = task.purpose
    limits = ", ".join(f"{k} {v:,}" for k, v in (("bytes_out", p.limits.bytes_out),
                                                ("connections", p.limits.connections)) if v)
    rows = "".join(
        f"<tr><td>{_e(r.origin)}</td><td class=mono>{_e(r.destination())}</td>"
        f"<td>{_e('/'.join(r.transports))}</td><td>{_e(_ports(r))}</td>"
        f"<td>{_e(r.protocol or 'by port')}</td></tr>" for r in p.rules)
    return (
        '<section id="purpose"><h2>Purpose</h2>'
        f"<blockquote>{_e(p.purpose)}</blockquote><dl>"
        f"<dt>mode</dt><dd>{_e(task.mode)}</dd>"
        f"<dt>manifest sha256</dt><dd class=mono>{_e(task.sha256 or '- (built in code)')}</dd>"
        f"<dt>profiles</dt><dd>{_e(', '.join(p.profiles) or '-')}</dd>"
        f"<dt>waived</dt><dd>{_e(', '.join(sorted(p.waive)) or '-')}</dd>"
        f"<dt>limits</dt><dd>{_e(limits or '-')}</dd></dl>"
        f"<h3>Expanded allow rules ({len(p.rules)})</h3><table><tr><th>origin</th>"
        f"<th>destination</th><th>transport</th><th>ports</th><th>protocol</th></tr>{rows}"
        "</table></section>")


def _ports(rule) -> str:
    if rule.ports is None:
        return "-"
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in rule.ports)


def _label(f: FlowRecord) -> str:
    if f.app == "dns" and f.dns is not None and f.dns.queries:
        return f"dns ?{f.dns.queries[0].name}"
    name = f.server_name or f.dst
    return f"{name}:{f.dport}" if f.dport is not None else name


def _worst(findings) -> str | None:
    counted = [x for x in findings if not x.waived] or list(findings)
    return max(counted, key=lambda x: x.severity.rank).severity.value if counted else None


CHART_ROWS = 400
"""At most this many flows in the chart: every flagged, blocked or found one first, then
the earliest others (the tables list every flow)."""


def _chart_flows(flows: list[FlowRecord]) -> list[FlowRecord]:
    if len(flows) <= CHART_ROWS:
        return flows
    notable = [f for f in flows if f.findings or f.verdict is not Verdict.ALLOW]
    rest = [f for f in flows if not (f.findings or f.verdict is not Verdict.ALLOW)]
    keep = {id(f) for f in (notable + rest)[:CHART_ROWS]}
    return [f for f in flows if id(f) in keep]


# SVG geometry (user units of the viewBox; the image scales to the page's width)
_W, _LABEL, _RIGHT, _ROW, _TOP = 1100, 300, 20, 20, 34


def _chart(task: StoredTask, every: list[FlowRecord], events: list[TaskEvent]) -> str:
    if not every:
        return '<section id="timeline"><h2>Timeline</h2><p>No flows recorded.</p></section>'
    flows = _chart_flows(every)
    shown = "" if len(flows) == len(every) else (
        f'<p class="muted" id="chart-cut">The chart shows {len(flows)} of the task\'s '
        f"{len(every)} flows: every flagged or blocked one, every one with a finding, then "
        "the earliest others. The tables below list them all.</p>")
    t0 = min([f.start for f in flows] + [e.time for e in events])
    t1 = max([f.end or f.start for f in flows] + [e.time for e in events])
    span = max(t1 - t0, 1_000)
    width = _W - _LABEL - _RIGHT
    height = _TOP + _ROW * len(flows) + 12

    def x(t: int) -> float:
        return round(_LABEL + (t - t0) * width / span, 2)

    out = [f'<svg id="chart" viewBox="0 0 {_W} {height}" role="img" '
           f'aria-label="flows of task {_e(task.id)} over time" '
           'xmlns="http://www.w3.org/2000/svg" font-family="system-ui,sans-serif" '
           'font-size="11">']
    for i in range(6):  # time axis: six ticks, seconds after the first record
        t = t0 + span * i // 5
        out.append(f'<line x1="{x(t)}" y1="{_TOP - 6}" x2="{x(t)}" y2="{height - 10}" '
                   'stroke="#e3e3e3"/>'
                   f'<text x="{x(t)}" y="{_TOP - 10}" text-anchor="middle" fill="#555">'
                   f'+{(t - t0) / 1e6:.2f}s</text>')
    out.append(f'<text x="0" y="{_TOP - 10}" fill="#555">{_e(_time(t0))}</text>')
    for e in events:
        label = f"{e.event} at {_time(e.time)}" + "".join(
            f"; {x_.severity} {x_.id}" for x_ in e.findings)
        colour = SEVERITY_COLOUR.get(_worst(e.findings) or "", "#1565c0")
        out.append(f'<line class="event" x1="{x(e.time)}" y1="{_TOP - 4}" x2="{x(e.time)}" '
                   f'y2="{height - 10}" stroke="{colour}" stroke-dasharray="4 3">'
                   f"<title>{_e(label)}</title></line>")
    for row, f in enumerate(flows):
        y = _TOP + row * _ROW
        verdict = _v(f)
        start, end = x(f.start), x(f.end or f.start)
        tip = (f"{f.flow_id} {f.proto} {endpoint(f.dst, f.dport)} {f.server_name or ''} "
               f"{f.app or ''}: {verdict}, {_time(f.start)} .. {_time(f.end)}")
        out.append(f'<text x="{_LABEL - 8}" y="{y + 14}" text-anchor="end">'
                   f"{_e(_label(f)[:44])}</text>"
                   f'<rect class="bar verdict-{verdict or "unjudged"}" x="{start}" y="{y + 4}" '
                   f'width="{max(end - start, 3)}" height="{_ROW - 8}" rx="2" '
                   f'fill="{VERDICT_COLOUR[verdict]}">'
                   f"<title>{_e(tip)}</title></rect>")
        if f.findings:
            cx, cy = x(decided_time(f)), y + _ROW / 2
            ids = ", ".join(f"{x_.severity} {x_.id}" for x_ in f.findings)
            out.append(f'<path class="finding-mark" d="M{cx} {cy - 7}L{cx + 7} {cy}L{cx} '
                       f'{cy + 7}L{cx - 7} {cy}Z" fill="{SEVERITY_COLOUR[_worst(f.findings)]}" '
                       f'stroke="#fff" stroke-width="1.5"><title>{_e(f.flow_id)}: {_e(ids)}'
                       "</title></path>")
    out.append("</svg>")
    legend = "".join(f'<span><i style="background:{VERDICT_COLOUR[v]}"></i>{v}</span>'
                     for v in ("allow", "flag", "block"))
    legend += (f'<span><i style="background:{SEVERITY_COLOUR["critical"]};'
               'transform:rotate(45deg)"></i>finding (colour: highest severity)</span>'
               '<span>dashed line: task event</span>')
    return ('<section id="timeline"><h2>Timeline</h2>' + shown + "".join(out)
            + f'<p class="legend muted">{legend}</p><p class="muted">Bars run from a flow\'s '
            "first to its last packet; a finding is marked when the flow's verdict was "
            "decided.</p></section>")


def _findings(flows: list[FlowRecord], events: list[TaskEvent]) -> str:
    items = [(decided_time(f), x, f) for f in flows for x in f.findings]
    items += [(e.time, x, e) for e in events for x in e.findings]
    items.sort(key=lambda i: (-i[1].severity.rank, i[0]))
    out = [f'<section id="findings"><h2>Findings ({len(items)})</h2>']
    if not items:
        out.append("<p>None.</p>")
    for when, finding, owner in items:
        colour = SEVERITY_COLOUR[finding.severity.value]
        kind = FINDINGS.get(finding.id)
        if isinstance(owner, FlowRecord):
            where = (f"flow <code>{_e(owner.flow_id)}</code>: {_e(owner.proto)} "
                     f"{_e(endpoint(owner.dst, owner.dport))}"
                     + (f" ({_e(owner.server_name)})" if owner.server_name else "")
                     + f", verdict {_e(owner.verdict)}, decided at {_e(owner.decided_at)}")
            if owner.process is not None:
                where += f"; process {_process(owner)}"
        else:
            where = f"task event <code>{_e(owner.event)}</code>"
        evidence = dataclasses.asdict(finding.evidence) if dataclasses.is_dataclass(
            finding.evidence) else dict(finding.evidence or {})
        rows = "".join(f"<tr><th>{_e(k)}</th><td class=mono>{_e(_evidence_value(v))}</td></tr>"
                       for k, v in evidence.items() if v is not None)
        waived = " (waived by the purpose)" if finding.waived else ""
        out.append(
            f'<article class="finding" style="--c:{colour}"><h3>'
            f"{_badge(finding.severity.value, colour)} <code>{_e(finding.id)}</code>"
            f"{_e(waived)}</h3><p>{_e(kind.meaning if kind else '')}. "
            f"{where}, at {_e(_time(when))}.</p>"
            f'<table class="evidence">{rows}</table></article>')
    out.append("</section>")
    return "".join(out)


def _process(f: FlowRecord) -> str:
    p = f.process
    return (f"pid {_e(p.pid)} <code>{_e(p.exe)}</code> "
            f"<code>{_e(p.cmdline)}</code>")


def _details(f: FlowRecord) -> str:
    if f.dns is not None:
        return "; ".join(f"{q.name} {q.type} -> {', '.join(q.answers) or q.rcode or '-'}"
                         for q in f.dns.queries)
    for part in ("tls", "ssh", "http", "stratum", "quic", "tunnel"):
        sub = getattr(f, part)
        if sub is not None:
            fields = {k: v for k, v in dataclasses.asdict(sub).items() if v is not None}
            return f"{part}: {_evidence_value(fields)}"
    return ""


def _destinations(flows: list[FlowRecord], bindings: list[NameBinding]) -> str:
    groups: dict[str, list[FlowRecord]] = {}
    for f in flows:
        groups.setdefault(f.server_name or f.dst, []).append(f)
    out = [f'<section id="destinations"><h2>Destinations ({len(groups)})</h2>']
    for name, group in groups.items():
        addresses = sorted({f.dst for f in group})
        verdicts = Counter(str(f.verdict) for f in group)
        worst = next((v for v in ("block", "flag", "allow") if verdicts[v]), None)
        resolved = sorted({b.name for b in bindings if b.address in addresses} - {name})
        head = (f'<h3>{_badge(worst or "unjudged", VERDICT_COLOUR[worst])} '
                f"<code>{_e(name)}</code></h3><p class=muted>addresses "
                f"{_e(', '.join(addresses))}; {len(group)} flow(s), out "
                f"{sum(f.bytes_out for f in group):,} B, in {sum(f.bytes_in for f in group):,} B"
                + (f"; also resolved as {_e(', '.join(resolved))}" if resolved else "")
                + "</p>")
        rows = "".join(
            f'<tr><td class="mono n">{_e(f.flow_id)}</td><td class=n>{_e(_time(f.start)[11:23])}'
            f"</td><td class=n>{_e(_duration(f))}</td><td class=n>{_e(f.proto)}/{_e(f.dport)}</td>"
            f"<td>{_e(f.app)}</td><td class=num>{f.bytes_out:,}</td>"
            f"<td class=num>{f.bytes_in:,}</td>"
            f"<td>{_badge(_v(f) or 'unjudged', VERDICT_COLOUR[_v(f)])}"
            f"</td><td>{_e(', '.join(x.id for x in f.findings) or '-')}</td>"
            f"<td class=mono>{_e(_details(f))}</td>"
            f"<td>{_process(f) if f.process is not None else '-'}</td></tr>" for f in group)
        out.append(head + "<table><tr><th>flow</th><th>start</th><th>duration</th>"
                   "<th>proto/port</th><th>app</th><th>bytes out</th><th>bytes in</th>"
                   "<th>verdict</th><th>findings</th><th>details</th><th>process</th></tr>"
                   + rows + "</table>")
    out.append("</section>")
    return "".join(out)


def _v(f: FlowRecord) -> str | None:
    return None if f.verdict is None else str(f.verdict)


def _duration(f: FlowRecord) -> str:
    return "-" if f.end is None else f"{(f.end - f.start) / 1e6:.3f}s"


def _foot(source: str | None, generated: int | None) -> str:
    made = f" at {_e(_time(generated))}" if generated is not None else ""
    src = f" from {_e(source)}" if source else ""
    return (f'<footer class="muted"><p>Written by egress{made}{src}. All times UTC.'
            "</p></footer></body></html>\n")
