"""encrypted-client-hello: ECH hides the real server name from the judge."""

from __future__ import annotations

from egress.detectors import Context, Window
from egress.records import Finding, FlowRecord, Step


class EncryptedClientHello:
    name = "encrypted-client-hello"
    steps = frozenset({Step.GATE})
    window = Window(packets=8, bytes=16384)

    def inspect(self, flow: FlowRecord, ctx: Context):
        for hello in (flow.tls, flow.quic):         # TLS over TCP, or inside QUIC
            if hello is not None and hello.ech:
                return [Finding.make("encrypted-client-hello", outer_sni=hello.sni)]
        return []
