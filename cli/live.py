"""Live commands: ``egress run`` (and the housekeeping beside it)."""

from __future__ import annotations

import click

from cli import render
from cli.main import CONTEXT, DB_OPTION, VIOLATIONS, Failure, _fail
from cli.params import TASK_ID
from egress import config as config_mod
from egress.records import Mode


@click.command(context_settings=dict(CONTEXT, ignore_unknown_options=False))
@click.option("--task", required=True, type=TASK_ID, help="The task's ID: every flow carries it.")
@click.option("--purpose", "purpose_file", required=True, type=click.Path(dir_okay=False),
              help="The task's purpose manifest (out of the task user's reach).")
@click.option("--mode", type=click.Choice(["audit", "enforce"]),
              help="Tighten the manifest's mode (audit -> enforce); never loosen it.")
@click.option("--user", help="Run the command as this user (default: egress-task, "
                             "created on first use). Never root, never the sudo caller.")
@DB_OPTION
@click.option("--no-store", is_flag=True, help="Record nothing; print the summary only.")
@click.option("--fail-on-violation", is_flag=True,
              help=f"Exit {VIOLATIONS} when violations were found, whatever the command returned.")
@click.option("--kill-on", type=click.Choice(["critical"]),
              help="End the task's whole process tree on a critical finding (a reverse "
                   "tunnel, mining), recorded as a task-killed event.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def run(ctx, task, purpose_file, mode, user, db_url, no_store, fail_on_violation, kill_on,
        command):
    """Run COMMAND as one task, contained, under its declared purpose.

    The command runs as an unprivileged task user in a network namespace of
    its own, whose only resolver is egress's: names the purpose does not
    allow are refused and never leave; the addresses of allowed names open
    the task's nftables sets. In enforce mode everything else is rejected at
    once; in audit mode it passes and is flagged. Needs root. Exit status:
    the command's own (10 with --fail-on-violation and violations).

    \b
    Examples:
      sudo egress run --task fix-1234 --purpose task.toml -- agent --fix 1234
      sudo egress run --task fix-1234 --purpose task.toml --mode enforce -- pip install -r req.txt
    """
    from egress.enforce.run import RunError, RunOptions, TaskRun
    from egress.enforce.sandbox import SandboxError
    from egress.enforce.nft import NftError
    from egress.enforce.purposefile import PurposeFileError
    from tagging import manifest
    from egress.enforce.tasknet import NetError
    cfg: config_mod.Config = ctx.obj
    upstream = None
    if cfg.resolver.upstream:
        upstream = (cfg.resolver.upstream[0], 53)
    opts = RunOptions(task=task, purpose=None, argv=list(command),
                      requested_mode=Mode(mode) if mode else None, user=user,
                      upstream=upstream, pool4=cfg.pools.ipv4, pool6=cfg.pools.ipv6,
                      min_ttl=cfg.resolver.min_ttl, nflog_group=cfg.netfilter.log_group,
                      mark_mask=cfg.netfilter.mark_mask, priority=cfg.netfilter.priority,
                      queue=cfg.netfilter.queue, first_packets=cfg.netfilter.first_packets,
                      fail_on_violation=fail_on_violation, kill_on=kill_on)
    from db.background import BackgroundRecorder, WriterError
    recorder = None
    try:
        if not no_store:  # a writer process of its own, forked before any thread starts
            recorder = BackgroundRecorder(db_url, cfg.database, kind="live",
                                          sources=[" ".join(command)])
        result = TaskRun(opts, purpose_path=purpose_file, recorder=recorder).run()
        if recorder is not None:
            recorder.finish(result.flows, {"resolver": result.resolver})
    except (RunError, SandboxError, NetError, NftError, OSError, WriterError,
            manifest.ManifestError, PurposeFileError) as e:
        if recorder is not None:
            recorder.abandon()
        raise _fail(e)
    render.run_summary(render.console(stderr=True), task, opts.mode, result)
    ctx.exit(result.status)


@click.command(context_settings=CONTEXT)
def cleanup() -> None:
    """Remove what killed `egress run`s left: their tasks' processes first, then their
    namespaces, rules and host settings. Live runs are never touched.

    \b
    Examples:
      sudo egress cleanup
    """
    from egress.enforce.cleanup import CleanupError, clean_dead_runs
    try:
        done = clean_dead_runs()
    except CleanupError as e:
        raise Failure(str(e))
    render.cleanup_report(render.console(), done)
