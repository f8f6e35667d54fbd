"""What every payload parser of ``egress.identify`` shares: the "need more bytes" answer.

A parser given the first bytes of a stream answers with its result, ``None``
(not this protocol, or malformed), or ``NEED_MORE`` (could still be this
protocol; call again when more bytes have arrived).
"""

from __future__ import annotations

import enum
import typing


class _NeedMore(enum.Enum):
    NEED_MORE = "NEED_MORE"

    def __bool__(self) -> bool:
        # Falsy, so ``if result:`` is true only for a parsed result; tell waiting
        # from "not this protocol" with ``result is NEED_MORE``.
        return False

    def __repr__(self) -> str:
        return "NEED_MORE"

    __str__ = __repr__


NEED_MORE: typing.Final = _NeedMore.NEED_MORE
"""Not enough bytes yet to say; the one instance, compare with ``is``."""

NeedMore = typing.Literal[_NeedMore.NEED_MORE]
"""The type of ``NEED_MORE``, for annotations: ``Foo | None | NeedMore``."""
