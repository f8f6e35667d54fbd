"""mining-pool: known pools by name (SNI, Host, DNS at start and gate), and a mining port
with mining-shaped totals at the end. Through the real judge: each match form, edge values
around every shape bound (computed from the module's constants), the look-alikes that must
not match (a download on 8888, an SSH session, a short call), and the strict data file."""

from __future__ import annotations

import pytest

from egress.detectors import mining_pool
from egress.detectors.mining_pool import (MAX_BYTES_PER_MIN, MAX_MEAN_PACKET,
                                          MIN_DURATION_S, MIN_PACKETS_PER_MIN, MiningPool,
                                          PoolListError)
from egress.judge import Judge
from egress.records import (MiningPoolEvidence, Mode, Severity, SshInfo, Step, StratumInfo,
                            TlsInfo, Verdict)
from tagging import manifest
from tests.factories import PURPOSE_HEAD, make_judge, T0, make_dns_flow, make_flow, make_http_flow, make_tls_flow

ADDR = "203.0.113.10"
SECOND = 1_000_000
MINUTE = 60 * SECOND

SMALL = '''
source = "test list"
licence = "test licence"

[ports]
ports = [3333, 14444]
source = "test ports"

[[pool]]
name = "testpool"
hosts = ["testpool.test", "*.testpool.test"]
source = "test"

[[pool]]
name = "suffixonly"
hosts = ["*.pools.test"]
source = "test"
'''


def judge_for(text: str = "", mode=Mode.AUDIT, pools=None) -> Judge:
    return make_judge(text, mode, detectors=[MiningPool(pools)])


def resolve(judge: Judge, name: str, address: str = ADDR):
    judge.learn_names(make_dns_flow(name, [address]))


def pools_found(flow) -> list[MiningPoolEvidence]:
    return [f.evidence for f in flow.findings if f.id == "mining-pool"]


@pytest.fixture(scope="module")
def small():
    return mining_pool.parse(SMALL, "small.toml")


# ------------------------------------------------------------------- known pools

@pytest.mark.parametrize("name", [
    "pool.supportxmr.com", "supportxmr.com", "gulf.moneroocean.stream", "mine.c3pool.com",
    "xmr-eu1.nanopool.org", "pool.hashvault.pro", "pool.minexmr.com", "xmr.2miners.com",
    "xmr.f2pool.com", "us1.ethermine.org", "randomxmonero.auto.nicehash.com",
    "rx.unmineable.com", "de.zano.herominers.com", "stratum.antpool.com",
    "eu.stratum.braiins.com", "us-east.stratum.slushpool.com",
])
def test_packaged_pools_by_sni(name):
    j = judge_for()
    flow = j.judge_flow(make_tls_flow(name, dst=ADDR, dport=443))
    assert pools_found(flow) == [MiningPoolEvidence(name=name, port=443, reason="known-pool")]
    finding = next(f for f in flow.findings if f.id == "mining-pool")
    assert finding.severity is Severity.CRITICAL


@pytest.mark.parametrize("name", [
    "braiins.com",          # the firmware and company site, not the pool
    "btc.com",              # a block explorer too: only *.ss.btc.com
    "bitcoin.com",
    "notsupportxmr.com",
    "example.org",
])
def test_shared_and_unrelated_domains_are_not_pools(name):
    j = judge_for()
    assert pools_found(j.judge_flow(make_tls_flow(name, dst=ADDR))) == []


def test_packaged_list_says_where_it_comes_from():
    listed = mining_pool.load()
    assert "Block List Project" in listed.source and "Unlicense" in listed.licence
    assert listed.ports == frozenset({3333, 4444, 5555, 7777, 8888, 9999, 14433, 14444,
                                      45560, 45700})
    assert listed.ports_source
    assert all(p.source and p.hosts for p in listed.pools)
    assert len(listed.pools) < 100            # a focused list, not a blocklist


@pytest.mark.parametrize("name, listed", [
    ("testpool.test", True),
    ("TestPool.Test.", True),
    ("eu.testpool.test", True),
    ("a.b.pools.test", True),
    ("pools.test", False),                 # the suffix itself is not below it
    ("xpools.test", False),
])
def test_exact_and_suffix_entries(small, name, listed):
    j = judge_for(pools=small)
    found = pools_found(j.judge_flow(make_tls_flow(name, dst=ADDR, dport=5555)))
    assert bool(found) is listed
    if listed:
        assert found[0].name == name.lower().rstrip(".") and found[0].port == 5555


def test_a_resolved_name_at_start_without_payload(small):
    j = judge_for(pools=small)
    resolve(j, "eu.testpool.test")
    flow = j.judge_flow(make_flow(dst=ADDR, dport=5555))
    assert pools_found(flow) == [MiningPoolEvidence(name="eu.testpool.test", port=5555,
                                                    reason="known-pool")]
    assert flow.decided_at is Step.START


def test_any_name_the_task_resolved_to_the_destination(small):
    j = judge_for(pools=small)
    resolve(j, "eu.testpool.test")          # earlier
    resolve(j, "innocent.example")          # later: the judge's server_name
    flow = j.judge_flow(make_tls_flow(None, dst=ADDR, dport=5555))
    assert flow.server_name == "innocent.example"
    assert [e.name for e in pools_found(flow)] == ["eu.testpool.test"]


def test_http_host(small):
    j = judge_for(pools=small)
    flow = j.judge_flow(make_http_flow("eu.testpool.test:8080", dst=ADDR, dport=8080))
    assert [e.name for e in pools_found(flow)] == ["eu.testpool.test"]


def test_a_sent_name_counts_even_when_dns_gave_another(small):
    j = judge_for(pools=small)
    resolve(j, "innocent.example")
    flow = j.judge_flow(make_http_flow("eu.testpool.test", dst=ADDR, dport=8080))
    assert flow.server_name == "innocent.example"
    assert [e.name for e in pools_found(flow)] == ["eu.testpool.test"]


def test_a_declared_pool_is_still_blocked(small):
    j = judge_for('[[allow]]\nhost = "eu.testpool.test"\nports = [5555]\nprotocol = "any"\n',
                  Mode.ENFORCE, pools=small)
    resolve(j, "eu.testpool.test")
    flow = j.judge_flow(make_tls_flow("eu.testpool.test", dst=ADDR, dport=5555))
    assert [f.id for f in flow.findings] == ["mining-pool"]
    assert flow.verdict is Verdict.BLOCK and flow.decided_at is Step.START


def test_it_cannot_be_waived():
    with pytest.raises(Exception, match="mining-pool"):
        manifest.parse(PURPOSE_HEAD + 'waive = ["mining-pool"]\n', "t.toml")


# ------------------------------------------------------------------ port and shape

MINER = dict(duration_s=600, bytes_out=20_000, packets_out=100, bytes_in=25_000, packets_in=90)
"""A CPU miner over TLS for ten minutes: a few KiB a minute, a few hundred bytes a packet."""


def shaped(dport=3333, app="tls", duration_s=600, bytes_out=20_000, packets_out=100,
           bytes_in=25_000, packets_in=90, **fields):
    fields.setdefault("tls", TlsInfo(sni=None) if app == "tls" else None)
    return make_flow(dst=ADDR, dport=dport, app=app, start=T0,
                     end=T0 + round(duration_s * SECOND), bytes_out=bytes_out,
                     packets_out=packets_out, bytes_in=bytes_in, packets_in=packets_in,
                     **fields)


def shape_found(flow) -> bool:
    return any(e.reason == "mining-port-and-shape" for e in pools_found(flow))


def judge_shape(flow, pools=None):
    return judge_for(pools=pools).judge_flow(flow)


def test_a_tls_wrapped_miner_matches():
    flow = judge_shape(shaped())
    assert pools_found(flow) == [MiningPoolEvidence(name=None, port=3333,
                                                    reason="mining-port-and-shape")]


@pytest.mark.parametrize("app, matches", [
    ("tls", True), ("unknown", True), ("stratum", True),
    ("ssh", False), ("http", False), ("quic", False), (None, False),
])
def test_only_what_a_pool_speaks(app, matches):
    extra = {"ssh": SshInfo(client="SSH-2.0-OpenSSH_9.2p1")} if app == "ssh" else \
        {"stratum": StratumInfo(method="login")} if app == "stratum" else {}
    assert shape_found(judge_shape(shaped(app=app, **extra))) is matches


@pytest.mark.parametrize("port", [3333, 4444, 5555, 7777, 8888, 9999, 14433, 14444, 45560,
                                  45700])
def test_every_listed_port(port):
    assert shape_found(judge_shape(shaped(dport=port)))


@pytest.mark.parametrize("port", [443, 80, 22, 3334, 8080])
def test_other_ports_are_left_to_the_other_detectors(port):
    assert not shape_found(judge_shape(shaped(dport=port)))


def test_udp_on_a_mining_port_is_not_stratum():
    assert not shape_found(judge_shape(shaped(proto="udp", app="unknown")))


def test_the_ports_come_from_the_data(small):
    assert shape_found(judge_shape(shaped(dport=14444), pools=small))
    assert not shape_found(judge_shape(shaped(dport=4444), pools=small))


def test_duration_bound():
    assert shape_found(judge_shape(shaped(duration_s=MIN_DURATION_S)))
    assert not shape_found(judge_shape(shaped(duration_s=MIN_DURATION_S - 1e-6)))


@pytest.mark.parametrize("direction", ["out", "in"])
def test_volume_bound_each_way(direction):
    minutes = 10
    limit = MAX_BYTES_PER_MIN * minutes
    packets = limit // (MAX_MEAN_PACKET // 2)        # keep the mean packet well inside
    ok = {f"bytes_{direction}": limit - 1, f"packets_{direction}": packets}
    over = {f"bytes_{direction}": limit, f"packets_{direction}": packets}
    assert shape_found(judge_shape(shaped(duration_s=minutes * 60, **ok)))
    assert not shape_found(judge_shape(shaped(duration_s=minutes * 60, **over)))


@pytest.mark.parametrize("direction", ["out", "in"])
def test_mean_packet_bound_each_way(direction):
    packets = 100
    ok = {f"bytes_{direction}": MAX_MEAN_PACKET * packets - 1, f"packets_{direction}": packets}
    over = {f"bytes_{direction}": MAX_MEAN_PACKET * packets, f"packets_{direction}": packets}
    assert shape_found(judge_shape(shaped(**ok)))
    assert not shape_found(judge_shape(shaped(**over)))


@pytest.mark.parametrize("direction", ["out", "in"])
def test_both_sides_must_talk(direction):
    minutes = 10
    least = MIN_PACKETS_PER_MIN * minutes
    ok = {f"packets_{direction}": least, f"bytes_{direction}": least * 100}
    quiet = {f"packets_{direction}": least - 1, f"bytes_{direction}": (least - 1) * 100}
    silent = {f"packets_{direction}": 0, f"bytes_{direction}": 0}
    assert shape_found(judge_shape(shaped(duration_s=minutes * 60, **ok)))
    assert not shape_found(judge_shape(shaped(duration_s=minutes * 60, **quiet)))
    assert not shape_found(judge_shape(shaped(duration_s=minutes * 60, **silent)))


def test_a_big_download_on_8888_does_not_match():
    download = shaped(dport=8888, duration_s=120, bytes_in=50_000_000, packets_in=34_000,
                      bytes_out=900_000, packets_out=17_000)
    assert not shape_found(judge_shape(download))


def test_a_slow_trickle_download_with_full_packets_does_not_match():
    trickle = shaped(dport=8888, duration_s=600, bytes_in=1450 * 300, packets_in=300)
    assert not shape_found(judge_shape(trickle))


def test_an_interactive_ssh_session_does_not_match_but_only_its_protocol_tells():
    session = dict(dport=4444, duration_s=1800, bytes_out=60_000, packets_out=900,
                   bytes_in=90_000, packets_in=800)
    ssh = shaped(app="ssh", ssh=SshInfo(client="SSH-2.0-OpenSSH_9.2p1"), **session)
    assert not shape_found(judge_shape(ssh))
    assert shape_found(judge_shape(shaped(app="unknown", **session)))  # same totals


def test_an_ssh_session_on_22_does_not_match():
    ssh = shaped(dport=22, app="ssh", ssh=SshInfo(client="SSH-2.0-OpenSSH_9.2p1"),
                 duration_s=3600)
    assert not shape_found(judge_shape(ssh))


def test_only_a_final_record_is_judged_on_shape():
    assert not shape_found(judge_shape(shaped(event="interim")))


def test_a_flow_without_an_end_is_not_judged_on_shape():
    flow = shaped()
    flow.end = None
    assert not shape_found(judge_shape(flow))


def test_shape_blocks_a_declared_destination_at_the_end():
    j = judge_for('waive = ["direct-ip"]\n[[allow]]\ncidr = "203.0.113.0/24"\nports = [3333]\n'
                  'protocol = "any"\n', Mode.ENFORCE)
    flow = j.judge_flow(shaped())
    assert [f.id for f in flow.findings if not f.waived] == ["mining-pool"]
    assert flow.verdict is Verdict.BLOCK and flow.decided_at is Step.END


def test_name_and_shape_are_two_findings():
    j = judge_for()
    resolve(j, "pool.supportxmr.com")
    flow = j.judge_flow(shaped(tls=TlsInfo(sni="pool.supportxmr.com")))
    assert sorted(e.reason for e in pools_found(flow)) == ["known-pool",
                                                           "mining-port-and-shape"]
    assert MiningPool.steps == frozenset({Step.START, Step.GATE, Step.END})


# --------------------------------------------------------------------- the file

HEAD = 'source = "s"\nlicence = "l"\n'
PORTS = '[ports]\nports = [3333]\nsource = "p"\n'
POOL = '[[pool]]\nname = "a"\nhosts = ["a.test"]\nsource = "x"\n'


def write(tmp_path, text: str):
    path = tmp_path / "pools.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, key", [
    (HEAD + PORTS + POOL + 'url = "x"\n', r"pool\[0\]\.url"),                 # unknown pool key
    (HEAD + 'extra = 1\n' + PORTS, "extra"),                                  # unknown top key
    (HEAD + '[ports]\nports = [3333]\nsource = "p"\nnote = "x"\n', r"ports\.note"),
    (HEAD + POOL, "ports"),
    ('licence = "l"\n' + PORTS, "source"),
    ('source = "s"\n' + PORTS, "licence"),
    (HEAD + '[ports]\nports = []\nsource = "p"\n', r"ports\.ports"),
    (HEAD + '[ports]\nports = [0]\nsource = "p"\n', r"ports\.ports"),
    (HEAD + '[ports]\nports = [65536]\nsource = "p"\n', r"ports\.ports"),
    (HEAD + '[ports]\nports = ["3333"]\nsource = "p"\n', r"ports\.ports"),
    (HEAD + '[ports]\nports = [true]\nsource = "p"\n', r"ports\.ports"),
    (HEAD + '[ports]\nports = [3333, 3333]\nsource = "p"\n', r"ports\.ports"),
    (HEAD + '[ports]\nports = [3333]\n', r"ports\.source"),
    (HEAD + PORTS + '[[pool]]\nhosts = ["a.test"]\nsource = "x"\n', r"pool\[0\]\.name"),
    (HEAD + PORTS + '[[pool]]\nname = "a"\nsource = "x"\n', r"pool\[0\]\.hosts"),
    (HEAD + PORTS + '[[pool]]\nname = "a"\nhosts = ["*.*.test"]\nsource = "x"\n',
     r"pool\[0\]\.hosts"),
    (HEAD + PORTS + '[[pool]]\nname = "a"\nhosts = ["a.test"]\n', r"pool\[0\]\.source"),
    (HEAD + PORTS + POOL + POOL.replace('hosts = ["a.test"]', 'hosts = ["b.test"]'),
     r"pool\[1\]\.name"),
    (HEAD + PORTS + POOL + POOL.replace('name = "a"', 'name = "b"'), r"pool\[1\]\.hosts"),
    (HEAD + PORTS + 'pool = 3\n', "pool"),
    ('source = "s"\nlicence = \n', "not valid TOML"),
])
def test_a_bad_file_is_refused_naming_the_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(PoolListError, match=key) as e:
        mining_pool.load(path)
    assert str(e.value).startswith(str(path))


def test_a_good_file_loads(tmp_path):
    listed = mining_pool.load(write(tmp_path, HEAD + PORTS + POOL))
    assert listed.ports == frozenset({3333}) and listed.lookup("a.test").name == "a"
    assert listed.source == "s" and listed.licence == "l" and listed.ports_source == "p"
