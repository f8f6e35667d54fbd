"""HTTP/1.x request heads and CONNECT responses: units and properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from tests.factories import mutated

from egress.identify import http
from egress.identify.common import NEED_MORE

RFC9110_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE"]
TLS_HELLO = bytes.fromhex("160301020001000200fc0303") + bytes(32)


def test_get_with_host_and_body_offset():
    head = (b"GET /simple/numpy/ HTTP/1.1\r\nHost: pypi.org\r\n"
            b"User-Agent: pip/24.0\r\nAccept: */*\r\n\r\n")
    found = http.request(head + b"next request")
    assert (found.method, found.target, found.version, found.host) == \
        ("GET", "/simple/numpy/", "HTTP/1.1", "pypi.org")
    assert found.body_offset == len(head)
    assert found.connect_host is None and found.connect_port is None


def test_host_header_name_is_case_insensitive_first_one_wins():
    head = (b"POST /api HTTP/1.1\r\nhOsT:   Example.ORG:8080 \r\nHost: other\r\n"
            b" folded continuation\r\nContent-Length: 2\r\n\r\n")
    found = http.request(head + b"{}")
    assert found.host == "Example.ORG:8080"
    assert found.body_offset == len(head)


def test_http_1_0_without_host_and_bare_lf():
    found = http.request(b"GET /index.html HTTP/1.0\n\n")
    assert found.version == "HTTP/1.0" and found.host is None and found.body_offset == 26


@pytest.mark.parametrize("method", RFC9110_METHODS + ["PATCH", "PURGE", "M-SEARCH", "x-custom"])
def test_methods_any_token(method):
    target = b"example.org:443" if method == "CONNECT" else b"/"
    found = http.request(method.encode() + b" " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    assert found.method == method


def test_connect_authority():
    found = http.request(b"CONNECT pool.example:3333 HTTP/1.1\r\nHost: pool.example:3333\r\n\r\n")
    assert found.target == "pool.example:3333"
    assert (found.connect_host, found.connect_port) == ("pool.example", 3333)
    v6 = http.request(b"CONNECT [2001:db8::7]:22 HTTP/1.1\r\n\r\n")
    assert (v6.connect_host, v6.connect_port) == ("2001:db8::7", 22)


@pytest.mark.parametrize("target", [b"pool.example", b"pool.example:0", b"pool.example:99999",
                                    b":443", b"2001:db8::7:22", b"[2001:db8::7]", b"h:ab",
                                    b"h:" + b"4" * 5000, b"h:\xc2\xb2"])
def test_connect_bad_authority(target):
    assert http.request(b"CONNECT " + target + b" HTTP/1.1\r\n\r\n") is None


def test_absolute_form_keeps_target():
    found = http.request(b"GET http://example.org/x HTTP/1.1\r\nHost: example.org\r\n\r\n")
    assert found.target == "http://example.org/x" and found.host == "example.org"


@pytest.mark.parametrize("partial", [b"", b"G", b"GET", b"GET ", b"GET /index", b"GET / ",
                                     b"GET / HTTP/1.", b"GET / HTTP/1.1\r",
                                     b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n"])
def test_unfinished_needs_more(partial):
    assert http.request(partial) is NEED_MORE


def test_final_answers_from_an_unfinished_head():
    found = http.request(b"GET / HTTP/1.1\r\nHost: a.example\r\nCookie: x", final=True)
    assert found.host == "a.example" and found.body_offset is None
    assert http.request(b"GET / HTTP/1.", final=True) is NEED_MORE  # no request line yet


def test_head_longer_than_cap_gives_what_fits():
    data = b"GET / HTTP/1.1\r\nHost: big.example\r\n" + b"X-Pad: " + b"a" * 20000
    found = http.request(data)
    assert found.host == "big.example" and found.body_offset is None
    assert http.request(b"GET /" + b"a" * 20000) is None  # the request line alone is too long


@pytest.mark.parametrize("junk", [
    TLS_HELLO, b"SSH-2.0-OpenSSH_9.2p1\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET / HTTP/2\r\n\r\n", b"GET / HTTP/1.1X\r\n", b"GET / HTTP/1.2\r\n\r\n",
    b"GET  / HTTP/1.1\r\n\r\n", b"GET /a b HTTP/1.1\r\n\r\n", b"GET /\x00 HTTP/1.1\r\n\r\n",
    b" GET / HTTP/1.1\r\n\r\n", b"GET / FTP/1.1\r\n\r\n", b"{\"id\":1,\"method\":\"login\"}\n",
    b"\x05\x01\x00", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ / HTTP/1.1\r\n\r\n", b"GET /\tx HTTP/1.1",
    b"GET / HXTP"])
def test_rejects(junk):
    assert http.request(junk) is None


def test_looks_like_request():
    assert http.looks_like_request(b"GET / HTTP/1.1") and http.looks_like_request(b"POS")
    assert not http.looks_like_request(TLS_HELLO) and not http.looks_like_request(b" GET")
    assert not http.looks_like_request(b"{\"id\"")


# --------------------------------------------------------------------------
# CONNECT responses


def test_connect_response_offset_is_where_the_tunnel_starts():
    head = b"HTTP/1.1 200 Connection established\r\nProxy-Agent: squid\r\n\r\n"
    offset = http.connect_response(head + TLS_HELLO)
    assert offset == len(head) and (head + TLS_HELLO)[offset:] == TLS_HELLO
    assert http.connect_response(b"HTTP/1.0 200 OK\n\n") == 17


def test_connect_response_skips_interim_and_accepts_any_2xx():
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\nSSH-2.0-x"
    assert data[http.connect_response(data):] == b"SSH-2.0-x"


@pytest.mark.parametrize("data", [b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
                                  b"HTTP/1.1 502 Bad Gateway\r\n\r\n", b"SSH-2.0-x\r\n",
                                  b"HTTP/2 200\r\n\r\n", b"HTTP/1.1 2000 OK\r\n\r\n",
                                  b"HTTP/1.1 20x OK\r\n\r\n"])
def test_connect_response_refused_or_not_http(data):
    assert http.connect_response(data) is None


@pytest.mark.parametrize("partial", [b"", b"HTT", b"HTTP/1.1", b"HTTP/1.1 20",
                                     b"HTTP/1.1 200 Connection", b"HTTP/1.1 200 OK\r\n",
                                     b"HTTP/1.1 100 Continue\r\n\r\n"])
def test_connect_response_unfinished_needs_more(partial):
    assert http.connect_response(partial) is NEED_MORE


# --------------------------------------------------------------------------
# Properties




def allowed(result) -> bool:
    return result is None or result is NEED_MORE or isinstance(result, http.HttpRequest)


SAMPLE = (b"CONNECT relay.example:443 HTTP/1.1\r\nHost: relay.example:443\r\n"
          b"Proxy-Authorization: Basic eDp5\r\n\r\n")
RESPONSE = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 Connection established\r\n\r\n"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_raise(data):
    for candidate in (data, b"GET " + data, b"GET / HTTP/1.1\r\n" + data):
        assert allowed(http.request(candidate))
        assert allowed(http.request(candidate, final=True))
        offset = http.connect_response(candidate)
        assert offset is None or offset is NEED_MORE or 0 < offset <= len(candidate)
    assert isinstance(http.looks_like_request(data), bool)


@settings(max_examples=300, deadline=None)
@given(mutated(SAMPLE), mutated(RESPONSE))
def test_mutations_never_raise(request_bytes, response_bytes):
    assert allowed(http.request(request_bytes))
    offset = http.connect_response(response_bytes)
    assert offset is None or offset is NEED_MORE or 0 < offset <= len(response_bytes)


TOKEN = st.text("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
                min_size=1, max_size=http.METHOD_MAX)
HOSTS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,8}){1,3}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(method=st.one_of(st.sampled_from(RFC9110_METHODS[:5]), TOKEN.filter(lambda m: m != "CONNECT")),
       path=st.from_regex(r"/[A-Za-z0-9._~%!$&'()*+,;=:@/?-]{0,60}", fullmatch=True),
       host=HOSTS, version=st.sampled_from(["HTTP/1.0", "HTTP/1.1"]),
       host_name=st.sampled_from(["Host", "host", "HOST"]), eol=st.sampled_from(["\r\n", "\n"]))
def test_generated_requests_round_trip_and_prefixes_need_more(method, path, host, version,
                                                              host_name, eol):
    head = f"{method} {path} {version}{eol}Accept: */*{eol}{host_name}: {host}{eol}{eol}".encode()
    found = http.request(head + b"body")
    assert (found.method, found.target, found.version, found.host, found.body_offset) == \
        (method, path, version, host, len(head))
    for cut in range(len(head)):
        assert http.request(head[:cut]) is NEED_MORE, head[:cut]


@settings(max_examples=100, deadline=None)
@given(host=st.one_of(HOSTS, st.ip_addresses(v=4).map(str)), port=st.integers(1, 65535))
def test_generated_connect_targets(host, port):
    found = http.request(f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode())
    assert (found.connect_host, found.connect_port) == (host, port)
