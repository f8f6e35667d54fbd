"""Mining JSON-RPC over TCP (Stratum and its relatives) from the first lines of a stream.

Miners and pools exchange one JSON object a line. Three dialects:

- ``xmrig``: the CryptoNote/Monero protocol of XMRig and its pools: ``login``
  (params with login, pass, agent), ``submit``, ``keepalived``, and the pool's
  ``job`` (params with blob and target), also inside the login result.
- ``stratum-v1``: Bitcoin-style Stratum, ``mining.subscribe``,
  ``mining.authorize``, ``mining.notify``, ``mining.set_difficulty``, ...
- ``ethproxy``: Ethereum's getwork over a socket, ``eth_submitLogin``,
  ``eth_getWork``, ``eth_submitWork``, ``eth_submitHashrate``.

Lines are parsed with ``json.loads``, never matched as text: key order and
spacing differ between miners. A JSON-RPC call of another method (an
Ethereum node's ``eth_blockNumber``, a language server, any JSON API) is not
mining. Every function never raises: ``None`` means not mining JSON-RPC,
``NEED_MORE`` that more lines could still make it so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from egress.identify.common import NEED_MORE, NeedMore

LINE_MAX = 8 * 1024
"""Longest line we parse; real ones (a mining.notify with its merkle branch) stay far below."""
LINES_MAX = 4
"""JSON lines we read before giving up; a miner's first line already says it."""
AGENT_MAX = 256
"""Longest agent string kept (it ends up in evidence)."""

CLIENT_TO_SERVER = "client-to-server"
SERVER_TO_CLIENT = "server-to-client"

STRATUM_V1_METHODS = {
    # method: who sends it
    "mining.subscribe": CLIENT_TO_SERVER,
    "mining.authorize": CLIENT_TO_SERVER,
    "mining.submit": CLIENT_TO_SERVER,
    "mining.configure": CLIENT_TO_SERVER,
    "mining.extranonce.subscribe": CLIENT_TO_SERVER,
    "mining.suggest_difficulty": CLIENT_TO_SERVER,
    "mining.suggest_target": CLIENT_TO_SERVER,
    "mining.get_transactions": CLIENT_TO_SERVER,
    "mining.notify": SERVER_TO_CLIENT,
    "mining.set_difficulty": SERVER_TO_CLIENT,
    "mining.set_target": SERVER_TO_CLIENT,
    "mining.set_extranonce": SERVER_TO_CLIENT,
    "mining.set_version_mask": SERVER_TO_CLIENT,
}
ETHPROXY_METHODS = ("eth_submitLogin", "eth_getWork", "eth_submitWork", "eth_submitHashrate")
XMRIG_METHODS = ("login", "submit", "keepalived", "getjob", "job")
"""Generic names: they count only with XMRig-shaped params (login with login and
pass or agent, submit with job_id and nonce, job with blob)."""

_NEUTRAL = object()  # a JSON-RPC response that says nothing either way


def looks_like_stratum(data: bytes) -> bool:
    """Cheap check: the stream starts with a JSON object (after blank space), or nothing yet."""
    head = data[:64].lstrip(b" \t\r\n")
    return not head or head[:1] == b"{"


@dataclass(frozen=True, kw_only=True)
class StratumHit:
    method: str
    """The first mining method seen (for a pool's answer, the call it answers)."""
    agent: str | None
    """The miner's agent: XMRig login ``params.agent`` or ``mining.subscribe``'s
    first parameter; None when not among the lines read."""
    dialect: str
    """xmrig, stratum-v1 or ethproxy."""
    direction: str
    """Who sends such a message: client-to-server (the miner) or server-to-client (the pool)."""


def identify(data: bytes) -> StratumHit | None | NeedMore:
    """The first mining JSON-RPC message among the first lines of ``data``.

    Responses that say nothing (``{"id":2,"result":true}``) are skipped; the
    first other line decides. The agent may come from a later line (a
    ``mining.configure`` before ``mining.subscribe``).
    """
    if not looks_like_stratum(data):
        return None
    hit: StratumHit | None = None
    agent = None
    pos = 0
    for _ in range(LINES_MAX):
        line, pos = _next_line(data, pos)
        if line is NEED_MORE:
            return NEED_MORE if hit is None else _with_agent(hit, agent)
        found = _classify(_load(line)) if line is not None else None
        if found is None:
            return None if hit is None else _with_agent(hit, agent)
        if isinstance(found, StratumHit):
            hit = hit or found
            agent = agent or found.agent
            if agent:
                break
    return None if hit is None else _with_agent(hit, agent)


def _next_line(data: bytes, pos: int):
    """(line, offset past it) for the next non-blank line; (NEED_MORE, pos) at the
    end of the data or in an unfinished JSON line; (None, pos) for a line too
    long or not starting like a JSON object."""
    while True:
        nl = data.find(b"\n", pos, pos + LINE_MAX)
        if nl < 0:
            rest = data[pos:].lstrip()
            if not rest:
                return NEED_MORE, pos
            if len(data) - pos >= LINE_MAX or rest[:1] != b"{":
                return None, pos
            return NEED_MORE, pos
        line = data[pos:nl].strip()
        pos = nl + 1
        if line:
            return line, pos


def _load(line: bytes | None) -> dict | None:
    if line is None or line[:1] != b"{":
        return None
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return message if isinstance(message, dict) else None


def _classify(message: dict | None):
    """A StratumHit, _NEUTRAL for a response without mining content, None for anything else."""
    if message is None:
        return None
    method = message.get("method")
    params = message.get("params")
    if isinstance(method, str):
        return _request(method, params)
    if "method" in message or not ("result" in message or "error" in message):
        return None
    return _response(message.get("result"))


def _request(method: str, params):
    if method in STRATUM_V1_METHODS:
        agent = None
        if method == "mining.subscribe" and isinstance(params, list) and params \
                and isinstance(params[0], str):
            agent = params[0]
        return _hit(method, agent, "stratum-v1", STRATUM_V1_METHODS[method])
    if method in ETHPROXY_METHODS:
        return _hit(method, None, "ethproxy", CLIENT_TO_SERVER)
    if not isinstance(params, dict):
        return None
    if method == "login":
        if isinstance(params.get("login"), str) and ("pass" in params or "agent" in params):
            agent = params.get("agent")
            return _hit(method, agent if isinstance(agent, str) else None, "xmrig",
                        CLIENT_TO_SERVER)
        return None
    if method == "submit":
        if "job_id" in params and "nonce" in params:
            return _hit(method, None, "xmrig", CLIENT_TO_SERVER)
        return None
    if method in ("keepalived", "getjob"):
        if "id" in params:
            return _hit(method, None, "xmrig", CLIENT_TO_SERVER)
        return None
    if method == "job":
        if _is_job(params):
            return _hit(method, None, "xmrig", SERVER_TO_CLIENT)
        return None
    return None


def _response(result):
    # XMRig's login result carries the first job.
    if isinstance(result, dict) and _is_job(result.get("job")):
        return _hit("login", None, "xmrig", SERVER_TO_CLIENT)
    if isinstance(result, list) and result:
        # mining.subscribe's result: [[["mining.notify", id], ...], extranonce1, size].
        subscriptions = result[0]
        if isinstance(subscriptions, list):
            items = subscriptions if subscriptions and isinstance(subscriptions[0], list) \
                else [subscriptions]
            for item in items:
                if isinstance(item, list) and item and isinstance(item[0], str) \
                        and item[0] in STRATUM_V1_METHODS:
                    return _hit("mining.subscribe", None, "stratum-v1", SERVER_TO_CLIENT)
        # eth_getWork's result: header hash, seed hash, boundary (and sometimes height).
        if 3 <= len(result) <= 4 and all(_is_hash(x) for x in result[:3]):
            return _hit("eth_getWork", None, "ethproxy", SERVER_TO_CLIENT)
    return _NEUTRAL


def _is_job(params) -> bool:
    return isinstance(params, dict) and isinstance(params.get("blob"), str) \
        and ("target" in params or "job_id" in params)


def _is_hash(value) -> bool:
    if not isinstance(value, str) or not value.startswith("0x") or len(value) > 66:
        return False
    digits = value[2:]
    return len(digits) >= 8 and all(c in "0123456789abcdefABCDEF" for c in digits)


def _hit(method: str, agent: str | None, dialect: str, direction: str) -> StratumHit:
    return StratumHit(method=method, agent=agent[:AGENT_MAX] if agent else None,
                      dialect=dialect, direction=direction)


def _with_agent(hit: StratumHit, agent: str | None) -> StratumHit:
    if agent and not hit.agent:
        return StratumHit(method=hit.method, agent=agent, dialect=hit.dialect,
                          direction=hit.direction)
    return hit
