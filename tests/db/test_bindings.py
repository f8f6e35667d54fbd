"""DNS bindings: what the task resolved an address from, newest first."""

from db import NameBinding
from tests.factories import T0


def test_bindings_for_is_newest_first_and_scoped(store):
    addr = "203.0.113.10"
    rows = [NameBinding("t1", f"n{i}.example", addr, 300, T0 + i, f"f-dns{i:05d}") for i in range(8)]
    noise = [NameBinding("t2", "other.example", addr, 300, T0 + 3),
             NameBinding("t1", "elsewhere.example", "203.0.113.11", 60, T0 + 3),
             NameBinding(None, "untagged.example", addr, 60, T0 + 3)]
    store.add_bindings(noise[:2] + rows[::-1] + noise[2:])
    got = store.bindings_for("t1", addr, before=T0 + 5)
    assert got == [rows[5], rows[4], rows[3], rows[2], rows[1]]
    assert store.bindings_for("t1", addr, before=T0 + 100, limit=2) == [rows[7], rows[6]]
    assert store.bindings_for("t1", addr, before=T0 - 1) == []
    assert store.bindings_for(None, addr, before=T0 + 100) == [noise[2]]
    assert store.bindings_for("t2", addr, before=T0 + 100) == [noise[0]]


def test_same_time_is_newest_written_first(store):
    a = NameBinding("t1", "a.example", "198.51.100.1", 30, T0)
    b = NameBinding("t1", "b.example", "198.51.100.1", 30, T0)
    store.add_bindings([a])
    store.add_bindings([b])
    assert store.bindings_for("t1", "198.51.100.1", before=T0) == [b, a]


def test_no_bindings_is_a_no_op(store):
    store.add_bindings([])
    assert store.bindings_for("t1", "198.51.100.1", before=T0) == []
