"""db.canonical is RFC 8785 on the ledger's values: checked against the rfc8785 package."""

import hashlib

import pytest
import rfc8785
from hypothesis import given, strategies as st

from db.canonical import SAFE, CanonicalError, canonical
from db.ledger import digest, entry_hash, record
from tests.db.test_flows import full_flow
from db import mapping

KEYS = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=12)
VALUES = st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | \
    st.text(st.characters(exclude_categories=["Cs"]))


def reference(obj: dict) -> bytes:
    """rfc8785's bytes, with integers beyond I-JSON as their decimal strings (as we hash them)."""
    return rfc8785.dumps({k: str(v) if isinstance(v, int) and not isinstance(v, bool)
                          and abs(v) > SAFE else v for k, v in obj.items()})


@given(st.dictionaries(KEYS, VALUES, max_size=8))
def test_same_bytes_as_rfc8785(obj):
    assert canonical(obj) == reference(obj)


def test_escapes_and_order_by_the_rfc():
    obj = {"b": "\u2028\x7f\x01\n\"\\é😀", "a": 2**53 - 1, "c": None, "A": True}
    assert canonical(obj) == b'{"A":true,"a":9007199254740991,"b":"\xe2\x80\xa8\x7f\\u0001\\n' \
        b'\\"\\\\\xc3\xa9\xf0\x9f\x98\x80","c":null}'
    assert canonical(obj) == reference(obj)


@pytest.mark.parametrize("bad", [{"x": 1.5}, {"x": [1]}, {"é": 1}, {"x": "\ud800"}])
def test_outside_the_domain_is_refused(bad):
    with pytest.raises(CanonicalError):
        canonical(bad)


def test_a_flow_row_with_float_evidence_hashes_as_stored_text():
    row, _ = mapping.flow_row(full_flow(), None)
    rec = record("flows", dict(row, id=1))
    assert "latest" not in rec and rec["tls"].startswith("{")
    assert digest(rec) == hashlib.sha256(rfc8785.dumps(rec)).hexdigest()


OPTIONAL = st.none() | st.text(st.characters(exclude_categories=["Cs"]), max_size=10)


@given(st.text(max_size=10), st.integers(0, 2**53 - 1), OPTIONAL)
def test_entry_hash_is_sha256_of_the_canonical_header(host, seq, task):
    header = {"host": host, "seq": seq, "prev": "00", "time": 7, "op": "insert",
              "task": task, "key": "k1", "digest": "ab"}
    expected = hashlib.sha256(reference(header)).hexdigest()
    assert entry_hash(host, seq, "00", 7, "insert", task, "k1", "ab") == expected
