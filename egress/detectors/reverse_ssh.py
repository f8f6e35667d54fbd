"""reverse-ssh-tunnel: an SSH session in which the server drives (remote forwarding).

With ``ssh -R``, connections arrive at the relay and travel back to the task
host: after authentication it is the server side that starts each exchange
(a forwarded connection opening, a request coming in) and the client that
answers it. In an ordinary session the client starts (a command, keystrokes)
and the server's output needs no answer. From traffic alone, on any port,
the watch feed of packet sizes, directions and times after NEWKEYS says
which side drives. Keystroke chaff (OpenSSH 9.5+) and keepalives are
client-started or answered with fixed sizes, so neither side's sizes alone
decide anything: keepalives (one fixed-size packet each way, recurring, from
either side) are set apart and reported, not counted.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter

from egress.detectors import Context, Window
from egress.records import Finding, FlowRecord, Step

GAP_US = 150_000
"""A pause this long starts a new exchange; a reply and its request come closer together."""
AUTH_EXCHANGES = 1
"""The first exchange after key exchange is authentication and set-up (key authentication
runs without a pause): not counted."""
MIN_DRIVEN = 3
"""Server-started exchanges the client answers, at least, to call the session a tunnel."""
KEEPALIVE_MAX = 128
"""Bytes a keepalive packet stays under: an empty global request or reply, encrypted."""
MIN_KEEPALIVES = 3
"""Repeats of one (server size, client size) pair, one packet each, that make keepalives."""


_WITH_ARGUMENT = set("BbcDEeFIiJLlmOopQRSWw")
"""ssh's options that take an argument (ssh(1)); the others are flags."""


def forwarding_flag(cmdline: str | None) -> str | None:
    """The remote-forwarding option on an SSH client's command line, if any: ``-R spec``
    (also inside a cluster such as ``-NR``), ``-o RemoteForward=...``, or autossh."""
    words = (cmdline or "").split()
    if not words:
        return None
    program = words[0].rsplit("/", 1)[-1]
    if program == "autossh":
        return "autossh"
    if program not in ("ssh", "dbclient"):
        return None
    i = 1
    while i < len(words) and words[i].startswith("-") and words[i] != "--":
        cluster = words[i][1:]
        for j, letter in enumerate(cluster):
            if letter in _WITH_ARGUMENT:
                value = cluster[j + 1:] or (words[i + 1] if i + 1 < len(words) else "")
                if cluster[j + 1:] == "":
                    i += 1
                if letter == "R":
                    return f"-R {value}".strip()
                if letter == "o" and value.lower().startswith("remoteforward"):
                    return "RemoteForward " + value[len("remoteforward"):].lstrip("= ")
                break
        i += 1
    return None     # the first word that is not an option is the destination: options end


class ReverseSshTunnel:
    name = "reverse-ssh-tunnel"
    steps = frozenset({Step.START, Step.WATCH})
    window = Window(watch=True)

    def inspect(self, flow: FlowRecord, ctx: Context):
        if ctx.step is Step.START:
            # Live only: the process that owns the flow says it asked for remote forwarding.
            flag = forwarding_flag(flow.process.cmdline) if flow.process else None
            return [Finding.make("reverse-ssh-tunnel", source="process",
                                 cmdline_flag=flag)] if flag else []
        seen = flow.observation
        if flow.app != "ssh" or seen is None:
            return []
        if seen.ssh_role_reversed:
            # The side that opened the connection is the SSH server: the far side logs in
            # to the task host through a connection the task made (a reverse shell).
            return [Finding.make("reverse-ssh-tunnel", source="traffic", role_reversal=True)]
        if not seen.watch or seen.ssh_kex_end is None or None in seen.ssh_kex_end:
            return []
        exchanges = _exchanges(_after_key_exchange(seen.watch, seen.ssh_kex_end))
        after_auth = exchanges[AUTH_EXCHANGES:]
        keepalives = _keepalives(after_auth)
        work = [e for e in after_auth if e.key not in keepalives]
        # Symmetric: an exchange one side starts and the other answers with data.
        driven = [e for e in work if not e.client_started and e.client_packets]
        client_driven = [e for e in work if e.client_started and e.server_packets]
        if len(driven) < MIN_DRIVEN or len(driven) < len(client_driven):
            return []
        interval = None
        if keepalives:
            times = [e.start for e in after_auth if e.key in keepalives]
            gaps = [b - a for a, b in zip(times, times[1:])]
            interval = round(statistics.median(gaps) / 1e6, 1) if gaps else None
        return [Finding.make("reverse-ssh-tunnel", source="traffic",
                             server_first_exchanges=len(driven), keepalive_interval_s=interval)]


class _Exchange:
    __slots__ = ("start", "client_started", "client_packets", "server_packets", "sizes")

    def __init__(self, start: int, client_started: bool):
        self.start, self.client_started = start, client_started
        self.client_packets = self.server_packets = 0
        self.sizes: list[tuple[bool, int]] = []

    @property
    def key(self):
        """(who started, first size, answer size) of a one-packet-each exchange, else None."""
        if self.client_packets == 1 and self.server_packets == 1:
            return (self.client_started, self.sizes[0][1], self.sizes[1][1])
        return None


def _after_key_exchange(watch, kex_end):
    """The packets that start at or after their side's NEWKEYS (encrypted from there)."""
    client_end, server_end = kex_end
    offset = {True: 0, False: 0}
    out = []
    for ts, from_client, size in watch:
        start = offset[from_client]
        offset[from_client] += size
        if start >= (client_end if from_client else server_end):
            out.append((ts, from_client, size))
    return out


def _exchanges(packets) -> list[_Exchange]:
    out: list[_Exchange] = []
    last = None
    for ts, from_client, size in packets:
        if last is None or ts - last >= GAP_US:
            out.append(_Exchange(ts, from_client))
        ex = out[-1]
        if from_client:
            ex.client_packets += 1
        else:
            ex.server_packets += 1
        ex.sizes.append((from_client, size))
        last = ts
    return out


def _keepalives(exchanges) -> set:
    """Small one-packet-each exchanges that recur with the same sizes: keepalives, from
    either side (ClientAliveInterval from the server, ServerAliveInterval from the client)."""
    keys = Counter(e.key for e in exchanges
                   if e.key is not None and max(e.key[1:]) <= KEEPALIVE_MAX)
    return {key for key, count in keys.items() if count >= MIN_KEEPALIVES}
