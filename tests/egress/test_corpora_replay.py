"""The corpora through the whole replay pipeline: file -> decoder -> flow table -> identifiers.

The parser tests reproduce these values from payloads they reassemble
themselves; here the same values must come out of the records `egress
replay` writes, so reassembly, orientation and identification are checked
together.
"""

import json

import pytest

from egress.sources.capture import CaptureSource
from tagging.attribution import Attribution
from tests.corpora import corpus


def records(path) -> list:
    from egress.records import FlowRecord
    return [r for r in CaptureSource([str(path)], Attribution())
            if isinstance(r, FlowRecord)]


def by_tuple(flows):
    return {(f.src, f.sport, f.dst, f.dport): f for f in flows}


def test_community_id_on_every_flow():
    folder = corpus("community-id")
    flows = records(folder / "combined.pcap.gz")
    baseline = json.loads((folder / "baseline_deflt.json").read_text())
    ids = {e["communityid"] for e in baseline}
    assert flows and all(f.community_id in ids for f in flows), \
        [(f.proto, f.src, f.dst, f.community_id) for f in flows if f.community_id not in ids]
    # every baseline entry is some flow's id, in either direction
    ours = {f.community_id for f in flows}
    assert ids <= ours


def test_ja3_and_sni():
    folder = corpus("ja3")
    entries = json.loads((folder / "expected.json").read_text())
    assert len(entries) == 2
    for entry in entries:
        flows = [f for f in records(folder / entry["file"]) if f.app == "tls"]
        assert flows, f"{entry['file']}: no TLS flow identified"
        assert flows[0].tls.sni == entry["server_name"], entry["file"]
        assert flows[0].tls.ja3 == entry["ja3"], entry["file"]


JA4_CAPTURES = ["tls-sni.pcapng", "latest.pcapng", "tls12.pcap", "tls-alpn-h2.pcap",
                "tls-non-ascii-alpn.pcapng"]   # single-packets.pcap holds no TLS client hello


@pytest.mark.parametrize("name", JA4_CAPTURES)
def test_ja4_and_sni(name):
    folder = corpus("ja4")
    expected = [e for e in json.loads((folder / f"{name}.json").read_text()) if e.get("JA4.1")]
    flows = by_tuple(records(folder / name))
    assert expected
    for e in expected:
        flow = flows.get((e["src"], int(e["srcport"]), e["dst"], int(e["dstport"])))
        assert flow is not None, f"stream {e['stream']}: no flow {e['src']}:{e['srcport']}"
        assert flow.app == "tls" and flow.tls.ja4 == e["JA4.1"], e["stream"]
        assert flow.tls.sni == (e.get("domain") or None), e["stream"]


def test_hassh_from_captures():
    folder = corpus("hassh")
    for e in json.loads((folder / "expected.json").read_text()):
        ssh = [f for f in records(folder / e["file"]) if f.app == "ssh"]
        assert len(ssh) == 1, e["file"]
        assert (ssh[0].ssh.hassh, ssh[0].ssh.hassh_server) == (e["hassh"], e["hassh_server"]), \
            e["file"]


def test_ssh_banners_and_hassh_of_the_ja4_corpus():
    folder = corpus("ja4")
    for e in json.loads((folder / "ssh.pcapng.json").read_text()):
        extras = e.get("ssh_extras")
        if not extras:
            continue
        flow = by_tuple(records(folder / "ssh.pcapng"))[(e["src"], int(e["srcport"]), e["dst"],
                                                          int(e["dstport"]))]
        assert flow.ssh.client == extras["ssh_protocol_client"]
        assert flow.ssh.server == extras["ssh_protocol_server"]
        assert (flow.ssh.hassh, flow.ssh.hassh_server) == (extras["hassh"],
                                                           extras["hassh_server"])
