"""The generated rules on a real kernel, with real traffic, in namespaces made for the test.

The task namespace reaches the net namespace only through the host namespace,
which forwards and where the rules are loaded with egress.enforce.nft (so
libnftables acts in the host namespace, as ``egress run`` will). Each check
is against a real outcome: a connection that succeeds, is refused at once,
or gets no answer at all.
"""

import os
import secrets
import shutil
import time
from pathlib import Path

import pytest

from egress.enforce import ruleset
from egress.enforce.ruleset import (Match, TaskRules, arm_deadman, elements_for_name,
                                    generate_nft, names, refresh_elements, remove_nft)
from tagging import manifest
from tests.factories import PURPOSE_HEAD
from tests.lab.ruleset_topology import (HOST4, HOST6, SERVERS4, SERVERS6, TASK4, TASK6,
                                        UP_NET4, Topology)

PURPOSE = manifest.parse(PURPOSE_HEAD + """
[[allow]]
host = "pkg.example"

[[allow]]
host = "ping.example"
transport = "icmp"
""", "lab.toml")
ALLOWED, OTHER = SERVERS4
ALLOWED6, OTHER6 = SERVERS6
TASK_UID = 64000
FAST = 1.0
"""A rejection arrives at once; anything near a timeout is not one."""


@pytest.fixture
def topo(tmp_path):
    problem = None
    if os.geteuid() != 0:
        problem = "the rule lab needs root (network namespaces, nftables)"
    else:
        missing = [t for t in ("ip", "nsenter", "ping", "setpriv", "sysctl", "conntrack")
                   if shutil.which(t) is None]
        if missing:
            problem = f"the rule lab needs {', '.join(missing)} (tests/system-deps.sh)"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    with Topology(tmp_path) as built:
        built.start_servers()
        yield built


def task_rules(topo, mode="enforce", deadman=60, task="lab-task"):
    return TaskRules(task=task, purpose=PURPOSE, match=Match.parse(f"interface:{topo.task_if}"),
                     mode=mode, resolver4=HOST4, resolver6=HOST6, task_addr4=TASK4,
                     task_addr6=TASK6, deadman_seconds=deadman)


def allow(topo, r, address, name="pkg.example", timeout=60):
    topo.nft(refresh_elements(r, address, elements_for_name(PURPOSE, name), timeout))


def rejected_fast(outcome, how="refused"):
    return outcome["result"] == how and outcome["seconds"] < FAST


def test_enforce_allows_what_the_resolver_admitted_and_rejects_the_rest_fast(topo):
    assert topo.probe("tcp", OTHER, 443)["result"] == "ok"          # reachable without rules
    r = task_rules(topo)
    topo.nft(generate_nft(r))
    allow(topo, r, ALLOWED)
    allow(topo, r, ALLOWED6)
    allow(topo, r, ALLOWED, name="ping.example")

    assert topo.probe("tcp", ALLOWED, 443)["result"] == "ok"
    assert topo.probe("tcp", ALLOWED6, 443)["result"] == "ok"
    assert rejected_fast(topo.probe("tcp", OTHER, 443))
    assert rejected_fast(topo.probe("tcp", OTHER6, 443))
    # The name earned tcp/443 only: UDP to the same address is rejected (admin-prohibited).
    assert rejected_fast(topo.probe("udp", ALLOWED, 5353), "unreachable")
    assert topo.ping(ALLOWED) == "ok"
    assert topo.ping(OTHER) == "filtered"
    # Neighbour discovery between the task and the host still works under the rules.
    for ns in (topo.task_ns, topo.host_ns):
        topo.sh("ip", "-n", ns, "-6", "neigh", "flush", "all")
    assert topo.probe("tcp", ALLOWED6, 443)["result"] == "ok"


def test_a_flow_whose_conntrack_mark_says_block_is_reset(topo):
    r = task_rules(topo)
    topo.nft(generate_nft(r))
    topo.nft(refresh_elements(r, ALLOWED, [("tcp", 7, 7)], 60))
    with topo.held(ALLOWED, 7) as (first, then):
        assert first["result"] == "ok"
        assert then()["result"] == "ok"                  # established: passes
        topo.sh("nsenter", f"--net=/run/netns/{topo.host_ns}", "conntrack", "-U", "-p", "tcp",
                "-d", ALLOWED, "--dport", "7", "--mark", str(r.block_mark))
        assert then()["result"] == "reset"


def test_dns_only_to_the_task_resolver(topo):
    assert topo.probe("udp", UP_NET4, 53)["result"] == "ok"         # answers without rules
    r = task_rules(topo)
    topo.nft(generate_nft(r))
    assert topo.probe("udp", HOST4, 53)["result"] == "ok"           # the resolver, via INPUT
    assert rejected_fast(topo.probe("udp", UP_NET4, 53), "unreachable")
    assert rejected_fast(topo.probe("tcp", UP_NET4, 53))
    # Nothing else on the host answers the task: dropped, so no answer at all.
    assert topo.probe("udp", HOST4, 54, timeout=1)["result"] == "timeout"


def test_anti_spoofing_drops_other_sources(topo):
    topo.sh("ip", "-n", topo.task_ns, "addr", "add", "10.213.0.3/24", "dev", topo.task_side)
    assert topo.probe("tcp", ALLOWED, 443, source="10.213.0.3")["result"] == "ok"
    r = task_rules(topo)
    topo.nft(generate_nft(r))
    allow(topo, r, ALLOWED)
    assert topo.probe("tcp", ALLOWED, 443)["result"] == "ok"
    assert topo.probe("tcp", ALLOWED, 443, source="10.213.0.3", timeout=1)["result"] == "timeout"


def test_audit_mode_passes_and_reloading_rewrites_in_place(topo):
    r = task_rules(topo, mode="audit")
    topo.nft(generate_nft(r))
    assert topo.probe("tcp", OTHER, 443)["result"] == "ok"
    assert rejected_fast(topo.probe("udp", UP_NET4, 53), "unreachable")  # DNS stays ours
    allow(topo, r, ALLOWED)
    enforce = task_rules(topo, mode="enforce")
    topo.nft(generate_nft(enforce))                       # same task, loaded again
    assert rejected_fast(topo.probe("tcp", OTHER, 443))
    assert topo.probe("tcp", ALLOWED, 443)["result"] == "ok"  # the resolver's sets were kept


def test_dead_mans_switch_cuts_everything_until_re_armed(topo):
    r = task_rules(topo, deadman=3)
    armed = time.monotonic()
    topo.nft(generate_nft(r))
    allow(topo, r, ALLOWED, timeout=120)
    assert topo.probe("tcp", ALLOWED, 443)["result"] == "ok"
    time.sleep(max(0.0, armed + 3.5 - time.monotonic()))
    assert topo.probe("tcp", ALLOWED, 443, timeout=1)["result"] == "timeout"
    assert topo.probe("tcp", OTHER, 443, timeout=1)["result"] == "timeout"
    assert topo.probe("udp", HOST4, 53, timeout=1)["result"] == "timeout"
    topo.nft(arm_deadman(r))                               # after expiry: the batch still applies
    assert topo.probe("tcp", ALLOWED, 443)["result"] == "ok"
    topo.nft(arm_deadman(r))                               # and while armed
    assert topo.probe("udp", HOST4, 53)["result"] == "ok"


def test_refresh_works_for_new_live_and_expired_elements(topo):
    r = task_rules(topo)
    topo.nft(generate_nft(r))
    allow(topo, r, ALLOWED, timeout=2)
    allow(topo, r, ALLOWED, timeout=2)                     # live: refreshed, no error
    assert topo.probe("tcp", ALLOWED, 443)["result"] == "ok"
    time.sleep(2.5)
    assert rejected_fast(topo.probe("tcp", ALLOWED, 443))   # expired
    allow(topo, r, ALLOWED, timeout=30)                    # expired: the batch applies
    assert topo.probe("tcp", ALLOWED, 443)["result"] == "ok"


def test_uid_match_filters_the_hosts_own_sockets_of_that_uid_only(topo):
    r = TaskRules(task="lab-uid", purpose=PURPOSE, match=Match.parse(f"uid:{TASK_UID}"),
                  mode="enforce", resolver4=HOST4, deadman_seconds=60)
    host = topo.host_ns
    assert topo.probe("tcp", OTHER, 443, ns=host, uid=TASK_UID)["result"] == "ok"
    topo.nft(generate_nft(r))
    allow(topo, r, ALLOWED)
    assert topo.probe("tcp", ALLOWED, 443, ns=host, uid=TASK_UID)["result"] == "ok"
    assert rejected_fast(topo.probe("tcp", OTHER, 443, ns=host, uid=TASK_UID))
    assert topo.probe("tcp", OTHER, 443, ns=host)["result"] == "ok"       # root: not the task
    assert topo.probe("udp", HOST4, 53, ns=host, uid=TASK_UID)["result"] == "ok"
    assert topo.probe("udp", UP_NET4, 53, ns=host, uid=TASK_UID)["result"] != "ok"


def test_remove_takes_one_task_out_and_leaves_the_other(topo):
    iface = task_rules(topo)
    uid = TaskRules(task="lab-uid", purpose=PURPOSE, match=Match.parse(f"uid:{TASK_UID}"),
                    mode="enforce", resolver4=HOST4, deadman_seconds=60)
    topo.nft(generate_nft(iface))
    topo.nft(generate_nft(uid))
    assert rejected_fast(topo.probe("tcp", OTHER, 443))
    assert rejected_fast(topo.probe("tcp", OTHER, 443, ns=topo.host_ns, uid=TASK_UID))

    topo.nft(remove_nft(iface))
    topo.nft(remove_nft(iface))                              # twice: still fine
    assert topo.probe("tcp", OTHER, 443)["result"] == "ok"
    assert rejected_fast(topo.probe("tcp", OTHER, 443, ns=topo.host_ns, uid=TASK_UID))
    listing = topo.nft("list table inet egress")
    assert names(iface.task) not in listing and names(uid.task) in listing


def test_cgroup_match_filters_sockets_of_processes_in_that_cgroup(topo):
    mount = ruleset.cgroup2_mount()
    if mount is None or not mount.startswith(ruleset.CGROUP_ROOT):
        pytest.skip("no cgroup2 under /sys/fs/cgroup")
    group = Path(mount) / f"egrs{topo.id}{secrets.token_hex(2)}"
    group.mkdir()
    try:
        r = TaskRules(task="lab-cgroup", purpose=PURPOSE, match=Match.parse(f"cgroup:{group}"),
                      mode="enforce", resolver4=HOST4, deadman_seconds=60)
        host = topo.host_ns
        assert topo.probe("tcp", OTHER, 443, ns=host, cgroup=group)["result"] == "ok"
        topo.nft(generate_nft(r))
        allow(topo, r, ALLOWED)
        assert topo.probe("tcp", ALLOWED, 443, ns=host, cgroup=group)["result"] == "ok"
        assert rejected_fast(topo.probe("tcp", OTHER, 443, ns=host, cgroup=group))
        assert topo.probe("tcp", OTHER, 443, ns=host)["result"] == "ok"   # not in the cgroup
        counters = topo.nft(f"list chain inet egress {names(r.task)}_egress")
        assert "egress deny lab-cgroup" in counters and "packets 0 " not in \
            [line for line in counters.splitlines() if "egress deny" in line][0]
    finally:
        deadline = time.monotonic() + 5
        while True:                       # its processes have exited; the kernel may lag
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
