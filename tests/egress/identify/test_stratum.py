"""Mining JSON-RPC (XMRig, Stratum v1, ethproxy): real lines, look-alikes, properties."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from tests.factories import mutated

from egress.identify import stratum
from egress.identify.common import NEED_MORE

WALLET = "44AFFq5kSiGBoZ4NMDwYtN18obc8AemS33DBLWs3H7otXft3XjrpDtQGv7SqSsaBYBb98uNbr2VBBEt7f2wfn3RVGQBEP3A"
XMRIG_AGENT = "XMRig/6.21.0 (Linux x86_64) libuv/1.44.2 gcc/12.2.0"

# The shapes the miners and pools send (XMRig's Client::login, the Stratum
# v1 documentation, ethminer's ethproxy client), one JSON object a line.
XMRIG_LOGIN = {"id": 1, "jsonrpc": "2.0", "method": "login",
               "params": {"login": WALLET, "pass": "x", "agent": XMRIG_AGENT, "rigid": "",
                          "algo": ["rx/0", "cn/r", "cn/2"]}}
XMRIG_SUBMIT = {"id": 2, "jsonrpc": "2.0", "method": "submit",
                "params": {"id": "8e2f5d", "job_id": "123", "nonce": "d8090000",
                           "result": "bd8f" * 16, "algo": "rx/0"}}
XMRIG_KEEPALIVED = {"id": 3, "jsonrpc": "2.0", "method": "keepalived", "params": {"id": "8e2f5d"}}
XMRIG_JOB = {"jsonrpc": "2.0", "method": "job",
             "params": {"blob": "1010" * 38, "job_id": "IU6a", "target": "b88d0600",
                        "algo": "rx/0", "height": 3100000, "seed_hash": "ab" * 32}}
XMRIG_LOGIN_RESULT = {"id": 1, "jsonrpc": "2.0", "error": None,
                      "result": {"id": "8e2f5d", "job": XMRIG_JOB["params"],
                                 "extensions": ["algo", "nicehash"], "status": "OK"}}
SUBSCRIBE = {"id": 1, "method": "mining.subscribe", "params": ["cgminer/4.10.0"]}
AUTHORIZE = {"params": ["slush.miner1", "password"], "id": 2, "method": "mining.authorize"}
CONFIGURE = {"id": 1, "method": "mining.configure",
             "params": [["version-rolling"], {"version-rolling.mask": "1fffe000"}]}
SUBMIT = {"params": ["slush.miner1", "bf", "00000001", "504e86ed", "b2957c02"], "id": 4,
          "method": "mining.submit"}
SUBSCRIBE_RESULT = {"id": 1, "result": [[["mining.set_difficulty", "b4b6693b72a50c7116db18d6497cac52"],
                                         ["mining.notify", "ae6812eb4cd7735a302a8a9dd95cf71f"]],
                                        "08000002", 4], "error": None}
NOTIFY = {"params": ["bf", "4d16b6f85af6e2198f44ae2a6de67f78487ae5611b77c6c0440b921e00000000",
                     "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff20020862062f503253482f04b8864e5008",
                     "072f736c7573682f000000000100f2052a010000001976a914d23fcdf86f7e756a64a7a9688ef9903327048ed988ac00000000",
                     [], "00000002", "1c2ac4af", "504e86b9", False], "id": None,
          "method": "mining.notify"}
SET_DIFFICULTY = {"id": None, "method": "mining.set_difficulty", "params": [2]}
ETH_LOGIN = {"id": 1, "jsonrpc": "2.0", "method": "eth_submitLogin",
             "params": ["0xb85150eb365e7df0941f0cf08235f987ba91506a", "x"], "worker": "rig1"}
ETH_GETWORK = {"id": 2, "jsonrpc": "2.0", "method": "eth_getWork", "params": []}
ETH_HASHRATE = {"id": 9, "jsonrpc": "2.0", "method": "eth_submitHashrate",
                "params": ["0x" + "0" * 56 + "3b9aca00", "0x" + "59" * 32]}
ETH_WORK = {"id": 2, "jsonrpc": "2.0", "result": [
    "0x645cf20198c2f3861e947d4f67e3ab63b7b2e24dcc9095bd9123e7b33371f6cc",
    "0xabad8f99f3918bf903c6a909d9bbc0fdfa5a2f4b9cb1196175ec825c6610126c",
    "0x0000000394427b08175efa9a9eb59b9123e2969bf19bf272b20787ed022fbe6c"]}

C2S, S2C = stratum.CLIENT_TO_SERVER, stratum.SERVER_TO_CLIENT


def line(message: dict, separators=(",", ":")) -> bytes:
    return json.dumps(message, separators=separators).encode() + b"\n"


@pytest.mark.parametrize("message, method, agent, dialect, direction", [
    (XMRIG_LOGIN, "login", XMRIG_AGENT, "xmrig", C2S),
    (XMRIG_SUBMIT, "submit", None, "xmrig", C2S),
    (XMRIG_KEEPALIVED, "keepalived", None, "xmrig", C2S),
    (XMRIG_JOB, "job", None, "xmrig", S2C),
    (XMRIG_LOGIN_RESULT, "login", None, "xmrig", S2C),
    (SUBSCRIBE, "mining.subscribe", "cgminer/4.10.0", "stratum-v1", C2S),
    (AUTHORIZE, "mining.authorize", None, "stratum-v1", C2S),
    (SUBMIT, "mining.submit", None, "stratum-v1", C2S),
    (CONFIGURE, "mining.configure", None, "stratum-v1", C2S),
    ({"id": 3, "method": "mining.extranonce.subscribe", "params": []},
     "mining.extranonce.subscribe", None, "stratum-v1", C2S),
    (SUBSCRIBE_RESULT, "mining.subscribe", None, "stratum-v1", S2C),
    (NOTIFY, "mining.notify", None, "stratum-v1", S2C),
    (SET_DIFFICULTY, "mining.set_difficulty", None, "stratum-v1", S2C),
    (ETH_LOGIN, "eth_submitLogin", None, "ethproxy", C2S),
    (ETH_GETWORK, "eth_getWork", None, "ethproxy", C2S),
    ({"id": 5, "jsonrpc": "2.0", "method": "eth_submitWork",
      "params": ["0x1060cf7c00000000", "0x" + "ab" * 32, "0x" + "cd" * 32]},
     "eth_submitWork", None, "ethproxy", C2S),
    (ETH_HASHRATE, "eth_submitHashrate", None, "ethproxy", C2S),
    (ETH_WORK, "eth_getWork", None, "ethproxy", S2C),
])
def test_mining_messages(message, method, agent, dialect, direction):
    hit = stratum.identify(line(message) + b'{"id":9')
    assert hit == stratum.StratumHit(method=method, agent=agent, dialect=dialect,
                                     direction=direction)


def test_real_xmrig_login_bytes():
    # XMRig writes compact JSON in this key order, one line ending in LF.
    raw = ('{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"' + WALLET +
           '","pass":"x","agent":"' + XMRIG_AGENT + '","algo":["rx/0"]}}\n').encode()
    assert stratum.identify(raw).agent == XMRIG_AGENT


def test_agent_from_a_later_line():
    hit = stratum.identify(line(CONFIGURE) + line({**SUBSCRIBE, "id": 2,
                                                   "params": ["bmminer/2.0.0", None]}))
    assert (hit.method, hit.agent) == ("mining.configure", "bmminer/2.0.0")


def test_silent_responses_are_skipped():
    data = line({"id": 1, "result": True, "error": None}) + line(
        {"id": 2, "jsonrpc": "2.0", "result": True}) + line(SET_DIFFICULTY)
    assert stratum.identify(data).method == "mining.set_difficulty"
    silent = line({"id": 1, "jsonrpc": "2.0", "result": "0x10d4f"})
    assert stratum.identify(silent) is NEED_MORE
    assert stratum.identify(silent * stratum.LINES_MAX + line(SUBSCRIBE)) is None


def test_crlf_and_blank_lines_and_spacing():
    data = b"\r\n  " + json.dumps(XMRIG_LOGIN, indent=None, separators=(" , ", " : ")).encode() + b"\r\n"
    assert stratum.identify(data).method == "login"


@pytest.mark.parametrize("raw", [
    line({"jsonrpc": "2.0", "method": "eth_blockNumber", "params": [], "id": 1}),
    line({"jsonrpc": "2.0", "method": "eth_getBalance", "params": ["0x" + "00" * 20, "latest"], "id": 1}),
    line({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"processId": 1}}),
    line({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    b'Content-Length: 52\r\n\r\n{"jsonrpc":"2.0","id":1,"method":"mining.subscribe"}',
    line({"name": "numpy", "version": "2.1.0"}),
    line({"method": "login", "params": {"username": "a", "password": "b"}}),
    line({"method": "login", "params": ["user", "pass"]}),
    line({"jsonrpc": "2.0", "id": 1, "method": "login", "params": {"login": "alice"}}),
    line({"jsonrpc": "2.0", "method": "job", "params": {"id": 5}}),
    line({"jsonrpc": "2.0", "method": "submit", "params": {"form": "x"}}),
    line({"method": "Mining.Subscribe", "params": []}),
    b'[{"id":1,"method":"mining.subscribe","params":[]}]\n',
    b'{"id":1,"method":"mining.subscribe",\n',
    b"GET / HTTP/1.1\r\n\r\n", b"SSH-2.0-OpenSSH_9.2p1\r\n", b"\x16\x03\x01\x00",
    b'{"id": 1, "method": "mining.subscribe", "params": ' + b"[" * 100000 + b"\n",
    b'{"id": 1, "params": ' + b"[" * 3000 + b"]" * 3000 + b"}\n",
    b"{" + b" " * stratum.LINE_MAX,
])
def test_not_mining(raw):
    assert stratum.identify(raw) is None


@pytest.mark.parametrize("partial", [b"", b"\r\n", b"{", b'{"id":1,"method":"login"',
                                     line(XMRIG_LOGIN)[:-1]])
def test_partial_first_line_needs_more(partial):
    assert stratum.identify(partial) is NEED_MORE


def test_looks_like_stratum():
    assert stratum.looks_like_stratum(b' \r\n{"id"') and stratum.looks_like_stratum(b"")
    assert not stratum.looks_like_stratum(b"GET /") and not stratum.looks_like_stratum(b"[1]")


# --------------------------------------------------------------------------
# Properties




def allowed(result) -> bool:
    return result is None or result is NEED_MORE or isinstance(result, stratum.StratumHit)


MINING = [XMRIG_LOGIN, XMRIG_SUBMIT, XMRIG_JOB, XMRIG_LOGIN_RESULT, SUBSCRIBE, AUTHORIZE,
          CONFIGURE, SUBSCRIBE_RESULT, NOTIFY, SET_DIFFICULTY, ETH_LOGIN, ETH_WORK]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_raise(data):
    for candidate in (data, b"{" + data, line(SUBSCRIBE) + data, b'{"id":1}\n' + data):
        assert allowed(stratum.identify(candidate))
    assert isinstance(stratum.looks_like_stratum(data), bool)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MINING).flatmap(lambda m: mutated(line(m) + line(SET_DIFFICULTY))))
def test_mutations_never_raise(data):
    assert allowed(stratum.identify(data))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(MINING).flatmap(lambda m: st.tuples(st.just(m), st.permutations(list(m)))),
       st.sampled_from([(",", ":"), (", ", ": "), (" ,", " :  "), (",\t", ":\t")]),
       st.sampled_from([b"\n", b"\r\n"]), st.sampled_from([b"", b" ", b"\r\n"]))
def test_key_order_and_spacing_do_not_matter(message_and_order, separators, eol, lead):
    message, order = message_and_order
    expected = stratum.identify(line(message))
    reordered = {key: message[key] for key in order}
    raw = lead + json.dumps(reordered, separators=separators).encode()
    assert stratum.identify(raw + eol) == expected
    for cut in range(len(raw) + 1):
        assert stratum.identify(raw[:cut]) is NEED_MORE, raw[:cut]


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40), st.one_of(st.none(), st.lists(st.integers()),
                                                   st.dictionaries(st.text(max_size=8), st.integers())))
def test_other_methods_are_not_mining(method, params):
    known = {*stratum.XMRIG_METHODS, *stratum.STRATUM_V1_METHODS, *stratum.ETHPROXY_METHODS}
    message = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    if method not in known:
        assert stratum.identify(line(message)) is None
