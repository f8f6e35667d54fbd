"""Attribution of captured flows: the task host's side, tasks by address and time."""

import pytest

from egress.records import parse_time
from tagging.attribution import Attribution, TasksError, load_tasks, parse_networks
from tagging.manifest import ManifestError

PURPOSE = 'version = 1\npurpose = "test"\n'
T = parse_time("2026-03-11T02:00:00Z")


def write_tasks(tmp_path, text: str):
    (tmp_path / "p.toml").write_text(PURPOSE)
    path = tmp_path / "tasks.toml"
    path.write_text(text)
    return path


def test_tasks_by_source_and_window(tmp_path):
    specs = load_tasks(write_tasks(tmp_path, '''
[[task]]
id = "early"
purpose = "p.toml"
sources = ["10.0.0.2"]
end = "2026-03-11T02:30:00Z"

[[task]]
id = "late"
purpose = "p.toml"
sources = ["10.0.0.0/24"]
start = 2026-03-11T02:30:00Z
'''))
    who = Attribution(tasks=specs, local=parse_networks(["10.0.0.0/24"]))
    assert who.owner("10.0.0.2", "203.0.113.1", T) == "early"
    assert who.owner("10.0.0.2", "203.0.113.1", T + 3600 * 10**6) == "late"
    assert who.owner("10.0.0.3", "203.0.113.1", T) is None        # in no task's window
    assert who.owner("192.0.2.9", "203.0.113.1", T) is None       # not the task host
    assert who.direction("203.0.113.1", "10.0.0.2") == "inbound"
    assert who.direction("10.0.0.2", "203.0.113.1") == "outbound"
    assert who.owner("203.0.113.1", "10.0.0.2", T) == "early"     # inbound to the task's host


def test_one_task_without_a_file():
    who = Attribution(task="t1")
    assert who.owner("192.0.2.1", "192.0.2.2", T) == "t1"
    assert who.direction("192.0.2.1", "192.0.2.2") == "outbound"


@pytest.mark.parametrize("text, key", [
    ('[[task]]\nid = "a"\npurpose = "p.toml"\ncolour = 1\n', "task[0].colour"),
    ('[[task]]\npurpose = "p.toml"\n', "task[0].id"),
    ('[[task]]\nid = "a b"\npurpose = "p.toml"\n', "task[0].id"),
    ('[[task]]\nid = "a"\npurpose = "p.toml"\nsources = ["10.0.0.1/8"]\n', "task[0].sources"),
    ('[[task]]\nid = "a"\npurpose = "p.toml"\nstart = "yesterday"\n', "task[0].start"),
    ('[[task]]\nid = "a"\npurpose = "p.toml"\nstart = "2026-03-11T03:00:00Z"\n'
     'end = "2026-03-11T02:00:00Z"\n', "task[0].end"),
    ('[[task]]\nid = "a"\npurpose = "p.toml"\n[[task]]\nid = "a"\npurpose = "p.toml"\n',
     "task[1].id"),
    ('tasks = 1\n', "tasks"),
])
def test_bad_tasks_file_names_the_key(tmp_path, text, key):
    path = write_tasks(tmp_path, text)
    with pytest.raises(TasksError) as info:
        load_tasks(path)
    assert str(info.value).startswith(f"{path}: {key}: ")


def test_a_bad_purpose_in_a_tasks_file_names_its_file(tmp_path):
    path = write_tasks(tmp_path, '[[task]]\nid = "a"\npurpose = "missing.toml"\n')
    with pytest.raises(ManifestError, match="missing.toml"):
        load_tasks(path)
