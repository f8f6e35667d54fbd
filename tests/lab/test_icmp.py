"""Real ping is ping-shaped; a real ICMP tunnel (ptunnel-ng carrying SSH) is not."""

import time

from egress.records import FlowRecord
from egress.replay import replay
from egress.sources.capture import CaptureSource
from tagging import manifest
from tagging.attribution import Attribution, parse_networks
from tests.lab.lab import LINK_HOST

PURPOSE = '''version = 1
purpose = "Reach the lab's hosts by ping"
task = "lab-icmp"
waive = ["direct-ip"]

[[allow]]
cidr = "198.51.100.0/24"
transport = "icmp"
'''


def judged(capture):
    out = []
    replay(CaptureSource([str(capture)], Attribution(task="lab-icmp",
                                                     local=parse_networks([f"{LINK_HOST}/32"]))),
           manifest.parse(PURPOSE, "p.toml"), on_record=out.append)
    return [r for r in out if isinstance(r, FlowRecord) and r.app == "icmp"
            and r.dst.startswith("198.51.100.")]


def ping(lab):
    lab.add_server_address("198.51.100.9")
    with lab.recording() as capture:
        lab.host("ping", "-c", "4", "-i", "0.2", "198.51.100.9")
    return capture


def test_ping_is_clean(recorded):
    (flow,) = judged(recorded("ping", ping))
    assert flow.packets_out == 4 and flow.packets_in == 4
    assert [f.id for f in flow.findings if not f.waived] == [] and flow.verdict.value == "allow"


def ptunnel(lab):
    key = lab.start_sshd("198.51.100.7", 22)
    lab.add_server_address("198.51.100.20")
    lab.spawn("net", "ptunnel-ng", "-r198.51.100.7", "-R22", "-v", "1", log="ptunnel-server.log")
    client = lab.spawn("host", "ptunnel-ng", "-p198.51.100.20", "-l2222", "-r198.51.100.7",
                       "-R22", "-v", "1", log="ptunnel-client.log")
    time.sleep(0.5)
    with lab.recording() as capture:
        done = lab.host("ssh", "-F", "/dev/null", "-i", key, "-p", "2222",
                        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                        "-o", "BatchMode=yes", "root@127.0.0.1", "echo through-icmp",
                        timeout=30, check=False)
    lab.stop(client)
    assert done.stdout.strip() == "through-icmp", done.stderr
    return capture


def test_ptunnel_carrying_ssh_is_an_icmp_tunnel(recorded):
    flows = judged(recorded("ptunnel-ng", ptunnel))
    tunnels = [f for f in flows if any(x.id == "icmp-tunnel" for x in f.findings)]
    assert tunnels, [(f.dst, f.findings) for f in flows]
    evidence = next(x for x in tunnels[0].findings if x.id == "icmp-tunnel").evidence
    assert evidence.packets >= 4 and tunnels[0].verdict.value == "flag"
