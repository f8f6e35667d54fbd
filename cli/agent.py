"""``egress agent`` and ``egress task``: the host agent and the orchestrator's side of it."""

from __future__ import annotations

import grp
import signal
from pathlib import Path

import click

from cli import render
from cli.main import CONTEXT, DB_OPTION, Failure, _fail
from cli.params import TASK_ID
from egress import config as config_mod

SOCKET_OPTION = click.option("--socket", "socket_path", type=click.Path(dir_okay=False),
                             default="/run/egress/agent.sock", show_default=True,
                             help="The agent's control socket.")


@click.command(context_settings=CONTEXT)
@DB_OPTION
@click.option("--no-store", is_flag=True, help="Record nothing (print the summary only).")
@click.option("--mode", type=click.Choice(["audit", "enforce"]),
              help="The least mode of every task (a task's may be stricter, never looser).")
@click.option("--group", help="A group whose members may use the control socket.")
@click.option("--interface", "interfaces", multiple=True, metavar="IFACE",
              help="Record only flows leaving by this interface (repeatable; default: every "
                   "interface but loopback). Tasks' rules apply on every interface.")
@click.option("--end-tasks-on-exit", is_flag=True,
              help="End every task when the agent stops (default: tasks stay, their rules "
                   "failing closed, and the next agent takes them and their open flows back).")
@SOCKET_OPTION
@click.pass_context
def agent(ctx, db_url, no_store, mode, group, interfaces, end_tasks_on_exit,
          socket_path) -> None:
    """Audit a shared host where tasks come and go, in the foreground, until SIGTERM.

    Tasks are started and stopped with `egress task`; each gets its purpose's
    rules (matched by uid or cgroup), its own resolver, and its flows on the
    record under its id. Sockets of ordinary users no task claims are recorded
    untagged. Needs root (CAP_NET_ADMIN).

    When the agent stops, its tasks stay: their rules fail closed until an
    agent runs again, which takes the tasks back and picks their open flows up
    from conntrack, as the same flows.

    \b
    Examples:
      sudo egress agent --db postgresql://egress@db/egress
      sudo egress agent --mode enforce --group egress
      sudo egress agent --interface eth0 --interface wg0
    """
    from db.background import BackgroundRecorder, WriterError
    from egress.enforce.agent import Agent, AgentError, AgentOptions
    from egress.enforce.nft import NftError
    from egress.enforce.tasknet import agent_numbers
    from egress.records import Mode
    from egress.enforce.doctor import CAP_NET_ADMIN, capabilities
    if not capabilities(Path("/proc/self/status").read_text()) >> CAP_NET_ADMIN & 1:
        raise Failure("egress agent needs CAP_NET_ADMIN (nftables rules, NFLOG, conntrack); "
                      "run it as root or as examples/systemd/egress-agent.service does")
    cfg: config_mod.Config = ctx.obj
    try:
        gid = grp.getgrnam(group).gr_gid if group else None
    except KeyError:
        raise Failure(f"--group: no group {group!r}") from None
    from egress.enforce.ruleset import Match
    for name in interfaces:
        try:
            Match.parse(f"interface:{name}")
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--interface") from None
    group, queue = agent_numbers(cfg.netfilter.log_group, cfg.netfilter.queue)
    opts = AgentOptions(socket=Path(socket_path), mode=Mode(mode) if mode else None,
                        upstream=(cfg.resolver.upstream[0], 53) if cfg.resolver.upstream
                        else None, min_ttl=cfg.resolver.min_ttl,
                        nflog_group=group, queue=queue, mark_mask=cfg.netfilter.mark_mask,
                        first_packets=cfg.netfilter.first_packets or 64, group=gid,
                        end_tasks_on_exit=end_tasks_on_exit, interfaces=tuple(interfaces))
    recorder = None
    try:
        if not no_store:
            from functools import partial
            from db import resolve_url
            from db.store import read_back
            opts.read_back = partial(read_back, resolve_url(db_url, cfg.database))
            recorder = BackgroundRecorder(db_url, cfg.database, kind="live", sources=["agent"])
        the_agent = Agent(opts, recorder=recorder)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: the_agent.stop())
        def ready(a) -> None:
            for problem in a.problems:
                click.echo(f"egress agent: {problem}", err=True)
            if a.tasks or a.claimed:
                click.echo(f"egress agent: {len(a.tasks) + len(a.claimed)} task(s) taken back, "
                           f"{a.picked_up} open flow(s) picked up", err=True)
            click.echo(f"egress agent: listening on {socket_path}", err=True)
        try:
            the_agent.run(on_ready=ready)
        finally:
            flows = the_agent.close()
        if recorder is not None:
            recorder.finish(flows, {})
    except (AgentError, NftError, WriterError, OSError) as e:
        if recorder is not None:
            recorder.abandon()
        raise _fail(e)
    render.replay_summary(render.console(stderr=True), flows, {})


@click.group("task", context_settings=CONTEXT)
def task_group() -> None:
    """Tell the host agent which task owns which sockets."""


def _ask(socket_path: str, payload: dict) -> dict:
    from egress.enforce.agent import AgentError, request
    try:
        reply = request(payload, Path(socket_path))
    except AgentError as e:
        raise _fail(e)
    if not reply.get("ok"):
        raise Failure(reply.get("error", "the agent refused"))
    return reply


@task_group.command("start", context_settings=CONTEXT)
@click.argument("task", type=TASK_ID)
@click.option("--purpose", "purpose_file", required=True, type=click.Path(dir_okay=False))
@click.option("--uid", type=int, help="The task's processes run as this uid.")
@click.option("--cgroup", help="The task's processes are in this cgroup (cgroup2 path).")
@click.option("--pid", type=int, help="The task is this process and its descendants.")
@click.option("--mode", type=click.Choice(["audit", "enforce"]))
@SOCKET_OPTION
def task_start(task, purpose_file, uid, cgroup, pid, mode, socket_path) -> None:
    """Start a task: its sockets (by uid or cgroup) get its purpose's rules, its own
    resolver, the inline gate, and its id on the record.

    By --pid, the flows of ordinary users' sockets (uid 1000 and above) that no uid or
    cgroup task claims are the task's when their process descends from PID when the
    flow starts. With none of the three, the host's single such task takes all of
    them while it runs (by time window). Both are recorded and judged in audit mode:
    no kernel rule can match a process tree.

    \b
    Examples:
      sudo egress task start fix-1234 --purpose task.toml --uid 1001
      sudo egress task start fix-1234 --purpose task.toml --cgroup /agents/fix-1234
      sudo egress task start fix-1234 --purpose task.toml --pid 4242
    """
    given = [f"{k}:{v}" for k, v in (("uid", uid), ("cgroup", cgroup), ("pid", pid))
             if v is not None]
    if len(given) > 1:
        raise click.UsageError("give one of --uid, --cgroup or --pid")
    match = given[0] if given else None
    reply = _ask(socket_path, {"op": "start", "task": task, "match": match, "mode": mode,
                               "purpose": str(Path(purpose_file).resolve())})
    t = reply["task"]
    click.echo(f"task {t['task']} started: {t['match']}, {t['mode']}, resolver "
               f"{t['resolver'] or '- (its DNS is not redirected)'}")


@task_group.command("stop", context_settings=CONTEXT)
@click.argument("task", type=TASK_ID)
@SOCKET_OPTION
def task_stop(task, socket_path) -> None:
    """Stop a task: its rules and resolver go; its flows stay on the record.

    \b
    Examples:
      sudo egress task stop fix-1234
    """
    reply = _ask(socket_path, {"op": "stop", "task": task})
    click.echo(f"task {reply['task']['task']} stopped")


@task_group.command("list", context_settings=CONTEXT)
@SOCKET_OPTION
def task_list(socket_path) -> None:
    """The running tasks.

    \b
    Examples:
      sudo egress task list
    """
    for t in _ask(socket_path, {"op": "list"})["tasks"]:
        click.echo(f"{t['task']}\t{t['match']}\t{t['mode']}\t{t['purpose']}")


@task_group.command("show", context_settings=CONTEXT)
@click.argument("task", type=TASK_ID)
@SOCKET_OPTION
def task_show(task, socket_path) -> None:
    """One running task, with its resolver's counters.

    \b
    Examples:
      sudo egress task show fix-1234
    """
    t = _ask(socket_path, {"op": "show", "task": task})["task"]
    for key in ("task", "match", "mode", "purpose", "resolver", "started"):
        click.echo(f"{key:9} {t[key]}")
    click.echo("dns       " + ", ".join(f"{k} {v}" for k, v in sorted(t["dns"].items())))
