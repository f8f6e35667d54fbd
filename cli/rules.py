"""``egress rules``: the rules that enforce a task's purpose, printed for review or loading.

The same generator ``egress run`` loads (egress.enforce.ruleset), so what a
person reviews is what the kernel gets.
"""

from __future__ import annotations

import ipaddress

import click

from cli.main import CONTEXT, Failure, _fail, _load_purpose
from cli.params import TASK_ID
from egress.enforce import ruleset
from tagging import manifest


@click.group("rules", context_settings=CONTEXT)
def rules_group() -> None:
    """Firewall rules (nftables, or iptables and ipset) enforcing a task's purpose."""


def _by_family(option: str, addresses: tuple[str, ...]) -> dict[int, str]:
    out: dict[int, str] = {}
    for text in addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise Failure(f"{option}: {text!r} is not an IP address") from None
        if address.version in out:
            raise Failure(f"{option}: give at most one IPv{address.version} address")
        out[address.version] = str(address)
    return out


def _resolve_ipv4(name: str) -> list[str]:
    """The IPv4 addresses of a name now, by this host's resolver (none when it fails)."""
    import socket
    try:
        found = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return []
    return sorted({info[4][0] for info in found})


def task_options(deadman_default: int):
    """The options that say which task, under which purpose, its rules are for."""
    options = [
        click.option("--purpose", "purpose_file", required=True,
                     type=click.Path(dir_okay=False), help="The task's purpose manifest."),
        click.option("--match", "match_text", required=True, metavar="KIND:VALUE",
                     help="The task's traffic: interface:NAME (forwarded from a veth), "
                          "uid:UID or cgroup:PATH (the host's own sockets)."),
        click.option("--task", type=TASK_ID, help="The task id (wins over the manifest's)."),
        click.option("--mode", type=click.Choice(["audit", "enforce"]),
                     help="Audit logs and passes what no rule allows; enforce rejects it "
                          "(may tighten the manifest's mode, never loosen)."),
        click.option("--resolver", multiple=True, metavar="ADDR",
                     help="The task's resolver, the only DNS server it may use "
                          "(once per family)."),
        click.option("--task-address", "task_address", multiple=True, metavar="ADDR",
                     help="The task's own address, for anti-spoofing with interface "
                          "matches (once per family)."),
        click.option("--deadman", type=click.IntRange(min=0), default=deadman_default,
                     show_default=True, metavar="SECONDS",
                     help="The task loses all egress unless its switch is re-armed within "
                          "this time; 0: no dead-man's switch."),
    ]

    def wrap(command):
        for option in reversed(options):
            command = option(command)
        return command
    return wrap


def _task_rules(purpose_file, match_text, task, mode, resolver, task_address, deadman):
    p = _load_purpose(purpose_file)
    owner = task or p.task
    if owner is None:
        raise Failure("which task is this? give --task, or task = ... in the manifest")
    try:
        effective = p.effective_mode(mode)
        match = ruleset.Match.parse(match_text)
        resolvers = _by_family("--resolver", resolver)
        own = _by_family("--task-address", task_address)
        return ruleset.TaskRules(task=owner, purpose=p, match=match, mode=str(effective),
                                 resolver4=resolvers.get(4), resolver6=resolvers.get(6),
                                 task_addr4=own.get(4), task_addr6=own.get(6),
                                 deadman_seconds=deadman)
    except (ValueError, manifest.ManifestError) as e:
        raise _fail(e)


@rules_group.command("generate", context_settings=CONTEXT)
@task_options(ruleset.DEADMAN_SECONDS)
@click.option("--format", "fmt", type=click.Choice(["nft", "iptables"]), default="nft",
              show_default=True, help="nft: one `nft -f` transaction; iptables: an "
                                      "`ipset restore` part, then an `iptables-restore "
                                      "--noflush` part (IPv4 only).")
@click.option("--resolve-now", is_flag=True,
              help="iptables: resolve the host rules' names now (this host's resolver) and "
                   "write their addresses into the rules, with the time in a comment, "
                   "instead of sets a resolver fills. Wildcard names are left out.")
def generate(purpose_file, match_text, task, mode, resolver, task_address, deadman, fmt,
             resolve_now) -> None:
    """Print the rules enforcing a purpose for one task's traffic.

    Names in host rules are allowed per address as the task's resolver
    answers, so printed rules allow no name until a resolver fills the sets.
    Loading them by hand, give --deadman 0: nothing re-arms the switch.

    \b
    Examples:
      egress rules generate --purpose examples/incident/purpose.toml \\
          --match interface:veth-fix1234 --resolver 10.213.0.1 | nft -c -f -
      egress rules generate --purpose purpose.toml --match uid:1001 --mode enforce \\
          --format iptables
    """
    rules = _task_rules(purpose_file, match_text, task, mode, resolver, task_address, deadman)
    try:
        if fmt == "nft":
            click.echo(ruleset.generate_nft(rules), nl=False)
        else:
            ipset, iptables = ruleset.generate_iptables(
                rules, resolve=_resolve_ipv4 if resolve_now else None)
            click.echo("# ---- part 1: ipset restore -exist ----")
            click.echo(ipset)
            click.echo("# ---- part 2: iptables-restore --noflush ----")
            click.echo(iptables, nl=False)
    except ValueError as e:
        raise _fail(e)


@rules_group.command("apply", context_settings=CONTEXT)
@task_options(0)
@click.option("--resolve-now", is_flag=True,
              help="Resolve the host rules' names now (this host's resolver) and put their "
                   "addresses in the task's sets, for hosts without egress's resolver.")
@click.option("--ttl", type=click.IntRange(min=1), default=3600, show_default=True,
              metavar="SECONDS", help="How long --resolve-now's addresses stay allowed.")
def apply(purpose_file, match_text, task, mode, resolver, task_address, deadman, resolve_now,
          ttl) -> None:
    """Load a task's rules into the kernel (table inet egress), in one transaction,
    touching no other task's; run it again to reload. Needs root.

    \b
    Examples:
      sudo egress rules apply --purpose task.toml --match uid:1001 --resolve-now
      sudo egress rules apply --purpose task.toml --match cgroup:/agents/fix-1234
    """
    from egress.enforce import rulesapply
    from egress.enforce.nft import NftError
    rules = _task_rules(purpose_file, match_text, task, mode, resolver, task_address, deadman)
    try:
        resolved = rulesapply.apply(rules, resolve_now=resolve_now, ttl=ttl)
    except (rulesapply.RulesError, NftError, OSError) as e:
        raise _fail(e)
    click.echo(f"loaded the rules of task {rules.task} for {rules.match} ({rules.mode})")
    for line in resolved:
        click.echo(f"  {line} (for {ttl}s)")


@rules_group.command("remove", context_settings=CONTEXT)
@click.option("--match", "match_text", required=True, metavar="KIND:VALUE",
              help="The match the task's rules were applied with.")
def remove(match_text) -> None:
    """Remove the rules of the task a match dispatches to, in one transaction, touching
    nothing else. Needs root.

    \b
    Examples:
      sudo egress rules remove --match uid:1001
    """
    from egress.enforce import rulesapply
    from egress.enforce.nft import NftError
    try:
        removed = rulesapply.remove(ruleset.Match.parse(match_text))
    except (ValueError, rulesapply.RulesError, NftError, OSError) as e:
        raise _fail(e)
    if not removed:
        raise Failure(f"no task's rules are loaded for {match_text}")
    click.echo("removed: " + "; ".join(removed))
from cli.learn import learn  # noqa: E402
rules_group.add_command(learn)
