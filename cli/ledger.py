"""``egress verify``, ``egress checkpoint``, ``egress prune``: the ledger's commands.

Parse, call db.verify / db.checkpoints / db.prune, render.
"""

from __future__ import annotations

import click

from cli import render
from cli.main import CONTEXT, DB_OPTION, Failure, _store
from cli.params import TASK_ID, TIME, now_us
from egress import config as config_mod
from egress.records import format_time

KEY_OPTION = click.option("--key", "key_file", type=click.Path(dir_okay=False),
                          help="The ledger key file (default: EGRESS_LEDGER_KEY, else "
                               "ledger.key beside the default store).")


def _keys(key_file: str | None):
    from db.ledgerkeys import KeyRing, LedgerKeyError
    try:
        return KeyRing.load(key_file)
    except LedgerKeyError as e:
        raise Failure(str(e)) from None


def _export(exporter, checkpoints) -> None:
    from db import StoreError
    try:
        exporter.export(checkpoints)
    except StoreError as e:
        raise Failure(str(e)) from None


@click.command(context_settings=CONTEXT)
@click.option("--task", type=TASK_ID,
              help="Check only this task's rows and signatures (and the host's own entries; "
                   "the chains are walked whole).")
@DB_OPTION
@click.option("--checkpoints", "checkpoints_file", type=click.Path(dir_okay=False),
              help="Also prove the store still holds every chain head in this file "
                   "(JSON lines from the journal, egress checkpoint or a live writer).")
@KEY_OPTION
@click.pass_context
def verify(ctx, task, db_url, checkpoints_file, key_file) -> None:
    """Check the ledger: every chain, every signature, every row against its entry.

    Names the first wrong entry in one line and exits 1: an edited row or
    entry, a deleted row or entry, entries reordered, an entry forged
    without the key, a row written behind the ledger's back. With
    --checkpoints, a chain rewritten with the key fails too, against any
    checkpoint taken before the rewrite.

    \b
    Examples:
      egress verify --db ./incident.db
      egress verify --task fix-1234 --checkpoints /mnt/offhost/egress-checkpoints.jsonl
    """
    from db import checkpoints as cp_mod
    from db.verify import verify as run_verify
    keys = _keys(key_file)
    try:
        checkpoints = cp_mod.read(checkpoints_file) if checkpoints_file else []
    except ValueError as e:
        raise Failure(str(e)) from None
    store = _store(ctx, db_url)
    with store.session() as s:
        report = run_verify(s, keys, task=task, checkpoints=checkpoints)
    if report.ok and task and not report.rows:
        raise Failure(f"no rows of task {task} in the store")
    if not report.ok:
        more = len(report.problems) - 1
        raise Failure(f"ledger: {report.first()}"
                      + (f" (and {more} more problem{'s' * (more > 1)})" if more else ""))
    con = render.console()
    chains = ", ".join(f"{host} #{c.first}-#{c.last}" for host, c in report.chains.items())
    scope = f"task {task}: " if task else ""
    con.print(f"ledger ok: {scope}{report.entries} entries in {len(report.chains)} chain(s)"
              f"{' (' + chains + ')' if chains else ''}, {report.rows} rows, every one "
              "signed and covered", highlight=False)
    if checkpoints_file:
        con.print(f"checkpoints ok: {report.checkpoints} of {len(checkpoints)} match the store"
                  + (f"; {report.pruned_checkpoints} are of entries pruned since"
                     if report.pruned_checkpoints else ""), highlight=False)


@click.command(context_settings=CONTEXT)
@DB_OPTION
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Also append the checkpoints to this file.")
@KEY_OPTION
@click.pass_context
def checkpoint(ctx, db_url, output, key_file) -> None:
    """Print a signed checkpoint of every chain's head (with -o, also append them to FILE).

    Keep them off this host: `egress verify --checkpoints FILE` then proves
    the store still holds each head, so a chain rewritten even with the key
    is caught.

    \b
    Examples:
      egress checkpoint --db ./incident.db
      sudo egress checkpoint -o /mnt/offhost/egress-checkpoints.jsonl
    """
    from db import checkpoints as cp_mod
    keys = _keys(key_file)
    store = _store(ctx, db_url)
    with store.session() as s:
        taken = cp_mod.take(s, keys)
    if output:
        _export(cp_mod.Exporter(output), taken)
    for c in taken:
        click.echo(c.line())


@click.command(context_settings=CONTEXT)
@click.option("--before", type=TIME,
              help="Remove what was written before this time: 90d, or ISO 8601 "
                   "(default: retention_days of the config).")
@DB_OPTION
@click.option("--checkpoints", "checkpoints_file", type=click.Path(dir_okay=False),
              help="Append the checkpoint taken first to this file (default: "
                   "EGRESS_CHECKPOINTS); it also goes to syslog and standard output.")
@click.pass_context
def prune(ctx, before, db_url, checkpoints_file) -> None:
    """Remove flows, findings, task events and DNS bindings written before a time.

    A signed checkpoint of every chain is written first; then the rows and
    the ledger entries that covered them go, and each cut chain gets a
    prune entry, so `egress verify` tells the prune from a deletion (and
    still catches a row deleted later). Tasks and capture runs are kept.

    \b
    Examples:
      egress prune --before 90d --db ./incident.db
      sudo egress prune --before 2026-01-01T00:00:00Z --checkpoints /mnt/offhost/cp.jsonl
    """
    from db import StoreError, checkpoints as cp_mod
    from db.prune import prune as run_prune
    cfg: config_mod.Config = ctx.obj or config_mod.Config()
    if before is None:
        if cfg.retention_days is None:
            raise click.UsageError("give --before, or retention_days in the config")
        before = now_us() - cfg.retention_days * 86_400_000_000
    store = _store(ctx, db_url)
    if not store.ledger_on:
        raise Failure("the ledger is off (EGRESS_LEDGER=off): prune needs it")
    try:
        with store.session() as s:
            taken = cp_mod.take(s, store.ledger.keys)
    except StoreError as e:
        raise Failure(str(e)) from None
    exporter = cp_mod.Exporter(checkpoints_file or cp_mod.Exporter.from_env(syslog=True).file,
                               syslog=True)
    _export(exporter, taken)
    for c in taken:
        click.echo(c.line())
    try:
        done = run_prune(store, before)
    except StoreError as e:
        raise Failure(str(e)) from None
    rows = ", ".join(f"{n} {table}" for table, n in sorted(done.removed.items())
                     if table != "ledger") or "nothing"
    render.console(stderr=True).print(
        f"pruned what was written before {format_time(before)}: {rows}; "
        f"{done.removed['ledger']} ledger entries", highlight=False)
