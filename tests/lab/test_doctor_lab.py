"""egress doctor run for real, as root, inside the lab's task host namespace: its probes make
and delete a scratch namespace of their own, and it reads (never changes) the ruleset of the
namespace it runs in, so a Docker-like table loaded there is found and named."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

EGRESS = str(Path(sys.executable).parent / "egress")
DOCKER_LIKE = """table ip filter {
  chain FORWARD {
    type filter hook forward priority 0; policy drop;
  }
}
"""


def doctor(lab) -> tuple[dict, subprocess.CompletedProcess]:
    done = lab.host(EGRESS, "doctor", "--json", check=False, timeout=120)
    report = json.loads(done.stdout)
    scratch = next(c for c in report["checks"] if c["name"] == "netns")["facts"]["name"]
    assert scratch.startswith("egdoc") and not Path("/run/netns", scratch).exists()
    return report, done


def by_name(report: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for c in report["checks"]:
        out.setdefault(c["name"], []).append(c)
    return out


def nft_has_queue(lab, tmp_path) -> bool:
    """Whether nft's queue statement loads here, asked of nft itself (a table of the lab's)."""
    probe = tmp_path / "queue.nft"
    probe.write_text("table inet queue_probe {\n  chain c {\n    type filter hook forward "
                     "priority 0; policy accept;\n    queue num 3\n  }\n}\n")
    got = lab.host("nft", "-f", probe, check=False)
    lab.host("nft", "delete", "table", "inet", "queue_probe", check=False)
    return got.returncode == 0


def test_doctor_in_the_lab(lab, tmp_path):
    report, done = doctor(lab)
    assert done.returncode == 0, done.stdout + done.stderr
    checks = by_name(report)
    assert report["status"] in ("ok", "warn")
    assert checks["privileges"][0]["status"] == "ok"
    assert checks["netns"][0]["status"] == "ok"
    assert checks["nftables"][0]["status"] == "ok", checks["nftables"]
    assert all(checks["nftables"][0]["facts"]["features"].values())
    gate = checks["inline-gate"][0]
    assert gate["status"] == "ok"
    assert gate["facts"]["iptables_nfqueue"] == {"ipv4": True, "ipv6": True}
    # Here (KERNEL.md) nft has no queue statement: the gate goes through iptables-nft.
    assert gate["facts"]["nft_queue"] is nft_has_queue(lab, tmp_path)
    if not gate["facts"]["nft_queue"]:
        assert gate["facts"]["path"] == "iptables-nft"
        assert "nft queue statement absent" in gate["detail"]
    assert checks["nflog"][0]["status"] == "ok"
    assert checks["conntrack"][0]["status"] == "ok"
    [firewall] = checks["firewall"]
    assert firewall["status"] == "ok"                       # the lab host has no other table
    # ip netns exec hid /sys/fs/cgroup: said, as a warning only.
    assert checks["cgroup"][0]["status"] == "warn"


def test_doctor_names_a_docker_like_forward_drop_and_its_fix_works(lab, tmp_path):
    rules = tmp_path / "docker-like.nft"
    rules.write_text(DOCKER_LIKE)
    lab.host("nft", "-f", rules)
    report, done = doctor(lab)
    assert done.returncode == 0, done.stdout + done.stderr      # a warning, not a failure
    [warn] = [c for c in by_name(report)["firewall"] if c["status"] == "warn"]
    assert "table ip filter chain FORWARD" in warn["detail"]
    assert "policy drop" in warn["detail"]
    assert (warn["facts"]["family"], warn["facts"]["table"], warn["facts"]["chain"]) == \
        ("ip", "filter", "FORWARD")
    assert "-i egt+ -j ACCEPT" in warn["fix"]
    # Docker's own layout: the fix goes into DOCKER-USER; applying it as printed clears it.
    lab.host("iptables-nft", "-N", "DOCKER-USER")
    lab.host("iptables-nft", "-A", "FORWARD", "-j", "DOCKER-USER")
    report, _ = doctor(lab)
    [warn] = [c for c in by_name(report)["firewall"] if c["status"] == "warn"]
    assert warn["facts"]["kind"] == "docker" and "DOCKER-USER" in warn["fix"]
    for command in warn["fix"].split("; "):
        argv = shlex.split(command)
        lab.host("iptables-nft", *argv[1:])                   # iptables, as iptables-nft
    report, done = doctor(lab)
    [firewall] = by_name(report)["firewall"]
    assert firewall["status"] == "ok" and firewall["facts"]["passes_tasks"] is True
    # The root namespace never saw any of it.
    root = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert "egress_doctor" not in root
