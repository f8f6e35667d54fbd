"""``egress doctor``: parse, call egress.enforce.doctor, render. The checks live there."""

from __future__ import annotations

import json

import click
from rich.markup import escape
from rich.text import Text

from cli import render
from cli.main import CONTEXT, Failure
from egress import config as config_mod

STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


@click.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True,
              help="One JSON document: the overall status, the kernel, and every check "
                   "with its name, status, detail, fix and facts.")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check what `egress run` needs from this host, and say how to fix each gap.

    One line per check, ok, warn or fail: privileges, tools, network
    namespaces, nftables features, the inline gate (nft queue or
    iptables-nft NFQUEUE), NFLOG, conntrack, forwarding, the cgroup layout,
    other firewalls that would drop task traffic, and the address pools
    against the host's routes. Kernel features are probed in a scratch
    network namespace made and deleted for the purpose; the host's ruleset
    is only read. Exit status: 0 when nothing fails, 1 otherwise.

    \b
    Examples:
      sudo egress doctor
      sudo egress doctor --json | jq '.checks[] | select(.status != "ok")'
    """
    from egress.enforce.doctor import FAIL, report, run_checks
    cfg: config_mod.Config = ctx.obj or config_mod.Config()
    checks = run_checks(cfg)
    failed = [c.name for c in checks if c.status == FAIL]
    if as_json:
        click.echo(json.dumps(report(checks), indent=2))
        if failed:
            ctx.exit(1)
        return
    _render(render.console(), checks)
    if failed:
        raise Failure(f"{len(failed)} check(s) failed: {', '.join(dict.fromkeys(failed))}")


def _render(con, checks) -> None:
    if con.no_color:            # not a terminal: one plain line per check, fix after it
        width = max(len(c.name) for c in checks)
        for c in checks:
            fix = f"  -> fix: {c.fix}" if c.fix and c.status != "ok" else ""
            con.print(escape(f"{c.status:<4}  {c.name:<{width}}  {c.detail}{fix}"))
    else:
        table = render._table(con, "status", "check", "detail", "fix")
        for c in checks:
            table.add_row(Text(c.status, style=STATUS_STYLE[c.status]), c.name, c.detail,
                          c.fix if c.status != "ok" else "")
        con.print(table)
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "fail")}
    con.print(", ".join(f"{n} {s}" for s, n in counts.items()))
