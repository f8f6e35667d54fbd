"""encrypted-client-hello: ECH hides the real server name from the judge."""

from __future__ import annotations

from egress.detectors import Context, Window
from egress.records import Finding, FlowRecord, Step


class EncryptedClientHello:
    name = "encrypted-client-hello"
    steps = frozenset({Step.GATE})
    window = Window(packets=8, bytes=16384)

    def inspect(self, flow: FlowRecord, ctx: Context):
        tls = flow.tls
        if tls is not None and tls.ech:
            return [Finding.make("encrypted-client-hello", outer_sni=tls.sni)]
        return []
