"""Real OpenSSH: a reverse tunnel with traffic through it is found; a command's output is not."""


from egress.records import FlowRecord
from egress.replay import replay
from egress.sources.capture import CaptureSource
from tagging import manifest
from tagging.attribution import Attribution, parse_networks
from tests.lab.lab import LINK_HOST, LINK_NET

# SSH to the relay is declared: what is left to find is what the session does.
PURPOSE = f'''version = 1
purpose = "Deploy over SSH to the relay"
task = "lab-ssh"

[[allow]]
cidr = "{LINK_NET}/32"
protocol = "dns"

[[allow]]
host = "relay.lab"
ports = [22]
'''

SSH = ["ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
       "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"]


def ssh_flow(capture):
    out = []
    who = Attribution(task="lab-ssh", local=parse_networks([f"{LINK_HOST}/32"]))
    replay(CaptureSource([str(capture)], who), manifest.parse(PURPOSE, "p.toml"),
           on_record=out.append)
    (flow,) = [r for r in out if isinstance(r, FlowRecord) and r.app == "ssh"]
    return flow


def reverse_tunnel(lab):
    lab.start_dns({"relay.lab": "198.51.100.7"})
    key = lab.start_sshd("198.51.100.7", 22)
    lab.serve_host_http(8080)
    with lab.recording() as capture:
        tunnel = lab.spawn("host", *SSH, "-i", key, "-N", "-R", "9000:127.0.0.1:8080",
                           "root@relay.lab", log="ssh-client.log")
        lab.use_forward(9000)               # someone at the relay uses the tunnel
        lab.stop(tunnel)
    return capture


def test_reverse_tunnel_with_traffic_is_found(recorded):
    flow = ssh_flow(recorded("reverse-ssh-22", reverse_tunnel))
    found = [f for f in flow.findings if f.id == "reverse-ssh-tunnel"]
    assert found, flow.findings
    assert found[0].evidence.source == "traffic"
    assert found[0].evidence.server_first_exchanges >= 3
    assert flow.verdict.value == "flag" and flow.decided_at.value == "watch"


def command_output(lab):
    lab.start_dns({"relay.lab": "198.51.100.7"})
    key = lab.start_sshd("198.51.100.7", 22)
    with lab.recording() as capture:
        done = lab.host(*SSH, "-i", key, "root@relay.lab",
                        "for i in 1 2 3 4 5 6; do echo line $i; sleep 0.3; done")
        assert done.stdout.count("line") == 6
    return capture


def test_a_commands_output_is_not_a_tunnel(recorded):
    flow = ssh_flow(recorded("ssh-command", command_output))
    assert [f.id for f in flow.findings] == [] and flow.verdict.value == "allow"


def ssh_in_tls(lab):
    lab.start_dns({"relay.lab": "198.51.100.7", "cdn.lab": "198.51.100.9"})
    key = lab.start_sshd("198.51.100.7", 2222)
    lab.start_tls_relay("cdn.lab", "198.51.100.9", "198.51.100.7:2222")
    lab.serve_host_http(8080)
    wrap = "openssl s_client -quiet -verify_quiet -connect 198.51.100.9:443 -servername cdn.lab"
    with lab.recording() as capture:
        tunnel = lab.spawn("host", *SSH, "-i", key, "-o", f"ProxyCommand={wrap}", "-N",
                           "-R", "9000:127.0.0.1:8080", "root@relay.lab", log="ssh-tls.log")
        lab.use_forward(9000, times=5)      # the tunnel works through the TLS wrapping
        lab.stop(tunnel)
    return capture


def test_ssh_inside_tls_is_flagged_as_an_undeclared_destination(recorded):
    """`ssh -R` wrapped in TLS by openssl s_client, unwrapped by socat on the relay's 443:
    on the wire a TLS session to cdn.lab, which the purpose did not declare."""
    capture = recorded("ssh-in-tls", ssh_in_tls)
    out = []
    who = Attribution(task="lab-ssh", local=parse_networks([f"{LINK_HOST}/32"]))
    replay(CaptureSource([str(capture)], who), manifest.parse(PURPOSE, "p.toml"),
           on_record=out.append)
    (flow,) = [r for r in out if isinstance(r, FlowRecord) and r.dport == 443]
    assert flow.app == "tls" and flow.tls.sni == "cdn.lab"
    assert "undeclared-destination" in [f.id for f in flow.findings]
    assert flow.verdict.value == "flag"
    assert not [r for r in out if isinstance(r, FlowRecord) and r.app == "ssh"]
