"""The ``egress`` command: parse, call the library, render. Nothing else lives here."""

from __future__ import annotations

from collections import Counter

import click

from cli import render
from cli.params import TASK_ID, flow_filters
from egress import config as config_mod
from egress.exports import jsonl
from egress.records import Mode, Severity, Verdict
from egress.replay import replay as run_replay
from egress.capture.files import CaptureError
from egress.detectors import FULL
from egress.sources import Inputs, SourceError
from tagging import attribution, manifest, profiles as profiles_mod

VIOLATIONS = 10
"""Exit status when violations were found (DESIGN.md)."""

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Failure(click.ClickException):
    """One clear line on stderr, exit status 1."""

    def show(self, file=None):
        click.echo(f"egress: {self.format_message()}", err=True)


def _fail(error: Exception) -> Failure:
    return Failure(str(error))


def _store(ctx: click.Context, url: str | None):
    """One store per command (reading an existing one), closed when the command ends."""
    from db import Store, StoreError, resolve_url
    from db.engine import sqlite_file
    cfg = ctx.find_object(config_mod.Config) or config_mod.Config()
    try:
        resolved = resolve_url(url, cfg.database)
        path = sqlite_file(resolved)
        if path is not None and not path.exists():
            raise Failure(f"no store at {path} (egress replay writes one)")
        store = Store.open(resolved)
    except StoreError as e:
        raise _fail(e)
    ctx.call_on_close(store.close)
    return store


def _load_purpose(path: str) -> manifest.Purpose:
    try:
        return manifest.load(path)
    except manifest.ManifestError as e:
        raise _fail(e)


DB_OPTION = click.option("--db", "db_url", metavar="URL",
                         help="Store URL or SQLite path (default: EGRESS_DB, the config, "
                              "then /var/lib/egress/egress.db as root or the XDG data dir).")
JSON_OPTION = click.option("--json", "as_json", is_flag=True,
                           help="JSON lines of the contract (flow records, task events).")


@click.group(context_settings=CONTEXT)
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Host configuration (default /etc/egress/config.toml, if present).")
@click.version_option(package_name="egress", message="egress %(version)s")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """egress: network egress auditor for AI agents, tagged by task.

    Every outbound flow of an agent is linked to its task, judged against
    the purpose the task declared, and allowed, flagged or blocked.

    Exit status: 0 fine, 1 error, 2 usage, 10 violations found.
    """
    try:
        ctx.obj = config_mod.load(config_path)
    except config_mod.ConfigError as e:
        raise _fail(e)
    import os
    os.environ.update(ctx.obj.ledger.environment(os.environ))  # the store's writers read it


# ------------------------------------------------------------------ purpose

@main.group(context_settings=CONTEXT)
def purpose() -> None:
    """Purpose manifests: what a task declared it needs."""


@purpose.command("check", context_settings=CONTEXT)
@click.argument("manifest_file", type=click.Path(dir_okay=False))
@click.option("--mode", type=click.Choice(["audit", "enforce"]),
              help="The mode the command line would ask for (may tighten, never loosen).")
def purpose_check(manifest_file: str, mode: str | None) -> None:
    """Validate MANIFEST_FILE and print its effective rules.

    \b
    Example:
      egress purpose check examples/incident/purpose.toml
    """
    p = _load_purpose(manifest_file)
    try:
        effective = p.effective_mode(mode)
    except manifest.ManifestError as e:
        raise _fail(e)
    render.purpose(render.console(), p, effective)


@main.command(context_settings=CONTEXT)
@click.argument("name", required=False)
def profiles(name: str | None) -> None:
    """List the built-in destination profiles, or the rules of one.

    \b
    Examples:
      egress profiles
      egress profiles pypi
    """
    try:
        if name:
            render.profile(render.console(), profiles_mod.load(name))
        else:
            render.profile_list(render.console(),
                                [profiles_mod.load(n) for n in profiles_mod.names()])
    except profiles_mod.ProfileError as e:
        raise _fail(e)


# ------------------------------------------------------------------- replay

@main.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--from-db", "from_db", is_flag=True,
              help="What if: judge the flows already in the store (--db) under --purpose "
                   "instead of INPUTS, and show what would change; nothing is written.")
@click.option("--purpose", "purpose_file", type=click.Path(dir_okay=False),
              help="The purpose manifest to judge by.")
@click.option("--task", type=TASK_ID, help="The task that owns the flows (wins over the manifest's); "
                                           "with --from-db, the stored task to judge again.")
@click.option("--tasks", "tasks_file", type=click.Path(dir_okay=False),
              help="Several tasks, each with its addresses and/or time window and purpose "
                   "(TOML, see the README); instead of --purpose and --task.")
@click.option("--local", "local", multiple=True, metavar="CIDR",
              help="The task host's addresses (repeatable): flows other hosts open to it "
                   "are inbound, and flows between other hosts are no task's.")
@click.option("--mode", type=click.Choice(["audit", "enforce"]),
              help="Judge as audit or enforce (may tighten the manifest's, never loosen).")
@click.option("--window", type=click.Choice(["live", "full"]), default="live",
              show_default=True,
              help="What detectors see of each flow: what live recording provides, or "
                   "everything the capture has.")
@DB_OPTION
@click.option("--no-store", is_flag=True, help="Judge and print only; write nothing.")
@JSON_OPTION
@click.pass_context
def replay(ctx, inputs, from_db, purpose_file, task, tasks_file, local, mode, window, db_url,
           no_store, as_json) -> None:
    """Judge recorded flows under a purpose, as the live agent would have.

    INPUTS are captures (pcap or pcapng, gzip read transparently), read as
    one capture in the order given, or flow logs (JSON lines of flow
    records, the ``--json`` output of egress). Recorded verdicts are
    ignored: each flow is judged anew, DNS answers binding names for the
    task's later flows.

    With --from-db instead of INPUTS: what if the task (--task, the
    manifest's, or every task) had declared --purpose? Its stored flows
    are judged again and each flow whose verdict or findings change is
    listed, old -> new and why; the store is only read. Exit status 10 when
    the new purpose still leaves violations.

    \b
    Examples:
      egress replay examples/incident/incident.pcap \\
          --purpose examples/incident/purpose.toml --db ./incident.db
      egress replay examples/incident/flows.jsonl --purpose examples/incident/purpose.toml
      egress replay --from-db --task deps-install --purpose tighter.toml --db ./incident.db
    """
    if from_db == bool(inputs):
        raise click.UsageError("give INPUTS (captures or flow logs) or --from-db, not both"
                               if inputs else "give INPUTS (captures or flow logs) or --from-db")
    if from_db:
        return _what_if(ctx, purpose_file, task, tasks_file, local, mode, db_url, as_json)
    if tasks_file and (purpose_file or task):
        raise click.UsageError("--tasks names the tasks and their purposes: "
                               "give it, or --purpose and --task, not both")
    p = _load_purpose(purpose_file) if purpose_file else None
    cfg: config_mod.Config = ctx.obj
    owner = task or (p.task if p else None)
    if p is not None and owner is None:
        raise Failure("which task is this? give --task, or task = ... in the manifest")
    try:
        specs = attribution.load_tasks(tasks_file) if tasks_file else []
        who = attribution.Attribution(task=owner, tasks=specs,
                                      local=attribution.parse_networks(local))
    except (attribution.TasksError, manifest.ManifestError) as e:
        raise _fail(e)
    from db.background import BackgroundRecorder, WriterError
    on_record = (lambda r: click.echo(render.json_line(r))) if as_json else None
    recorder = None
    try:
        inputs_ = Inputs(list(inputs), who, window=FULL if window == "full" else None)
        if not no_store:  # written by a process of its own, on the other core
            recorder = BackgroundRecorder(db_url, cfg.database, kind="replay",
                                          sources=list(inputs))
        with render.progress(enabled=not as_json) as advance:
            result = run_replay(advance(inputs_.items), p, purposes=who.purposes(), task=task,
                                mode=Mode(mode) if mode else None,
                                min_ttl_s=cfg.resolver.min_ttl, recorder=recorder,
                                on_record=on_record, skipped=inputs_.skipped)
        counters = inputs_.counters()
        if recorder is not None:
            recorder.finish(result, counters)
    except (CaptureError, SourceError, ValueError, manifest.ManifestError, WriterError) as e:
        if recorder is not None:
            recorder.abandon()
        raise _fail(e)
    if not as_json:
        render.replay_summary(render.console(), result, counters)
    else:
        render.input_warnings(render.console(stderr=True), counters)
    if result.violations:
        ctx.exit(VIOLATIONS)


def _what_if(ctx, purpose_file, task, tasks_file, local, mode, db_url, as_json) -> None:
    """replay --from-db: the stored flows judged under another purpose, nothing written."""
    if purpose_file is None:
        raise click.UsageError("--from-db needs --purpose: the purpose to judge the stored flows by")
    if tasks_file or local:
        raise click.UsageError("--tasks and --local attribute captured flows; stored flows "
                               "have their task already (use --task)")
    from db import FlowFilter, StoreError
    from egress.whatif import StoredTask, what_if
    p = _load_purpose(purpose_file)
    cfg: config_mod.Config = ctx.obj
    store = _store(ctx, db_url)
    owner = task or p.task
    try:
        stored = [store.task(owner)] if owner else store.tasks()
        if owner and stored[0] is None:
            raise Failure(f"no task {owner!r} in the store")
        tasks = [StoredTask(t.id, t.purpose, t.mode, store.flows(FlowFilter(task=t.id)),
                            store.bindings(FlowFilter(task=t.id)), store.task_events(FlowFilter(task=t.id)))
                 for t in stored]
    except StoreError as e:
        raise _fail(e)
    if not any(t.flows for t in tasks):
        raise Failure(f"task {owner!r} has no flows in the store" if owner
                      else "the store has no flows of any task")
    try:
        result = what_if(tasks, p, mode=mode, min_ttl_s=cfg.resolver.min_ttl)
    except manifest.ManifestError as e:
        raise _fail(e)
    if as_json:
        import json
        click.echo(json.dumps(result.to_json(p), separators=(",", ":")))
    else:
        render.what_if(render.console(), result, purpose_file)
    if result.violations:
        ctx.exit(VIOLATIONS)


# ------------------------------------------------------------ audit, explain

@main.command(context_settings=CONTEXT)
@DB_OPTION
@flow_filters
@click.option("--events/--no-events", default=True, help="Also list task events.")
@JSON_OPTION
@click.pass_context
def audit(ctx, db_url, task, since, until, verdict, finding, events, as_json) -> None:
    """List recorded flows and task events; exit 10 if any is a violation.

    \b
    Examples:
      egress audit --task fix-1234 --since 1h
      egress audit --verdict block --json
      egress audit --finding reverse-ssh-tunnel --since 2026-03-11T00:00:00Z
    """
    from db import FlowFilter
    store = _store(ctx, db_url)
    filt = FlowFilter(task=task, since=since, until=until, verdict=verdict, finding=finding)
    flows = store.flows(filt)
    task_events = store.task_events(filt) if events and verdict is None else []
    if as_json:
        for line in jsonl.lines(flows, task_events):
            click.echo(line)
    else:
        con = render.console()
        render.flows(con, flows)
        if task_events:
            render.events(con, task_events)
        con.print(f"{len(flows)} flow(s), {len(task_events)} task event(s)")
    violation = any(f.verdict is not Verdict.ALLOW for f in flows) or any(
        f.severity.rank >= Severity.MEDIUM.rank and not f.waived
        for e in task_events for f in e.findings)
    if violation:
        ctx.exit(VIOLATIONS)


@main.command(context_settings=CONTEXT)
@click.argument("flow_id", required=False)
@DB_OPTION
@flow_filters
@JSON_OPTION
@click.pass_context
def explain(ctx, flow_id, db_url, task, since, until, verdict, finding, as_json) -> None:
    """Why a flow got its verdict: the rule or findings, their evidence, the DNS bindings.

    Give a FLOW_ID, or filters to explain every flow they select.

    \b
    Examples:
      egress explain f-7Kq2mB9x
      egress explain --finding mining-stratum --since 1d
    """
    filters = dict(task=task, since=since, until=until, verdict=verdict, finding=finding)
    if flow_id is None and not any(v is not None for v in filters.values()):
        raise click.UsageError("give a FLOW_ID, or filters (--task, --finding, ...)")
    store = _store(ctx, db_url)
    if flow_id is not None:
        flow = store.flow(flow_id)
        if flow is None:
            raise Failure(f"no flow {flow_id!r} in the store")
        flows = [flow]
    else:
        from db import FlowFilter
        flows = store.flows(FlowFilter(**filters))
    con = render.console()
    for flow in flows:
        if as_json:
            click.echo(render.json_line(flow))
            continue
        bindings = store.bindings_for(flow.task, flow.dst, before=flow.start) if flow.task else []
        render.explain(con, flow, bindings)


# --------------------------------------------------------------- completion

@main.command(context_settings=CONTEXT)
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script.

    \b
    Example (bash):
      eval "$(egress completion bash)"
    """
    from click.shell_completion import get_completion_class
    cls = get_completion_class(shell)
    click.echo(cls(main, {}, "egress", "_EGRESS_COMPLETE").source())


# Commands kept in modules of their own; imported last, since they use this module's helpers.
from cli.agent import agent, task_group  # noqa: E402
from cli.doctor import doctor  # noqa: E402
from cli.export import export  # noqa: E402
from cli.ledger import checkpoint, prune, verify  # noqa: E402
from cli.live import cleanup, run  # noqa: E402
from cli.rules import rules_group  # noqa: E402
from cli.history import report, timeline  # noqa: E402

for command in (run, cleanup, rules_group, doctor, agent, task_group, export, timeline,
                report, verify, checkpoint, prune):
    main.add_command(command)

if __name__ == "__main__":
    main()
