"""The export formats against their own rules: Zeek's conn.log, Suricata's EVE flow events."""

import json

import pytest

from egress.community_id import community_id
from egress.exports import FORMATS, eve, render, zeek
from egress.records import Finding, Verdict
from tests import zeeklog
from tests.factories import make_dns_flow, make_flow, make_ssh_flow, make_tls_flow

PROTO_NUMBER = {"tcp": 6, "udp": 17}


def _with_id(flow):
    flow.community_id = community_id(PROTO_NUMBER[flow.proto], flow.src, flow.dst,
                                     flow.sport, flow.dport)
    return flow


def _conn_log(flows) -> tuple[dict, list[dict]]:
    return zeeklog.read("".join(line + "\n" for line in render("zeek", flows)))


def test_conn_log_header_and_types_follow_zeek():
    flows = [_with_id(make_tls_flow("pypi.org")), _with_id(make_dns_flow("pypi.org", ["203.0.113.10"])),
             _with_id(make_ssh_flow(end=None, conn_state=None))]
    header, rows = _conn_log(flows)
    assert header["fields"][:6] == ["ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h",
                                    "id.resp_p"]
    assert header["fields"][-1] == "community_id"
    assert dict(zip(header["fields"], header["types"]))["tunnel_parents"] == "set[string]"
    assert [r["uid"] for r in rows] == [f.flow_id for f in flows]
    tls, dns, ssh = rows
    assert (tls["proto"], tls["service"], dns["service"], ssh["service"]) == \
        ("tcp", "ssl", "dns", "ssh")
    assert tls["orig_ip_bytes"] == flows[0].bytes_out and tls["resp_pkts"] == flows[0].packets_in
    assert tls["duration"] == pytest.approx((flows[0].end - flows[0].start) / 1e6)
    assert tls["ts"] == pytest.approx(flows[0].start / 1e6)
    # what egress does not know is unset, never invented
    assert ssh["duration"] is zeeklog.UNSET and ssh["conn_state"] is zeeklog.UNSET
    assert all(r[k] is zeeklog.UNSET for r in rows
               for k in ("orig_bytes", "resp_bytes", "missed_bytes", "history", "tunnel_parents"))
    assert (tls["local_orig"], tls["local_resp"], tls["ip_proto"], dns["ip_proto"]) == \
        (True, False, 6, 17)


def test_community_id_column_is_egress_own_and_the_published_vector():
    # corelight/community-id-spec baseline: TCP 1.2.3.4:1122 -> 5.6.7.8:3344
    flow = _with_id(make_flow(src="1.2.3.4", sport=1122, dst="5.6.7.8", dport=3344))
    flows = [flow, _with_id(make_dns_flow("a.example", ["192.0.2.1"]))]
    _, rows = _conn_log(flows)
    assert rows[0]["community_id"] == "1:wCb3OG7yAFWelaUydu0D+125CLM="
    for row, f in zip(rows, flows):
        assert row["community_id"] == community_id(PROTO_NUMBER[f.proto], str(row["id.orig_h"]),
                                                   str(row["id.resp_h"]), row["id.orig_p"],
                                                   row["id.resp_p"])
    events = [json.loads(line) for line in render("eve", flows)]
    assert events[0]["community_id"] == "1:wCb3OG7yAFWelaUydu0D+125CLM="


@pytest.mark.parametrize("text,written", [
    ("a\tb", "a\\x09b"), ("line\nbreak", "line\\x0abreak"), ("back\\slash", "back\\x5cslash"),
    ("-", "\\x2d"), ("(empty)", "\\x28empty)"), ("", "(empty)"), ("naïve", "naïve"),
])
def test_escaping_as_zeek_writes(text, written):
    assert zeek.escape(text) == written


def test_values_with_separators_stay_in_their_column_and_read_back():
    flow = make_flow(flow_id="f-a\tb\nc", conn_state="-", community_id="")
    _, (row,) = _conn_log([flow])
    assert row["uid"] == "f-a\tb\nc" and row["conn_state"] == "-"
    assert row["community_id"] is zeeklog.UNSET


def test_a_set_separator_inside_a_set_element_is_escaped():
    assert zeek.escape("a,b", in_set=True) == "a\\x2cb"
    assert zeek.escape("a,b") == "a,b"


def test_the_reader_refuses_what_zeek_would():
    lines = list(render("zeek", [make_flow()]))
    good = "\n".join(lines) + "\n"
    zeeklog.read(good)
    fields = next(i for i, line in enumerate(lines) if line.startswith("#fields"))
    data = fields + 2
    broken = {
        "fewer types": lines[:fields + 1] + [lines[fields + 1].rsplit("\t", 1)[0]]
        + lines[fields + 2:],
        "a count that is text": lines[:data] + [lines[data].replace("\t8\t", "\teight\t", 1)]
        + lines[data + 1:],
        "no #close": lines[:-1],
    }
    for why, text in broken.items():
        with pytest.raises(zeeklog.ZeekLogError):
            zeeklog.read("\n".join(text) + "\n")


EVE_FLOW_KEYS = {"pkts_toserver": int, "pkts_toclient": int, "bytes_toserver": int,
                 "bytes_toclient": int, "start": str, "end": str, "age": int, "state": str,
                 "reason": str, "alerted": bool}


def test_eve_flow_events_have_suricata_names_and_types():
    flagged = _with_id(make_ssh_flow(verdict=Verdict.FLAG,
                                     findings=[Finding.make("ssh-egress", client_banner=None,
                                                            declared_for_ssh=[])]))
    allowed = _with_id(make_tls_flow("pypi.org", verdict=Verdict.ALLOW))
    icmp = make_flow(proto="icmp", sport=None, dport=None, app="icmp", conn_state="OTH")
    lines = list(render("eve", [flagged, allowed, icmp]))
    events = [json.loads(line) for line in lines]
    assert all("\n" not in line for line in lines)
    for e in events:
        assert e["event_type"] == "flow"
        assert isinstance(e["flow_id"], int) and 0 <= e["flow_id"] < 2 ** 53
        for key in ("timestamp", "src_ip", "dest_ip", "proto"):
            assert isinstance(e[key], str)
        assert set(e["flow"]) == set(EVE_FLOW_KEYS)
        for key, kind in EVE_FLOW_KEYS.items():
            assert type(e["flow"][key]) is kind, key
        assert e["flow"]["state"] in ("new", "established", "closed", "bypassed")
        assert e["flow"]["reason"] in ("timeout", "forced", "shutdown")
    ssh, tls, ping = events
    assert (ssh["proto"], ssh["app_proto"], ssh["flow"]["alerted"]) == ("TCP", "ssh", True)
    assert (tls["app_proto"], tls["flow"]["alerted"], tls["flow"]["state"]) == \
        ("tls", False, "closed")
    assert ssh["src_port"] == flagged.sport and ssh["dest_port"] == flagged.dport
    assert ping["proto"] == "ICMP" and "src_port" not in ping and "app_proto" not in ping
    assert ssh["timestamp"] == ssh["flow"]["start"]


def test_eve_timestamps_are_suricata_format():
    assert eve.timestamp(1_773_195_247_120_000) == "2026-03-11T02:14:07.120000+0000"


def test_eve_flow_id_is_the_flow_id_as_a_number():
    assert eve.numeric_flow_id("f-00000010") == 62
    assert eve.numeric_flow_id("f-zzzzzzzz") == 62 ** 8 - 1
    ids = {eve.numeric_flow_id(f.flow_id) for f in (make_flow(), make_flow(), make_flow())}
    assert len(ids) == 3


def test_jsonl_is_the_contract_in_time_order():
    late, early = make_flow(), make_flow()
    late.start, late.end = early.start + 10, early.end + 10
    lines = list(render("jsonl", [late, early]))
    assert [json.loads(line)["flow_id"] for line in lines] == [early.flow_id, late.flow_id]


def test_unknown_format_is_refused():
    assert FORMATS == ("jsonl", "zeek", "eve")
    with pytest.raises(ValueError, match="not an export format"):
        render("csv", [])
