"""``egress rules learn``: a least-privilege purpose manifest from what a task did.

Parse and render only; the learning is tagging.learn's.
"""

from __future__ import annotations

from pathlib import Path

import click

from cli.main import CONTEXT, DB_OPTION, Failure, _fail, _store
from cli.params import TASK_ID
from egress import config as config_mod
from egress.capture.files import CaptureError
from egress.records import FlowRecord, Mode, TaskEvent
from egress.replay import replay as run_replay
from egress.sources import Inputs, SourceError
from tagging import attribution, learn as learning, manifest


def _from_captures(ctx, paths, task, local):
    """Replay captures or flow logs under the learning purpose; the task's records."""
    cfg: config_mod.Config = ctx.obj or config_mod.Config()
    out: list = []
    try:
        who = attribution.Attribution(task=task, local=attribution.parse_networks(local))
        inputs = Inputs(list(paths), who)
        run_replay(inputs.items, learning.capture_purpose(), task=task, mode=Mode.AUDIT,
                   min_ttl_s=cfg.resolver.min_ttl, on_record=out.append,
                   skipped=inputs.skipped)
    except (CaptureError, SourceError, ValueError, attribution.TasksError,
            manifest.ManifestError) as e:
        raise _fail(e)
    flows = [r for r in out if isinstance(r, FlowRecord)]
    events = [r for r in out if isinstance(r, TaskEvent)]
    return flows, events


@click.command("learn", context_settings=CONTEXT)
@click.argument("captures", nargs=-1, type=click.Path(dir_okay=False), metavar="[CAPTURE]...")
@click.option("--task", type=TASK_ID, required=True, help="The task to learn from.")
@DB_OPTION
@click.option("--local", "local", multiple=True, metavar="CIDR",
              help="With captures: the task host's addresses (repeatable), as for egress "
                   "replay; flows between other hosts are no task's.")
@click.option("--addresses", is_flag=True,
              help="Also learn flows reached by a bare address (no name) as /32 or /128 "
                   "rules; by default they are listed, not learned.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the manifest to this file (default: standard output).")
@click.pass_context
def learn(ctx, captures, task, db_url, local, addresses, output) -> None:
    """Print a least-privilege purpose manifest learned from what a task did.

    The task's flows come from the store (as egress audit reads them), or
    from CAPTUREs (pcap, pcapng, or flow logs) replayed under a learning
    purpose that declares only resolvers, so every finding the detectors
    raise stays on the record. Names become host rules; a DNS flow to a
    resolver becomes a /32 or /128 rule; other flows reached by a bare
    address are listed, and learned only with --addresses. Three or more
    names under one registrable suffix become *.suffix; ports, transports
    and protocols are the ones seen; built-in profiles replace the rules
    they fully cover. Flows with high or critical findings (a miner, a
    reverse tunnel, a fronted name) are never learned: they are listed at
    the end. Findings that only say the purpose in force did not declare a
    destination or protocol (undeclared-destination, protocol-mismatch,
    budget-exceeded) do not count; ssh-egress does: SSH is learned only
    where that purpose (for captures: the built-in profiles) declared SSH.
    The manifest says mode = "enforce"; review it before use.

    \b
    Examples:
      egress rules learn --task fix-1234 --db ./egress.db -o fix-1234.toml
      egress rules learn --task lab-pip --local 10.99.0.2/32 \\
          tests/lab/captures/pip-stratum-directip-fronting.pcap
      egress rules learn --task fix-1234 examples/incident/flows.jsonl --addresses
    """
    if captures and db_url:
        raise click.UsageError("give captures or --db, not both")
    if local and not captures:
        raise click.UsageError("--local attributes captured flows: give captures with it")
    if captures:
        flows, events = _from_captures(ctx, captures, task, local)
        where = ", ".join(captures)
    else:
        from db import FlowFilter
        store = _store(ctx, db_url)
        filt = FlowFilter(task=task)
        flows, events = store.flows(filt), store.task_events(filt)
        where = "the store"
    try:
        result = learning.learn(flows, task, events=events, addresses=addresses)
    except learning.LearnError:
        raise Failure(f"no flows of task {task} in {where}") from None
    except ValueError as e:
        raise _fail(e)
    if output is None:
        click.echo(result.text, nl=False)
        return
    try:
        Path(output).write_text(result.text, encoding="utf-8")
    except OSError as e:
        raise Failure(f"{output}: cannot write: {e.strerror}") from None
    click.echo(f"egress: wrote {output}: {result.rules} rule(s), profiles "
               f"{', '.join(result.profiles) or 'none'}; {result.learned} of {result.flows} "
               f"flow(s) learned, {result.excluded} left out for findings, "
               f"{result.by_address} reached by address", err=True)
