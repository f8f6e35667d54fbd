"""egress verify, checkpoint and prune from the command line."""

import json
import time

import pytest
import sqlalchemy as sa

from db.engine import make_engine
from egress.records import format_time
from tests.cli.test_commands import FLOWS, PURPOSE, run


@pytest.fixture
def filled(store_url):
    assert run("replay", FLOWS, "--purpose", PURPOSE, "--db", store_url).exit_code == 10
    return store_url


def sql(url: str, statement: str) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(statement))
    engine.dispose()


def test_an_untouched_store_verifies(filled):
    result = run("verify", "--db", filled)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ledger ok: ") and "every one signed and covered" in \
        result.output


def test_an_edit_is_one_line_naming_the_entry(filled):
    sql(filled, "UPDATE flows SET dport = 444 WHERE id = (SELECT min(id) FROM flows)")
    result = run("verify", "--db", filled)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert result.output.startswith("egress: ledger: entry ")
    assert "(insert of flows row " in result.output and "(the row was edited)" in result.output


def test_checkpoints_round_trip_and_catch_a_cut_tail(filled, tmp_path):
    cps = tmp_path / "cp.jsonl"
    result = run("checkpoint", "--db", filled, "-o", cps)
    assert result.exit_code == 0
    line = json.loads(cps.read_text())
    assert line["kind"] == "ledger-checkpoint" and result.output.strip() == cps.read_text().strip()
    ok = run("verify", "--db", filled, "--checkpoints", cps)
    assert ok.exit_code == 0 and "checkpoints ok: 1 of 1 match the store" in ok.output, \
        ok.output
    sql(filled, f"DELETE FROM ledger WHERE seq = {line['seq']}")
    sql(filled, "UPDATE capture_runs SET ended = NULL, counters = NULL")
    assert run("verify", "--db", filled).exit_code == 0
    bad = run("verify", "--db", filled, "--checkpoints", cps)
    assert bad.exit_code == 1 and "are gone: checkpoint" in bad.output


def test_prune_writes_a_checkpoint_first_and_verify_still_passes(filled, tmp_path):
    cps = tmp_path / "cp.jsonl"
    time.sleep(0.002)
    result = run("prune", "--before", format_time(time.time_ns() // 1000), "--db", filled,
                 "--checkpoints", cps)
    assert result.exit_code == 0, result.output
    assert json.loads(cps.read_text())["kind"] == "ledger-checkpoint"
    assert "pruned what was written before" in result.output
    with make_engine(filled).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM flows")).scalar_one() == 0
    ok = run("verify", "--db", filled, "--checkpoints", cps)
    assert ok.exit_code == 0, ok.output
    assert "checkpoints ok: 1 of 1" in ok.output


def test_bad_input_is_one_line(filled, tmp_path):
    cps = tmp_path / "cp.jsonl"
    cps.write_text('{"kind": "ledger-checkpoint", "schema": 1}\n')
    result = run("verify", "--db", filled, "--checkpoints", cps)
    assert result.exit_code == 1
    assert result.output == f"egress: {cps}:1: missing hash, host, key, mac, seq, time\n"
    missing = run("verify", "--db", filled, "--key", tmp_path / "nokey")
    assert missing.exit_code == 1 and missing.output.startswith("egress: no ledger key file at")
    assert run("prune", "--db", filled).exit_code == 2
    nothing = run("verify", "--db", filled, "--task", "no-such-task")
    assert (nothing.exit_code, nothing.output) == (1, "egress: no rows of task no-such-task in "
                                                      "the store\n")


def test_task_scope(filled):
    result = run("verify", "--db", filled, "--task", "deploy-speedup")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ledger ok: task deploy-speedup: ")


def test_prune_sends_its_checkpoint_to_syslog_and_the_journal_lines_verify(filled, tmp_path,
                                                                         monkeypatch):
    """A real unix datagram socket stands where /dev/log (journald, rsyslog) would be: what
    arrives there is what the journal keeps, and `journalctl -o cat`-style lines of it (the
    syslog prefix before the JSON) are a checkpoint file `verify` reads."""
    import socket
    log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    log.bind(str(tmp_path / "log"))
    log.settimeout(5)
    monkeypatch.setenv("EGRESS_SYSLOG", str(tmp_path / "log"))
    try:
        pruned = run("prune", "--db", filled, "--before", "2000-01-01T00:00:00Z",
                     "--checkpoints", tmp_path / "file.jsonl")
        assert pruned.exit_code == 0, pruned.output
        message = log.recv(65536).decode()
    finally:
        log.close()
    assert message.startswith("<28>egress[") and '"kind":"ledger-checkpoint"' in message
    journal = tmp_path / "journal.txt"
    journal.write_text(message.split(">", 1)[1] + "\n")         # egress[PID]: {...}
    ok = run("verify", "--db", filled, "--checkpoints", journal)
    assert ok.exit_code == 0 and "checkpoints ok: 1 of 1 match the store" in ok.output, \
        ok.output
