"""A real DNS tunnel (iodine, pinging through it) raises dns-tunnel; autossh -R is found too."""


from egress.records import FlowRecord, TaskEvent
from egress.replay import replay
from egress.sources.capture import CaptureSource
from tagging import manifest
from tagging.attribution import Attribution, parse_networks
from tests.lab.lab import LINK_HOST, LINK_NET

PURPOSE = f'''version = 1
purpose = "Resolve names through the lab's resolver"
task = "lab-dns"

[[allow]]
cidr = "{LINK_NET}/32"
protocol = "dns"
'''


def judged(capture, purpose=PURPOSE):
    out = []
    who = Attribution(task="lab-dns", local=parse_networks([f"{LINK_HOST}/32"]))
    replay(CaptureSource([str(capture)], who), manifest.parse(purpose, "p.toml"),
           on_record=out.append)
    return out


def iodine(lab):
    lab.add_server_address("198.51.100.53")
    lab.spawn("net", "iodined", "-f", "-c", "-l", "198.51.100.53", "-P", "labsecret",
              "10.50.0.1", "t.tunnel.lab", log="iodined.log")
    lab.wait_port("198.51.100.53", 53)
    with lab.recording() as capture:
        client = lab.spawn("host", "iodine", "-f", "-r", "-P", "labsecret", "198.51.100.53",
                           "t.tunnel.lab", log="iodine.log")
        lab.wait_log("iodine.log", "Connection setup complete")
        lab.host("ping", "-c", "15", "-i", "0.2", "10.50.0.1", check=False)
        lab.stop(client)
    return capture


def test_iodine_is_a_dns_tunnel(recorded):
    records = judged(recorded("iodine", iodine))
    events = [r for r in records if isinstance(r, TaskEvent) and r.event == "dns-tunnel"]
    assert len(events) == 1, [r.event for r in records if isinstance(r, TaskEvent)]
    evidence = events[0].findings[0].evidence
    assert evidence.domain == "tunnel.lab" and evidence.distinct_names >= 30
    flows = [r for r in records if isinstance(r, FlowRecord) and r.dst == "198.51.100.53"]
    assert flows and all("undeclared-destination" in {f.id for f in x.findings} for x in flows)


def autossh(lab):
    # Keepalives every second from the client (ServerAliveInterval) interleave with the
    # forwarded connections: they must neither hide the tunnel nor count as work.
    lab.start_dns({"relay.lab": "198.51.100.7"})
    key = lab.start_sshd("198.51.100.7", 22)
    lab.serve_host_http(8080)
    with lab.recording() as capture:
        tunnel = lab.spawn("host", "env", "AUTOSSH_GATETIME=0", "autossh", "-M", "0", "-N",
                           "-F", "/dev/null", "-i", key, "-o", "StrictHostKeyChecking=no",
                           "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                           "-o", "ServerAliveInterval=1", "-R", "9000:127.0.0.1:8080",
                           "root@relay.lab", log="autossh.log")
        lab.use_forward(9000)
        lab.stop(tunnel)
    return capture


def test_autossh_remote_forward_is_found(recorded):
    ssh = [r for r in judged(recorded("autossh", autossh)) if isinstance(r, FlowRecord) and r.app == "ssh"]
    assert len(ssh) == 1
    assert "reverse-ssh-tunnel" in {f.id for f in ssh[0].findings}
