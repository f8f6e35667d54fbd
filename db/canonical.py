"""RFC 8785 (JSON Canonicalization Scheme) for the values the ledger hashes.

The ledger hashes rows as the database holds them: every value is null, a
boolean, an integer or a string (sub-records and evidence are JSON *text*,
so their floats are characters, never numbers). On that domain JCS is
exactly ``json.dumps`` with sorted keys, no whitespace and UTF-8 output:

- strings: JCS escapes ``"``, ``\\`` and the controls below U+0020 (``\\b \\t \\n
  \\f \\r`` by name, the rest as ``\\u00xx`` in lower case) and nothing else;
  so does ``json.dumps(ensure_ascii=False)``;
- keys: JCS sorts by UTF-16 code units; ours are ASCII column names, where
  that is Python's order;
- integers: JCS writes numbers as ECMAScript does, which is the plain decimal
  for integers of at most 2**53 - 1. Larger ones are not I-JSON numbers
  (RFC 7493): we hash them as their decimal string, which a reader can redo.

``tests/db/test_ledger_canonical.py`` checks this against the ``rfc8785``
package (Trail of Bits) on generated values; the package itself costs five
times as much per row, more than the ledger's share of a replay allows.
Anything outside the domain (a float, a key that is not ASCII) is refused.
"""

from __future__ import annotations

import json

SAFE = 2**53 - 1
"""The largest integer JCS writes as a plain decimal (ECMAScript's Number.MAX_SAFE_INTEGER)."""

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                           check_circular=False).encode
"""Keys are sorted before (a dict in key order, as db.ledger.record makes them, is kept)."""
_PLAIN = frozenset((str, bool, type(None)))


class CanonicalError(ValueError):
    """A value outside what the ledger hashes."""


def _value(key: str, value):
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return value if -SAFE <= value <= SAFE else str(value)
    raise CanonicalError(f"{key}: cannot hash a {type(value).__name__} (null, booleans, "
                         "integers and strings only)")


def canonical(record: dict) -> bytes:
    """The JCS bytes of a flat object of nulls, booleans, integers and strings."""
    for value in record.values():       # the common case, checked without copying
        kind = type(value)
        if kind not in _PLAIN and not (kind is int and -SAFE <= value <= SAFE):
            record = _clean(record)
            break
    if not "".join(record).isascii():
        _clean(record)                  # raises, naming the key
    keys = list(record)
    if keys != sorted(keys):
        record = {key: record[key] for key in sorted(keys)}
    try:
        return _encode(record).encode("utf-8")
    except UnicodeEncodeError:
        raise CanonicalError("a string is not encodable as UTF-8 (a lone surrogate)") from None


def _clean(record: dict) -> dict:
    clean = {}
    for key, value in record.items():
        if not key.isascii():
            raise CanonicalError(f"{key!r}: keys are ASCII column names")
        clean[key] = _value(key, value)
    return clean
