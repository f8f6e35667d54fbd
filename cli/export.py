"""``egress export``: parse, read the store, call egress.exports, write. Formats live there."""

from __future__ import annotations

import click

from cli.main import CONTEXT, DB_OPTION, Failure, _store
from cli.params import flow_filters
from egress import exports


@click.command("export", context_settings=CONTEXT)
@click.option("--format", "fmt", type=click.Choice(exports.FORMATS), required=True,
              help="jsonl: the contract's JSON lines (flow records and task events, as "
                   "audit --json prints them); zeek: a Zeek conn.log with a community_id "
                   "column; eve: Suricata EVE flow events.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, allow_dash=True),
              default="-", show_default=True, help="The file to write (- for stdout).")
@DB_OPTION
@flow_filters
@click.pass_context
def export(ctx, fmt, output, db_url, task, since, until, verdict, finding) -> None:
    """Export a task's recorded flows for other tools.

    zeek and eve carry each flow's final record (its latest); jsonl
    carries the flow records and the task's events, exactly as
    `egress audit --json` prints them. See the README ("Exports") for what
    maps to what.

    \b
    Examples:
      egress export --task deps-install --format zeek -o conn.log
      egress export --task deps-install --format eve -o eve.json
      egress export --task deps-install --format jsonl --verdict flag
    """
    if task is None:
        raise click.UsageError("give --task: an export is of one task")
    from db import FlowFilter, StoreError
    store = _store(ctx, db_url)
    filt = FlowFilter(task=task, since=since, until=until, verdict=verdict, finding=finding)
    try:
        if store.task(task) is None:
            raise Failure(f"no task {task!r} in the store")
        flows = store.flows(filt)
        events = store.task_events(filt) if fmt == "jsonl" and verdict is None else []
    except StoreError as e:
        raise Failure(str(e))
    if not flows:
        raise Failure(f"task {task!r} has no flows" + (" that match the filters" if any(
            v is not None for v in (since, until, verdict, finding)) else ""))
    text = "".join(line + "\n" for line in exports.render(fmt, flows, events))
    if output == "-":
        click.echo(text, nl=False)
        return
    try:
        with open(output, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    except OSError as e:
        raise Failure(f"cannot write {output}: {e.strerror or e}")
