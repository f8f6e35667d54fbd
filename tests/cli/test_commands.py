"""The commands, in-process with CliRunner: output, exit statuses, one-line errors."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main
from egress.records import FlowRecord, TaskEvent, read_record, format_time

ROOT = Path(__file__).resolve().parents[2]
PURPOSE = str(ROOT / "examples/incident/purpose.toml")
FLOWS = str(ROOT / "examples/incident/flows.jsonl")


def run(*args, env=None):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture
def filled(store_url):
    """A store filled by replaying the bundled incident."""
    result = run("replay", FLOWS, "--purpose", PURPOSE, "--db", store_url)
    assert result.exit_code == 10, result.output
    return store_url


def test_purpose_check_prints_effective_rules():
    result = run("purpose", "check", PURPOSE)
    assert result.exit_code == 0
    assert "ci.billing.example" in result.output and "profile pypi allow[0]" in result.output
    assert "\x1b[" not in result.output  # plain when not a terminal


def test_purpose_check_refuses_loosening():
    result = run("purpose", "check", PURPOSE, "--mode", "audit")
    assert result.exit_code == 0
    enforce = ROOT / "tests/cli/enforce.toml"
    result = run("purpose", "check", enforce, "--mode", "audit")
    assert result.exit_code == 1 and "may not loosen" in result.output


def test_bad_manifest_is_one_line_exit_1(tmp_path):
    bad = tmp_path / "task.toml"
    bad.write_text('version = 1\npurpose = "x"\n[[allow]]\nhost = "a.example"\nports = [0]\n')
    result = run("purpose", "check", bad)
    assert result.exit_code == 1
    assert result.output == f"egress: {bad}: allow[0].ports: 0 is not a port (1-65535)\n"


def test_profiles():
    listing = run("profiles")
    assert listing.exit_code == 0
    for name in ("dns", "pypi", "npm", "github", "openai"):
        assert f"\n{name} " in listing.output
    one = run("profiles", "pypi")
    assert "files.pythonhosted.org" in one.output and "source:" in one.output
    missing = run("profiles", "nope")
    assert missing.exit_code == 1 and "no built-in profile 'nope'" in missing.output


def test_replay_json_lines_follow_the_contract():
    result = run("replay", FLOWS, "--purpose", PURPOSE, "--no-store", "--json")
    assert result.exit_code == 10
    records = [read_record(json.loads(line), strict=True) for line in result.output.splitlines()]
    flows = [r for r in records if isinstance(r, FlowRecord)]
    events = [r for r in records if isinstance(r, TaskEvent)]
    assert len(flows) == len(Path(FLOWS).read_text().splitlines())
    assert [e.event for e in events] == ["task-started", "task-ended"]
    by_id = {f.flow_id: f for f in flows}
    assert {f.id for f in by_id["f-incid012"].findings} >= {"mining-stratum"}


def test_replay_enforce_blocks(tmp_path):
    result = run("replay", FLOWS, "--purpose", PURPOSE, "--mode", "enforce", "--no-store",
                 "--json")
    verdicts = {json.loads(l)["flow_id"]: json.loads(l).get("verdict")
                for l in result.output.splitlines() if '"kind":"flow"' in l}
    assert verdicts["f-incid010"] == "block"    # SSH to an undeclared relay
    assert verdicts["f-incid002"] == "allow"    # PyPI over TLS


def test_replay_not_a_flow_log(tmp_path):
    junk = tmp_path / "junk.jsonl"
    junk.write_text("this is not json\n")
    result = run("replay", junk, "--purpose", PURPOSE, "--no-store")
    assert result.exit_code == 1
    assert result.output.startswith(f"egress: {junk}: neither a capture")
    assert result.output.count("\n") == 1
    almost = tmp_path / "almost.jsonl"
    almost.write_text('{"kind": "flow"}\n')
    result = run("replay", almost, "--purpose", PURPOSE, "--no-store")
    assert result.exit_code == 1
    assert result.output.startswith(f"egress: {almost}: not a flow log (line 1")


def test_replay_counts_and_skips_bad_lines(tmp_path):
    log = tmp_path / "flows.jsonl"
    log.write_text(Path(FLOWS).read_text() + "{broken\n" + '{"kind": "flow", "schema": 1}\n')
    result = run("replay", log, "--purpose", PURPOSE, "--no-store")
    assert result.exit_code == 10
    assert "skipped 1 input record(s): invalid JSON" in result.output
    assert "skipped 1 input record(s): not a flow record" in result.output


def test_audit_json_parses_against_the_contract(filled):
    result = run("audit", "--db", filled, "--json")
    assert result.exit_code == 10
    lines = result.output.splitlines()
    records = [read_record(json.loads(line), strict=True) for line in lines]
    flows = [r for r in records if isinstance(r, FlowRecord)]
    assert len(flows) == len(Path(FLOWS).read_text().splitlines())
    assert all(json.loads(line)["schema"] == 1 for line in lines)
    assert all(f.verdict is not None and f.decided_at is not None for f in flows)


def test_audit_filters(filled):
    def listed(*args):
        result = run("audit", "--db", filled, "--json", "--no-events", *args)
        return result.exit_code, [json.loads(l)["flow_id"] for l in result.output.splitlines()]

    code, ids = listed("--finding", "mining-stratum")
    assert (code, ids) == (10, ["f-incid012"])
    code, ids = listed("--verdict", "allow")
    assert code == 0 and "f-incid002" in ids and "f-incid010" not in ids
    code, ids = listed("--task", "someone-else")
    assert (code, ids) == (0, [])
    code, ids = listed("--since", "2026-03-11T02:15:00Z")   # flows still open then
    assert "f-incid010" in ids and "f-incid002" not in ids
    code, ids = listed("--until", "2026-03-11T02:10:01Z")
    assert ids == ["f-incid001", "f-incid002"]


def test_audit_table_is_plain(filled):
    result = run("audit", "--db", filled, env={"NO_COLOR": "1"})
    assert result.exit_code == 10
    assert "\x1b[" not in result.output
    assert "mining-stratum" in result.output and "task-started" in result.output


def test_audit_bad_time_is_usage_error(filled):
    result = run("audit", "--db", filled, "--since", "yesterday")
    assert result.exit_code == 2 and "neither a duration" in result.output


def test_explain(filled):
    result = run("explain", "f-incid010", "--db", filled)
    assert result.exit_code == 0
    out = result.output
    assert "ssh-egress" in out and "undeclared-destination" in out
    assert "relay.example -> 198.51.100.7" in out          # the DNS binding used
    assert "decided at" in out
    missing = run("explain", "f-nothere", "--db", filled)
    assert missing.exit_code == 1 and "no flow 'f-nothere'" in missing.output


def test_completion_script():
    result = run("completion", "bash")
    assert result.exit_code == 0 and "_EGRESS_COMPLETE" in result.output


def test_every_command_has_an_example():
    for name, command in main.commands.items():
        sub = getattr(command, "commands", None)
        for cmd in (sub.values() if sub else [command]):
            assert "Example" in (cmd.help or ""), f"{name} {cmd.name} has no example"


def test_bad_config_is_one_line(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("nonsense = 1\n")
    result = run("--config", cfg, "profiles")
    assert result.exit_code == 1 and result.output.startswith(f"egress: {cfg}: nonsense: ")


CAPTURE = ROOT / "examples/incident/incident.pcap"


def _findings(output: str) -> list:
    return sorted(f["id"] for line in output.splitlines()
                  for f in json.loads(line)["findings"] if json.loads(line)["kind"] == "flow")


def test_capture_and_flow_log_of_the_incident_judge_alike():
    from_capture = run("replay", CAPTURE, "--purpose", PURPOSE, "--no-store", "--json")
    from_log = run("replay", FLOWS, "--purpose", PURPOSE, "--no-store", "--json")
    assert from_capture.exit_code == from_log.exit_code == 10
    # The same ids; counts may differ where the stories' shapes do (the log's pool
    # connection lasts 48 minutes: mining-shaped as well as a known pool's name).
    assert set(_findings(from_capture.output)) == set(_findings(from_log.output))
    flows = [json.loads(l) for l in from_capture.output.splitlines() if '"kind":"flow"' in l]
    assert all(f["community_id"].startswith("1:") for f in flows)
    ssh = [f for f in flows if f["app"] == "ssh"]
    assert ssh and ssh[0]["ssh"]["hassh"] and ssh[0]["ssh"]["hassh_server"]


def test_replaying_a_capture_twice_supersedes(store_url):
    for _ in range(2):
        assert run("replay", CAPTURE, "--purpose", PURPOSE, "--db", store_url).exit_code == 10
    listed = run("audit", "--db", store_url, "--json", "--no-events")
    assert len(listed.output.splitlines()) == 15


def test_truncated_capture_ends_cleanly_with_a_warning(tmp_path):
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(CAPTURE.read_bytes()[:-700])
    result = run("replay", cut, "--purpose", PURPOSE, "--no-store")
    assert result.exit_code == 10
    assert f"warning: {cut}: cut off inside a packet" in result.output


def test_broken_gzip_is_one_line(tmp_path):
    bad = tmp_path / "bad.pcap.gz"
    bad.write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    result = run("replay", bad, "--purpose", PURPOSE, "--no-store")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith(f"egress: {bad}: ")


def test_captures_and_flow_logs_do_not_mix():
    result = run("replay", CAPTURE, FLOWS, "--purpose", PURPOSE, "--no-store")
    assert result.exit_code == 1 and "not both" in result.output


def test_a_purpose_needs_a_task(tmp_path):
    anonymous = tmp_path / "p.toml"
    anonymous.write_text('version = 1\npurpose = "no task named"\n')
    result = run("replay", CAPTURE, "--purpose", anonymous, "--no-store")
    assert result.exit_code == 1 and "--task" in result.output
    assert run("replay", CAPTURE, "--purpose", anonymous, "--task", "t9",
               "--no-store").exit_code == 10


def test_explain_by_filter(filled):
    result = run("explain", "--finding", "metadata-endpoint", "--db", filled)
    assert result.exit_code == 0 and result.output.count("flow f-") == 1
    assert "169.254.169.254" in result.output
    assert run("explain", "--db", filled).exit_code == 2


def test_reading_a_missing_store_is_an_error(tmp_path):
    result = run("audit", "--db", tmp_path / "none.db")
    assert result.exit_code == 1 and "no store at" in result.output
    assert not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("content, problem", [
    (b"", "empty"),
    (bytes(range(256)) * 4, "neither a capture"),
])
def test_inputs_that_are_neither(tmp_path, content, problem):
    path = tmp_path / "input"
    path.write_bytes(content)
    result = run("replay", path, "--purpose", PURPOSE, "--no-store")
    assert result.exit_code == 1 and problem in result.output and result.output.count("\n") == 1


def test_gzipped_flow_log(tmp_path):
    import gzip
    packed = tmp_path / "flows.gz"
    packed.write_bytes(gzip.compress(Path(FLOWS).read_bytes()))
    result = run("replay", packed, "--purpose", PURPOSE, "--no-store", "--json")
    assert result.exit_code == 10
    assert sum('"kind":"flow"' in l for l in result.output.splitlines()) == 15


def test_impossible_flow_log_values_are_counted_and_skipped(tmp_path):
    lines = Path(FLOWS).read_text().splitlines()
    bad = json.loads(lines[1])
    bad.update(sport=70000)
    log = tmp_path / "flows.jsonl"
    log.write_text("\n".join(lines + [json.dumps(bad)]) + "\n")
    result = run("replay", log, "--purpose", PURPOSE, "--no-store")
    assert "skipped 1 input record(s): not a flow record (flow.sport)" in result.output


def test_the_same_capture_for_two_tasks_keeps_both(store_url):
    for task in ("task-a", "task-b"):
        assert run("replay", CAPTURE, "--purpose", PURPOSE, "--task", task,
                   "--db", store_url).exit_code == 10
    for task in ("task-a", "task-b"):
        listed = run("audit", "--db", store_url, "--task", task, "--json", "--no-events")
        assert len(listed.output.splitlines()) == 15, task


def test_tasks_file_splits_a_capture_by_time(tmp_path, store_url):
    (tmp_path / "later.toml").write_text('version = 1\npurpose = "nothing declared"\n')
    (tmp_path / "upgrade.toml").write_text(Path(PURPOSE).read_text())
    tasks = tmp_path / "tasks.toml"
    tasks.write_text('[[task]]\nid = "upgrade"\npurpose = "upgrade.toml"\n'
                     'end = "2026-03-11T02:04:00Z"\n'
                     '[[task]]\nid = "later"\npurpose = "later.toml"\n'
                     'start = "2026-03-11T02:04:00Z"\n')
    result = run("replay", CAPTURE, "--tasks", tasks, "--local", "10.213.0.0/24",
                 "--db", store_url)
    assert result.exit_code == 10, result.output

    def listed(task):
        out = run("audit", "--db", store_url, "--task", task, "--json", "--no-events").output
        return [json.loads(line) for line in out.splitlines()]
    early, late = listed("upgrade"), listed("later")
    assert len(early) == 8 and all(f["verdict"] == "allow" for f in early)
    assert len(late) == 7 and all(f["verdict"] == "flag" for f in late)
    assert run("replay", CAPTURE, "--tasks", tasks, "--purpose", PURPOSE,
               "--no-store").exit_code == 2


def test_inbound_flows_are_recorded_not_judged(tmp_path):
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    them, host = "203.0.113.9", "10.213.0.2"
    packets = [eth / IP(src=them, dst=host) / TCP(sport=50000, dport=22, flags="S", seq=1),
               eth / IP(src=host, dst=them) / TCP(sport=22, dport=50000, flags="SA", seq=9,
                                                  ack=2),
               eth / IP(src=host, dst=them) / TCP(sport=22, dport=50000, flags="PA", seq=10,
                                                  ack=2) / b"SSH-2.0-OpenSSH_9.2p1\r\n"]
    for i, p in enumerate(packets):
        p.time = 1_773_194_400 + i
    cap = tmp_path / "inbound.pcap"
    wrpcap(str(cap), packets)
    local = run("replay", cap, "--purpose", PURPOSE, "--local", "10.213.0.0/24", "--no-store",
                "--json")
    flow = next(json.loads(l) for l in local.output.splitlines() if '"kind":"flow"' in l)
    assert flow["direction"] == "inbound" and flow["verdict"] == "allow"
    assert flow["findings"] == [] and flow["src"] == them
    assert local.exit_code == 0
    blind = run("replay", cap, "--purpose", PURPOSE, "--no-store", "--json")
    assert blind.exit_code == 10      # without --local, nothing says it came in


LAB_DEMO = ROOT / "examples/lab-incident"


def test_the_lab_recorded_demo(store_url):
    result = run("replay", LAB_DEMO / "incident.pcap", "--local", "10.99.0.2/32",
                 "--purpose", LAB_DEMO / "purpose.toml", "--db", store_url)
    assert result.exit_code == 10
    listed = run("audit", "--db", store_url, "--task", "deps-install", "--json", "--no-events")
    flows = [json.loads(line) for line in listed.output.splitlines()]
    by_app = {}
    for f in flows:
        by_app.setdefault(f["app"], []).append(f)
    # the package index: allowed, clean
    index = [f for f in by_app["tls"] if f["tls"]["sni"] in ("pypi.org", "files.pythonhosted.org")]
    assert {f["tls"]["sni"] for f in index} == {"pypi.org", "files.pythonhosted.org"}
    assert all(f["verdict"] == "allow" and not f["findings"] for f in index)
    assert all(f["verdict"] == "allow" for f in by_app["dns"])
    # the tunnel over 443 and the miner: found
    (tunnel,) = by_app["ssh"]
    assert tunnel["dport"] == 443 and tunnel["server_name"] == "relay.example"
    assert {x["id"] for x in tunnel["findings"]} >= {"reverse-ssh-tunnel", "ssh-egress"}
    (miner,) = by_app["stratum"]
    assert {x["id"] for x in miner["findings"]} >= {"mining-stratum", "mining-pool"}
    explained = run("explain", "--finding", "reverse-ssh-tunnel", "--db", store_url)
    assert "server_first_exchanges=" in explained.output
