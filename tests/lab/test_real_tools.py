"""Real tools in the lab, recorded, replayed: what egress identifies in their traffic.

curl fetching a package index over TLS after a lookup through the lab's
resolver (dnsmasq), and OpenSSH opening a reverse tunnel (-R) to a relay:
the records must carry the real banners, fingerprints and names, the
index must be allowed, and the SSH to an undeclared relay flagged.
"""

import time

from egress.records import FlowRecord
from egress.replay import replay
from egress.sources.capture import CaptureSource
from tagging import manifest
from tagging.attribution import Attribution, parse_networks
from tests.lab.lab import LINK_HOST, LINK_NET

PURPOSE = f'''version = 1
purpose = "Install Python dependencies from the lab's package index"
task = "lab-task"

[[allow]]
cidr = "{LINK_NET}/32"
protocol = "dns"

[[allow]]
host = "pypi.lab"
'''


def curl_and_reverse_ssh(lab):
    lab.start_dns({"pypi.lab": "203.0.113.10", "relay.lab": "198.51.100.7"})
    ca = lab.start_https("pypi.lab", "203.0.113.10")
    key = lab.start_sshd("198.51.100.7", 22)
    with lab.recording() as capture:
        got = lab.host("curl", "-s", "--cacert", ca, "https://pypi.lab/simple/")
        assert got.stdout == "lab index\n"
        tunnel = lab.spawn("host", "ssh", "-F", "/dev/null", "-i", key, "-N",
                           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                           "-o", "BatchMode=yes", "-R", "9000:localhost:22", "root@relay.lab",
                           log="ssh-client.log")
        time.sleep(2.5)
        assert tunnel.poll() is None, (lab.dir / "ssh-client.log").read_text()
        lab.stop(tunnel)
    return capture


def test_curl_and_reverse_ssh_recorded_and_judged(recorded):
    capture = recorded("curl-and-ssh", curl_and_reverse_ssh)

    purpose = manifest.parse(PURPOSE, "lab.toml")
    who = Attribution(task="lab-task", local=parse_networks([f"{LINK_HOST}/32"]))
    records = []
    replay(CaptureSource([str(capture)], who), purpose, on_record=records.append)
    flows = [r for r in records if isinstance(r, FlowRecord)]

    dns = [f for f in flows if f.app == "dns"]
    asked = {(q.name, q.type): q.answers for f in dns for q in f.dns.queries}
    assert asked.get(("pypi.lab", "A")) == ["203.0.113.10"]
    assert all(f.verdict.value == "allow" for f in dns)

    tls = [f for f in flows if f.app == "tls"]
    assert len(tls) == 1
    web = tls[0]
    assert web.tls.sni == "pypi.lab" and web.tls.ja4.startswith("t13d")
    assert web.server_name == "pypi.lab" and web.name_source == "dns"
    assert web.verdict.value == "allow", web.findings
    assert web.conn_state in ("SF", "RSTO", "RSTR", "S1")

    ssh = [f for f in flows if f.app == "ssh"]
    assert len(ssh) == 1
    relay = ssh[0]
    assert relay.ssh.client.startswith("SSH-2.0-OpenSSH_")
    assert relay.ssh.server.startswith("SSH-2.0-OpenSSH_")
    assert len(relay.ssh.hassh) == 32 and len(relay.ssh.hassh_server) == 32
    assert relay.server_name == "relay.lab" and relay.dport == 22
    assert {f.id for f in relay.findings} >= {"undeclared-destination", "ssh-egress"}
    assert relay.verdict.value == "flag"
    ip_flows = [f for f in flows if not f.dst.startswith(("ff02:", "fe80:"))]
    assert all(f.direction == "outbound" and f.task == "lab-task" for f in ip_flows)
    # IPv6 neighbour discovery and MLD stay on the link: recorded, never flagged
    assert all(f.verdict.value == "allow" for f in flows if f not in ip_flows)
