"""The task's resolver in the closed lab, asked by real dig, forwarding to real dnsmasq.

The resolver runs in the lab's task-host namespace on the host's address (and
::1), its upstream the fake internet's dnsmasq. What must hold with real
tools: an allowed name resolves over UDP and TCP, and only after the
admitting callback returned; a refused name gets NXDOMAIN and never leaves the
host: dnsmasq never logs it, and no packet on the host's interface carries it.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

from scapy.all import rdpcap

from tests.lab.lab import LINK_HOST, LINK_NET

ROOT = Path(__file__).resolve().parents[2]
HOLD_S = 0.3
"""How long the runner's admitting callback takes: the answer must wait for it."""

PURPOSE = """version = 1
purpose = "Install from the lab's package index"
task = "lab-resolver"

[[allow]]
host = "pypi.lab"

[[allow]]
host = "*.files.lab"

[[allow]]
host = "inside.lab"
"""

# The resolver as `egress run` would hold it, with callbacks that write JSON lines.
RUNNER = textwrap.dedent('''
    import dataclasses, json, signal, sys, threading, time
    sys.path.insert(0, {root!r})
    from egress.enforce.resolver import Resolver
    from tagging import manifest

    out = open({out!r}, "a", buffering=1)
    lock = threading.Lock()

    def write(kind, data):
        with lock:
            out.write(json.dumps({{"kind": kind, **data}}) + "\\n")

    def on_allow(name, addresses):
        time.sleep({hold})
        write("allow", {{"name": name, "addresses": addresses}})

    listen = [tuple(json.loads(a)) for a in sys.argv[1:]]
    resolver = Resolver(manifest.load({purpose!r}), "lab-resolver", listen, ({upstream!r}, 53),
                        on_allow=on_allow,
                        on_event=lambda e: write("task-event", e.to_json()),
                        on_binding=lambda b: write("binding", dataclasses.asdict(b)))
    resolver.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print("ready", resolver.addresses, flush=True)
    done.wait()
    resolver.stop()
    write("counters", resolver.counters)
''')


def start_resolver(lab, tmp_path, listen):
    (tmp_path / "purpose.toml").write_text(PURPOSE)
    out = tmp_path / "resolver.jsonl"
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(root=str(ROOT), out=str(out), hold=HOLD_S,
                                    purpose=str(tmp_path / "purpose.toml"), upstream=LINK_NET))
    proc = lab.spawn("host", sys.executable, script, *[json.dumps(a) for a in listen],
                     log="resolver.log")
    lab.wait_log("resolver.log", "ready")
    return proc, out


def dig(lab, server, name, *opts):
    got = lab.host("dig", f"@{server}", name, "A", "+time=5", "+tries=1", *opts)
    status = re.search(r"status: (\w+)", got.stdout).group(1)
    answers = re.findall(r"^\S+\s+\d+\s+IN\s+A\s+(\S+)$", got.stdout, re.M)
    query_ms = int(re.search(r"Query time: (\d+) msec", got.stdout).group(1))
    return status, answers, query_ms


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_real_dig_through_the_task_resolver(lab, tmp_path):
    lab.start_dns({"pypi.lab": "203.0.113.10", "mirror.files.lab": "198.51.100.20",
                   "inside.lab": "10.1.2.3", "secret-token.evil.lab": "198.51.100.66"})
    has_v6 = "::1" in lab.host("ip", "-6", "addr", "show", "dev", "lo", check=False).stdout
    listen = [(LINK_HOST, 53)] + ([("::1", 53)] if has_v6 else [])
    proc, out = start_resolver(lab, tmp_path, listen)

    with lab.recording() as capture:
        udp = dig(lab, LINK_HOST, "pypi.lab")
        tcp = dig(lab, LINK_HOST, "MIRROR.files.lab", "+tcp")
        inside = dig(lab, LINK_HOST, "inside.lab")
        refused_udp = dig(lab, LINK_HOST, "secret-token.evil.lab")
        refused_tcp = dig(lab, LINK_HOST, "secret-token.evil.lab", "+tcp")
        refused_wild = dig(lab, LINK_HOST, "files.lab")     # "*." does not cover the suffix
        v6 = dig(lab, "::1", "pypi.lab", "+tcp") if has_v6 else None
    lab.stop(proc)

    assert udp[:2] == ("NOERROR", ["203.0.113.10"]) and tcp[:2] == ("NOERROR", ["198.51.100.20"])
    assert udp[2] >= HOLD_S * 1000 and tcp[2] >= HOLD_S * 1000    # held for the callback
    assert inside[:2] == ("NOERROR", [])          # a private address is never handed out
    for status, answers, _ in (refused_udp, refused_tcp, refused_wild):
        assert (status, answers) == ("NXDOMAIN", [])
    if v6:
        assert v6[:2] == ("NOERROR", ["203.0.113.10"])

    # The refused names never left the host: dnsmasq never heard them, nor did the wire.
    served = (tmp_path / "dnsmasq.log").read_text()
    assert "query[A] pypi.lab from 10.99.0.2" in served
    assert "mirror.files.lab" in served and "inside.lab" in served
    assert "secret-token" not in served and not re.search(r"query\[\w+\] files\.lab ", served)
    packets = [bytes(p) for p in rdpcap(str(capture))]
    dns_out = [p for p in packets if b"\x04pypi\x03lab\x00" in p]
    assert dns_out, "the capture saw no DNS at all: it would prove nothing"
    assert not any(b"secret-token" in p for p in packets)
    assert not any(re.search(rb"(?<!\x06mirror)\x05files\x03lab\x00", p) for p in packets)

    got = records(out)
    allowed = [r for r in got if r["kind"] == "allow"]
    assert [(r["name"], r["addresses"]) for r in allowed][:2] == [
        ("pypi.lab", [["203.0.113.10", 30]]), ("mirror.files.lab", [["198.51.100.20", 30]])]
    bindings = {(r["name"], r["address"], r["resolver"], r["resolver_port"])
                for r in got if r["kind"] == "binding"}
    assert ("pypi.lab", "203.0.113.10", LINK_HOST, 53) in bindings
    events = [r for r in got if r["kind"] == "task-event"]
    assert [(e["event"], e["findings"][0]["evidence"]["name"]) for e in events] == [
        ("dns-refused", "secret-token.evil.lab"), ("dns-refused", "secret-token.evil.lab"),
        ("dns-refused", "files.lab")]
    (counters,) = [r for r in got if r["kind"] == "counters"]
    assert counters["refused"] == 3 and counters["dropped_addresses"] == 1
    assert counters["forwarded"] == 3 + bool(v6) and counters["upstream_tcp"] == 1 + bool(v6)
    assert counters["servfail"] == 0 and counters["malformed"] == 0
