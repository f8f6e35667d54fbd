"""Tasks and capture runs."""

import pytest

from db import StoreError
from tests.db.purposes import make_purpose
from tests.factories import T0


def test_task_round_trips_with_its_expanded_purpose(store):
    purpose = make_purpose()
    store.add_task("fix-1234", purpose, T0)
    task = store.task("fix-1234")
    assert task.id == "fix-1234" and task.started == T0 and task.ended is None
    assert task.sha256 == purpose.sha256 and task.mode == "audit"
    assert task.purpose.to_json() == purpose.to_json()
    assert task.purpose.rules == purpose.rules
    assert store.task("other") is None


def test_mode_tightened_by_the_command_line_is_stored(store):
    store.add_task("t1", make_purpose(), T0, mode="enforce")
    assert store.task("t1").mode == "enforce"


def test_adding_the_same_task_again_is_a_no_op(store):
    purpose = make_purpose()
    store.add_task("t1", purpose, T0)
    store.add_task("t1", make_purpose(), T0 + 5)
    assert [(t.id, t.started) for t in store.tasks()] == [("t1", T0)]


def test_same_task_with_another_purpose_is_refused(store):
    store.add_task("t1", make_purpose(), T0)
    with pytest.raises(StoreError, match="task t1 is already in the store with another purpose"):
        store.add_task("t1", make_purpose(host="github.com"), T0)
    assert store.task("t1").purpose.rules[0].host == "pypi.org"


def test_purposes_built_in_code_compare_by_content(store):
    import dataclasses
    purpose = dataclasses.replace(make_purpose(), sha256=None)
    store.add_task("t1", purpose, T0)
    store.add_task("t1", purpose, T0)
    with pytest.raises(StoreError):
        store.add_task("t1", dataclasses.replace(purpose, purpose="something else"), T0)


def test_bad_task_id_is_refused(store):
    with pytest.raises(StoreError, match="not a task id"):
        store.add_task("-bad id", make_purpose(), T0)


def test_end_task_and_list_in_start_order(store):
    store.add_task("late", make_purpose(), T0 + 10)
    store.add_task("early", make_purpose("Other", host="github.com"), T0)
    store.end_task("early", T0 + 99)
    assert [(t.id, t.ended) for t in store.tasks()] == [("early", T0 + 99), ("late", None)]
    with pytest.raises(StoreError, match="no task nope"):
        store.end_task("nope", T0)


def test_capture_run_round_trips(store):
    run = store.add_capture_run("live", ["veth-t1", "nflog:7"], T0, "0.1.0")
    other = store.add_capture_run("replay", ["a.pcap"], T0 + 1, "0.1.0")
    assert run != other
    got = store.capture_run(run)
    assert (got.kind, got.sources, got.started, got.ended, got.counters) == (
        "live", ["veth-t1", "nflog:7"], T0, None, None)
    counters = {"packets": 10, "flows": 2, "malformed": {"truncated": 1},
                "lost": {"socket overrun": 3}}
    store.finish_capture_run(run, T0 + 50, counters)
    got = store.capture_run(run)
    assert (got.ended, got.counters, got.version) == (T0 + 50, counters, "0.1.0")
    assert store.capture_run(other).ended is None
    assert store.capture_run(other + 100) is None


def test_capture_run_kind_and_unknown_id_are_refused(store):
    with pytest.raises(StoreError):
        store.add_capture_run("tap", [], T0, "0.1.0")
    with pytest.raises(StoreError, match="no capture run"):
        store.finish_capture_run(12345, T0, {})


def test_task_linked_to_a_missing_capture_run_is_refused(store):
    # Foreign keys hold on SQLite too (turned on per connection).
    with pytest.raises(StoreError):
        store.add_task("t1", make_purpose(), T0, capture_run_id=999)
    assert store.tasks() == []
