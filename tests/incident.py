"""The bundled lab incident replayed into a store: real findings for the tests of what
is built on the store (timeline, report)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from cli.main import main

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "examples/lab-incident"
TASK = "deps-install"


def replay_lab_incident(store_url: str) -> str:
    """``egress replay`` of examples/lab-incident into ``store_url``; returns the URL."""
    result = CliRunner().invoke(main, [
        "replay", str(LAB / "incident.pcap"), "--local", "10.99.0.2/32",
        "--purpose", str(LAB / "purpose.toml"), "--db", store_url])
    assert result.exit_code == 10, result.output  # violations found
    return store_url


HOSTILE_TASK = "hostile"
HOSTILE = {
    "purpose": 'Fetch <b>docs</b> & "quotes" <iframe src="https://attacker.example/">',
    "server_name": '<script>console.error("xss server_name")</script>evil.example',
    "banner": '"><img src=x onerror="console.error(\'xss banner\')">',
    "cmdline": "ssh </code><script>console.error('xss cmdline')</script> -R 1:a:2 x",
    "query": "<svg onload=console.error(1)>.example",
}
"""Attacker-controlled text (names, banners, command lines), as the store can hold it."""


def write_hostile_task(store_url: str) -> None:
    """A task whose flows carry markup in every field the traffic or the agent controls."""
    from db import Store
    from egress.records import (DnsInfo, DnsQuery, Finding, ProcessInfo, SshInfo, Step,
                                Verdict)
    from tagging import manifest
    from tests.factories import T0, make_flow
    purpose = manifest.parse(f"version = 1\npurpose = {_toml(HOSTILE['purpose'])}\n",
                             "hostile.toml")
    process = ProcessInfo(pid=31337, exe="/usr/bin/ssh", cmdline=HOSTILE["cmdline"])
    lookup = make_flow(flow_id="f-hostile1", task=HOSTILE_TASK, proto="udp", dport=53,
                       dst="10.213.0.1", app="dns", start=T0, end=T0 + 1000,
                       verdict=Verdict.ALLOW, decided_at=Step.START,
                       dns=DnsInfo(queries=[DnsQuery(name=HOSTILE["query"], type="A",
                                                     answers=["203.0.113.66"], ttl=60,
                                                     rcode="NOERROR")]))
    tunnel = make_flow(
        flow_id="f-hostile2", task=HOSTILE_TASK, dst="203.0.113.66", dport=22, app="ssh",
        start=T0 + 2000, end=T0 + 3_000_000, server_name=HOSTILE["server_name"],
        name_source="dns", verdict=Verdict.FLAG, decided_at=Step.START, process=process,
        ssh=SshInfo(client=HOSTILE["banner"], server="SSH-2.0-x"),
        findings=[Finding.make("undeclared-destination", name=HOSTILE["server_name"],
                               address="203.0.113.66", port=22, transport="tcp"),
                  Finding.make("ssh-egress", client_banner=HOSTILE["banner"],
                               declared_for_ssh=[])])
    with Store.open(store_url) as store:
        store.add_task(HOSTILE_TASK, purpose, T0)
        store.write([lookup, tunnel])


def _toml(text: str) -> str:
    import json
    return json.dumps(text)  # a JSON string is a valid TOML basic string for this text
