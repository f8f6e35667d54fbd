"""reverse-ssh-tunnel from the watch feed: who drives the exchanges after key exchange."""

import random

from egress.detectors import Context
from egress.detectors.reverse_ssh import GAP_US, MIN_DRIVEN, ReverseSshTunnel
from egress.records import Observation, Step
from tests.factories import make_ssh_flow

KEX = (2000, 2000)   # both sides' key exchange ends after 2000 bytes


def feed(*exchanges, gap=GAP_US * 3):
    """Packets: the handshake, then exchanges given as [(from_client, size), ...]."""
    t, out = 0, [(0, True, 2000), (10, False, 2000)]
    out += [(20 + i, i % 2 == 0, 100) for i in range(8)]        # authentication, no pause
    t = 1000
    for exchange in exchanges:
        t += gap
        for i, (from_client, size) in enumerate(exchange):
            out.append((t + i * 1000, from_client, size))
    return out


def found(watch):
    flow = make_ssh_flow(observation=Observation(watch=watch, ssh_kex_end=KEX))
    return ReverseSshTunnel().inspect(flow, Context(step=Step.WATCH, purpose=None, names=()))


FORWARDED = [(False, 92), (True, 44), (False, 116), (True, 1052)]   # channel open, data back
OUTPUT = [(False, 60)]                                                # a command's output line
KEEPALIVE = [(False, 52), (True, 36)]


def test_server_driven_exchanges_are_a_tunnel():
    (finding,) = found(feed(*[FORWARDED] * MIN_DRIVEN))
    assert finding.evidence.server_first_exchanges == MIN_DRIVEN
    assert not found(feed(*[FORWARDED] * (MIN_DRIVEN - 1)))


def test_command_output_needs_no_answer_and_is_not_a_tunnel():
    assert not found(feed([(True, 120)], *[OUTPUT] * 10))


def test_keepalives_are_set_apart_and_reported():
    assert not found(feed(*[KEEPALIVE] * 10))
    (finding,) = found(feed(*([KEEPALIVE, FORWARDED] * 4)))
    assert finding.evidence.server_first_exchanges == 4
    assert finding.evidence.keepalive_interval_s is not None


def test_interactive_typing_with_chaff_is_not_a_tunnel():
    rng = random.Random(5)
    typing = [[(True, 36 + 16 * rng.randrange(3)), (False, 36)] for _ in range(40)]  # chaff sizes vary
    assert not found(feed(*typing, *[FORWARDED] * 2))


def test_the_client_driving_outnumbers_a_few_server_starts():
    assert not found(feed(*[[(True, 200), (False, 900)]] * 6, *[FORWARDED] * 4))


def test_no_feed_no_verdict():
    flow = make_ssh_flow()
    assert ReverseSshTunnel().inspect(flow, Context(step=Step.WATCH, purpose=None, names=())) == []


def test_client_keepalives_are_set_apart_too():
    client_keepalive = [(True, 52), (False, 28)]        # ServerAliveInterval's request and reply
    (finding,) = found(feed(*([client_keepalive, client_keepalive, FORWARDED] * 4)))
    assert finding.evidence.server_first_exchanges == 4
