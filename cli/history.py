"""After an incident: ``egress timeline`` (a task's story in time order) and ``egress report``
(one self-contained HTML file)."""

from __future__ import annotations

import json

import click
from rich.text import Text

from cli import render
from cli.main import CONTEXT, DB_OPTION, Failure, _store
from cli.params import TASK_ID, flow_filters, now_us
from egress import report as report_mod
from egress import timeline as timeline_mod
from egress.records import format_time


def _history(ctx: click.Context, db_url: str | None, **filters):
    """The store, and the task's flows, task events and DNS bindings the filters select;
    one line and exit 1 when the store has nothing of the task."""
    from db import FlowFilter
    store = _store(ctx, db_url)
    filt = FlowFilter(**filters)
    flows, events = store.flows(filt), store.task_events(filt)
    task = store.task(filt.task)
    if task is None and not flows and not events:
        raise Failure(f"no task {filt.task!r} in the store")
    return store, task, flows, events, store.bindings(filt)


@click.command(context_settings=CONTEXT)
@DB_OPTION
@flow_filters
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per entry (schema in the README).")
@click.pass_context
def timeline(ctx, db_url, task, since, until, verdict, finding, as_json) -> None:
    """A task's story in time order: DNS lookups, flows opened and closed, findings,
    blocks, kills and task events, with the process where known.

    --task is required; the other filters narrow it (a verdict or finding filter keeps
    the flows that match, and leaves out lookups our resolver answered and task events
    without that finding).

    \b
    Examples:
      egress timeline --task deps-install --db .demo/egress.db
      egress timeline --task deps-install --finding reverse-ssh-tunnel --json
    """
    if task is None:
        raise click.UsageError("--task is required: whose timeline?")
    _, _, flows, events, bindings = _history(ctx, db_url, task=task, since=since, until=until,
                                             verdict=verdict, finding=finding)
    entries = timeline_mod.build(flows, events, bindings)
    if as_json:
        for e in entries:
            click.echo(json.dumps(e.to_json(), separators=(",", ":")))
        return
    con = render.console()
    table = render._table(con, "time (UTC)", "entry", "flow", "what", "process")
    for e in entries:
        table.add_row(format_time(e.time)[:23].replace("T", " "), e.entry, e.flow_id or "-",
                      _what(e), _process(e))
    con.print(table)
    con.print(f"{len(entries)} entries: {len(flows)} flow(s), {len(events)} task event(s)")


def _what(e: timeline_mod.Entry) -> Text | str:
    d = e.detail
    if e.entry == "dns":
        asked = "; ".join(" ".join(filter(None, (q["name"], q["type"]))) + " -> "
                          + (", ".join(q["answers"]) or q["rcode"] or "no answer")
                          for q in d["lookups"])
        return f"{asked}  (via {d['resolver'] or 'our resolver'})"
    if e.entry == "flow-open":
        name = f" {d['server_name']}" if d["server_name"] else ""
        text = Text(f"{d['proto']} {d['src']} -> {d['dst']}{name} {d['app'] or '-'}: ")
        text.append(str(d["verdict"]), style=render.VERDICT_STYLE.get(str(d["verdict"]), ""))
        return text
    if e.entry == "finding":
        text = Text(d["severity"], style=render.SEVERITY_STYLE[d["severity"]])
        text.append(f" {d['id']}{' (waived)' if d.get('waived') else ''}: "
                    + render._evidence(d["evidence"]))
        return text
    if e.entry in ("block", "kill"):
        return Text(f"{e.entry}: action {d['action'] or '- (replay)'}, "
                    f"decided at {d['decided_at']}", style="bold red")
    if e.entry == "flow-close":
        return (f"{d['conn_state'] or '-'} after {d['duration_s']:.3f}s, "
                f"out {d['bytes_out']:,} B / in {d['bytes_in']:,} B")
    findings = ", ".join(f"{f['severity']} {f['id']}: {render._evidence(f['evidence'])}"
                         for f in d["findings"])
    return d["event"] + (f": {findings}" if findings else "")


def _process(e: timeline_mod.Entry) -> str:
    p = e.process
    if p is None:
        return "-"
    return f"pid {p.pid if p.pid is not None else '?'} {p.cmdline or p.exe or ''}".rstrip()


@click.command(context_settings=CONTEXT)
@click.option("--task", type=TASK_ID, required=True, help="The task to report on.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The HTML file to write.")
@DB_OPTION
@click.pass_context
def report(ctx, task, output, db_url) -> None:
    """Write one self-contained HTML file about a task: its purpose, a timeline chart of
    its flows, the findings with their evidence, and a table per destination.

    Nothing is fetched when it is opened (inline CSS and SVG, no script; its content
    security policy forbids loading anything).

    \b
    Example:
      egress report --task deps-install -o report.html --db .demo/egress.db
    """
    store, stored_task, flows, events, bindings = _history(ctx, db_url, task=task)
    if stored_task is None:
        raise Failure(f"no task {task!r} in the store (its flows are, but not its purpose)")
    page = report_mod.render(stored_task, flows, events, bindings, source=store.url,
                            generated=now_us())
    try:
        with open(output, "w", encoding="utf-8") as out:
            out.write(page)
    except OSError as e:
        raise Failure(f"cannot write {output}: {e.strerror or e}")
    findings = sum(len(f.findings) for f in flows) + sum(len(e.findings) for e in events)
    click.echo(f"wrote {output}: task {task}, {len(flows)} flow(s), {findings} finding(s)")
