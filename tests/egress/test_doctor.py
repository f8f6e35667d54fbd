"""egress doctor's pure parts: other firewalls in a ruleset, the cgroup layout, pools against
routes, privileges, tools, and how probe results become report lines."""

import json

import pytest

from egress.enforce import doctor as d
from egress.enforce.doctor import FAIL, OK, WARN, Probes


# ------------------------------------------------------------------ rulesets as nft -j lists

def table(family, name):
    return {"table": {"family": family, "name": name, "handle": 1}}


def base(family, tbl, name, hook, policy="accept", prio=0):
    return {"chain": {"family": family, "table": tbl, "name": name, "handle": 2,
                      "type": "filter", "hook": hook, "prio": prio, "policy": policy}}


def chain(family, tbl, name):
    return {"chain": {"family": family, "table": tbl, "name": name, "handle": 3}}


def rule(family, tbl, chain_name, *expr):
    return {"rule": {"family": family, "table": tbl, "chain": chain_name, "handle": 9,
                     "expr": list(expr)}}


def iface(key, name):
    return {"match": {"op": "==", "left": {"meta": {"key": key}}, "right": name}}


COUNTER = {"counter": {"packets": 0, "bytes": 0}}
ACCEPT = {"accept": None}


def ruleset(*objects):
    return {"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
                         *objects]}


def docker(family="ip", fixed=False):
    """What Docker leaves through iptables-nft: FORWARD policy drop, DOCKER-USER first."""
    objs = [table(family, "filter"), base(family, "filter", "INPUT", "input"),
            base(family, "filter", "FORWARD", "forward", "drop"),
            base(family, "filter", "OUTPUT", "output"),
            chain(family, "filter", "DOCKER-USER"), chain(family, "filter", "DOCKER"),
            rule(family, "filter", "FORWARD", COUNTER, {"jump": {"target": "DOCKER-USER"}}),
            rule(family, "filter", "FORWARD", iface("oifname", "docker0"),
                 {"xt": {"type": "match", "name": "conntrack"}}, COUNTER, ACCEPT),
            rule(family, "filter", "DOCKER-USER", COUNTER, {"return": None})]
    if fixed:   # what `iptables -I DOCKER-USER -i egt+ ...` and `-o egt+ ...` add
        objs += [rule(family, "filter", "DOCKER-USER", iface("oifname", "egt*"),
                      {"xt": {"type": "match", "name": "conntrack"}}, COUNTER, ACCEPT),
                 rule(family, "filter", "DOCKER-USER", iface("iifname", "egt*"), COUNTER,
                      ACCEPT)]
    return objs


REJECT_ADMIN = {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}


def firewalld(trusted_egt=False):
    """firewalld 1.x: policy accept, but a final reject after the zone dispatch."""
    t = ("inet", "firewalld")
    objs = [table(*t), base(*t, "filter_INPUT", "input", prio=10),
            base(*t, "filter_FORWARD", "forward", prio=10),
            base(*t, "filter_OUTPUT", "output", prio=10),
            chain(*t, "filter_INPUT_ZONES"), chain(*t, "filter_FORWARD_ZONES"),
            chain(*t, "filter_IN_public"), chain(*t, "filter_FWD_trusted"),
            rule(*t, "filter_INPUT", {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                                "right": ["established", "related"]}}, ACCEPT),
            rule(*t, "filter_INPUT", {"jump": {"target": "filter_INPUT_ZONES"}}),
            rule(*t, "filter_INPUT", REJECT_ADMIN),
            rule(*t, "filter_FORWARD", {"jump": {"target": "filter_FORWARD_ZONES"}}),
            rule(*t, "filter_FORWARD", REJECT_ADMIN),
            rule(*t, "filter_INPUT_ZONES", iface("iifname", "eth0"),
                 {"goto": {"target": "filter_IN_public"}})]
    if trusted_egt:
        objs += [rule(*t, "filter_FORWARD_ZONES", iface("iifname", "egt*"),
                      {"goto": {"target": "filter_FWD_trusted"}}),
                 rule(*t, "filter_INPUT_ZONES", iface("iifname", "egt*"),
                      {"goto": {"target": "filter_IN_trusted"}})]
    return objs


def warnings(checks):
    return [c for c in checks if c.status == WARN]


def test_docker_forward_drop_is_named_with_the_docker_user_fix():
    checks = d.firewall_checks(ruleset(*docker()))
    [warn] = warnings(checks)
    assert warn.name == "firewall"
    assert "table ip filter chain FORWARD" in warn.detail and "policy drop" in warn.detail
    assert warn.fix == ("iptables -I DOCKER-USER -i egt+ -j ACCEPT; iptables -I DOCKER-USER "
                        "-o egt+ -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")
    assert warn.facts["kind"] == "docker" and warn.facts["hook"] == "forward"


def test_docker_with_the_fix_in_place_is_ok():
    [check] = d.firewall_checks(ruleset(*docker(fixed=True)))
    assert check.status == OK and check.facts["passes_tasks"] is True
    assert "table ip filter chain FORWARD" in check.detail


def test_docker_ipv6_is_fixed_with_ip6tables():
    [warn] = warnings(d.firewall_checks(ruleset(*docker("ip"), *docker("ip6"))))[1:]
    assert "table ip6 filter chain FORWARD" in warn.detail
    assert warn.fix.startswith("ip6tables -I DOCKER-USER -i egt+ -j ACCEPT")


def test_plain_iptables_policy_drop_is_fixed_in_its_own_chain():
    rs = ruleset(table("ip", "filter"), base("ip", "filter", "FORWARD", "forward", "drop"),
                 base("ip", "filter", "INPUT", "input", "drop"))
    by_chain = {c.facts["chain"]: c for c in warnings(d.firewall_checks(rs))}
    assert set(by_chain) == {"FORWARD", "INPUT"}
    assert by_chain["FORWARD"].facts["kind"] == "iptables"
    assert by_chain["FORWARD"].fix.startswith("iptables -I FORWARD -i egt+ -j ACCEPT; ")
    assert "DNS to the task resolver" in by_chain["INPUT"].detail
    assert by_chain["INPUT"].fix == ("iptables -I INPUT -i egt+ -p udp --dport 53 -j ACCEPT; "
                                     "iptables -I INPUT -i egt+ -p tcp --dport 53 -j ACCEPT")


def test_firewalld_is_one_line_saying_trusted_zone():
    checks = d.firewall_checks(ruleset(*firewalld()))
    [warn] = checks
    assert warn.status == WARN and "firewalld" in warn.detail
    assert "--zone=trusted --add-interface=egt+" in warn.fix
    assert set(warn.facts["chains"]) == {"table inet firewalld chain filter_INPUT",
                                         "table inet firewalld chain filter_FORWARD"}


def test_firewalld_with_egt_in_a_zone_is_ok():
    [check] = d.firewall_checks(ruleset(*firewalld(trusted_egt=True)))
    assert check.status == OK


def test_native_nft_table_gets_an_nft_fix():
    rs = ruleset(table("inet", "filter"), base("inet", "filter", "forward", "forward", "drop"))
    [warn] = d.firewall_checks(rs)
    assert warn.facts["kind"] == "nft"
    assert warn.fix == ('nft insert rule inet filter forward iifname "egt*" accept; '
                        'nft insert rule inet filter forward oifname "egt*" '
                        'ct state established,related accept')


@pytest.mark.parametrize("objects", [
    [],                                                              # nothing loaded
    [table("inet", "egress"), base("inet", "egress", "forward_filter", "forward", "drop")],
    [table("inet", "filter"), base("inet", "filter", "forward", "forward")],   # accept
    [table("inet", "filter"), base("inet", "filter", "output", "output", "drop")],
    [table("inet", "filter"), base("inet", "filter", "forward", "forward"),     # drop, matched
     rule("inet", "filter", "forward", iface("iifname", "eth9"), {"drop": None})],
    [table("bridge", "filter"), base("bridge", "filter", "forward", "forward", "drop")],
])
def test_what_does_not_block_task_traffic(objects):
    [check] = d.firewall_checks(ruleset(*objects))
    assert check.status == OK and "no other table drops" in check.detail


def test_a_final_catch_all_drop_counts_like_a_policy():
    rs = ruleset(table("inet", "filter"), base("inet", "filter", "forward", "forward"),
                 rule("inet", "filter", "forward", iface("iifname", "lo"), ACCEPT),
                 rule("inet", "filter", "forward", COUNTER, {"drop": None}))
    [warn] = d.firewall_checks(rs)
    assert warn.status == WARN and "a final drop rule" in warn.detail


# ------------------------------------------------------------------ cgroup layout

V2 = """\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
"""
HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
NETNS_EXEC = "25 30 0:99 / /sys rw,relatime - sysfs egdoc rw\n"   # /sys remounted, no cgroup


def test_pure_cgroup2():
    layout = d.parse_mountinfo(V2)
    assert layout.kind == "v2" and layout.mount == "/sys/fs/cgroup"
    assert d.cgroup_check(layout).status == OK
    assert d.probe_cgroup(layout, "0::/user.slice/session-1.scope\n") == \
        (2, "user.slice/session-1.scope")
    assert d.probe_cgroup(layout, "0::/\n") is None        # the root has no path to name


def test_hybrid_cgroups_warn_with_the_unified_prefix():
    layout = d.parse_mountinfo(HYBRID)
    assert layout.kind == "hybrid" and layout.mount == "/sys/fs/cgroup/unified"
    assert layout.v1 == ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/systemd"]
    check = d.cgroup_check(layout)
    assert check.status == WARN and "unified/..." in check.detail
    assert d.probe_cgroup(layout, "1:cpu:/\n0::/\n") == (0, "unified")
    assert d.probe_cgroup(layout, "0::/egress/t1\n") == (2, "unified/egress/t1")


@pytest.mark.parametrize("text, kind", [
    (NETNS_EXEC, "none"),
    ("32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n", "v1"),
    ("41 31 0:38 / /mnt/cg2 rw - cgroup2 cgroup2 rw\n", "elsewhere"),
])
def test_cgroup_layouts_without_a_usable_cgroup2(text, kind):
    layout = d.parse_mountinfo(text)
    assert layout.kind == kind
    assert d.cgroup_check(layout).status == WARN
    assert d.probe_cgroup(layout, "0::/x\n") is None


def test_mountinfo_escapes_and_optional_fields():
    text = "41 31 0:38 / /sys/fs/cgroup/my\\040cg rw shared:1 master:2 - cgroup2 cgroup2 rw\n"
    assert d.parse_mountinfo(text).cgroup2 == ["/sys/fs/cgroup/my cg"]


# ------------------------------------------------------------------ pools against routes

ROUTES4 = [{"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"},
           {"dst": "192.0.2.0/24", "dev": "eth0"},
           {"type": "local", "dst": "127.0.0.1", "dev": "lo", "table": "local"}]


def test_pool_free():
    check = d.pool_check("pool-ipv4", "10.213.0.0/16", ROUTES4)
    assert check.status == OK and check.facts["overlaps"] == []


def test_pool_partly_taken_warns_naming_the_routes():
    routes = ROUTES4 + [{"dst": "10.213.4.0/24", "dev": "wg0"}]
    check = d.pool_check("pool-ipv4", "10.213.0.0/16", routes)
    assert check.status == WARN and "10.213.4.0/24" in check.detail
    assert "pools.ipv4" in check.fix


@pytest.mark.parametrize("dsts", [["10.0.0.0/8"], ["10.213.0.0/17", "10.213.128.0/17"],
                                  ["10.213.0.0/16"]])
def test_pool_covered_fails(dsts):
    routes = ROUTES4 + [{"dst": x, "dev": "tun0"} for x in dsts]
    check = d.pool_check("pool-ipv4", "10.213.0.0/16", routes)
    assert check.status == FAIL and "no task network" in check.detail


def test_egress_own_task_links_are_not_overlaps():
    routes = ROUTES4 + [{"dst": "10.213.0.0/30", "dev": "egt1a2b3c", "protocol": "kernel"}]
    assert d.pool_check("pool-ipv4", "10.213.0.0/16", routes).status == OK


def test_ipv6_pool():
    routes = [{"dst": "fe80::/64", "dev": "eth0"}, {"dst": "default", "dev": "eth0"},
              {"dst": "fd65:6772:6573:9::/64", "dev": "vpn0"}]
    check = d.pool_check("pool-ipv6", "fd65:6772:6573::/48", routes)
    assert check.status == WARN and check.facts["overlaps"] == ["fd65:6772:6573:9::/64"]
    assert d.pool_check("pool-ipv6", "fd65:6772:6573::/48", routes[:2]).status == OK


# ------------------------------------------------------------------ privileges, tools

STATUS = "Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t{}\nCapBnd:\t000001ffffffffff\n"


@pytest.mark.parametrize("euid, capeff, status", [
    (0, "000001ffffffffff", OK),
    (0, "0000000000000000", FAIL),           # root with capabilities dropped
    (1000, "0000000000001000", WARN),        # CAP_NET_ADMIN (bit 12) without root
    (1000, "0000000000000000", FAIL),
    (1000, "0000000000000800", FAIL),        # bit 11 is not CAP_NET_ADMIN
])
def test_privileges(euid, capeff, status):
    check = d.privileges_check(euid, d.capabilities(STATUS.format(capeff)))
    assert check.status == status
    if status == FAIL:
        assert "sudo" in check.fix


def test_tools_name_the_debian_package():
    have = {"ip", "nft", "nsenter", "unshare", "setpriv", "useradd"}
    check = d.tools_check(lambda t: f"/usr/sbin/{t}" if t in have else None)
    assert check.status == WARN and check.fix == "apt-get install iptables"
    check = d.tools_check(lambda t: None if t in ("nft", "setpriv") else "/bin/x")
    assert check.status == FAIL and check.fix == "apt-get install nftables util-linux"
    assert d.tools_check(lambda t: None if t == "useradd" else "/bin/x",
                         task_user_exists=True).status == OK


# ------------------------------------------------------------------ probes -> lines

NO_QUEUE = "Error: Could not process rule: No such file or directory: add rule inet x gate queue"


def probes(**kw):
    p = Probes(features={k: None for k in d.FEATURES}, removed=True, nflog=None,
               conntrack={"nf_conntrack_acct": "0", "nf_conntrack_timestamp": "0"})
    for k, v in kw.items():
        if k in ("queue", "log group", "ct mark", "socket cgroupv2"):
            p.features[k] = v
        else:
            setattr(p, k, v)
    return p


def test_gate_by_nft_queue():
    check = d.gate_check(probes(queue=None), 3)
    assert check.status == OK and check.facts["path"] == "nft queue"


def test_gate_by_iptables_nft_when_nft_has_no_queue():
    check = d.gate_check(probes(queue=NO_QUEUE, xt_nfqueue={"ipv4": None, "ipv6": None}), 3)
    assert check.status == OK and check.facts["path"] == "iptables-nft"
    assert check.facts["nft_queue"] is False and "absent" in check.detail
    assert "add rule" not in check.detail


def test_gate_fails_with_neither():
    check = d.gate_check(probes(queue=NO_QUEUE,
                                xt_nfqueue={"ipv4": "iptables-nft not found",
                                            "ipv6": "ip6tables-nft not found"}), 3)
    assert check.status == FAIL and "CONFIG_NFT_QUEUE" in check.fix


def test_gate_for_one_family_only_warns():
    check = d.gate_check(probes(queue=NO_QUEUE, xt_nfqueue={"ipv4": None, "ipv6": "x"}), 3)
    assert check.status == WARN


def test_a_refused_feature_is_named_with_its_kernel_option():
    check = d.nftables_check(probes(**{"ct mark": "Error: Could not process rule: "
                                                  "Operation not supported"}))
    assert check.status == FAIL and check.detail.startswith("refused in a scratch namespace: "
                                                            "ct mark: ")
    assert "CONFIG_NFT_CT" in check.fix
    assert d.nftables_check(probes()).status == OK
    assert d.nftables_check(probes(nft_error="cannot load libnftables.so.1")).status == FAIL


def test_nflog_conntrack_socket_lines():
    assert d.nflog_check(probes(), 7).status == OK
    assert d.nflog_check(probes(nflog="NFLOG group 7: Device or resource busy"), 7).status == FAIL
    assert d.conntrack_check(probes()).status == OK
    missing = probes(conntrack={"nf_conntrack_acct": "1", "nf_conntrack_timestamp": None})
    assert d.conntrack_check(missing).status == FAIL
    assert d.socket_cgroup_check(probes(**{"socket cgroupv2": None}),
                                 (0, "unified")).status == OK
    assert d.socket_cgroup_check(probes(**{"socket cgroupv2": "Error: x"}),
                                 (0, "unified")).status == WARN
    assert d.socket_cgroup_check(probes(), None).status == WARN


def test_forwarding_modes(tmp_path):
    conf = tmp_path / "net/ipv6/conf"
    (conf / "eth0").mkdir(parents=True)
    (tmp_path / "net/ipv4").mkdir(parents=True)
    (tmp_path / "net/ipv4/ip_forward").write_text("0\n")
    assert d.ipv6_forwarding_check(str(tmp_path)).facts["mode"] == "global"
    assert d.ipv6_forwarding_check(str(tmp_path)).status == WARN
    (conf / "eth0/force_forwarding").write_text("0\n")
    assert d.ipv6_forwarding_check(str(tmp_path)).status == OK
    v4 = d.ipv4_forwarding_check(str(tmp_path))
    assert v4.status == OK and "global off" in v4.detail


def test_report_is_json_with_the_worst_status():
    checks = [d.Check("a", OK, "fine"), d.Check("b", WARN, "hm", "do x")]
    doc = json.loads(json.dumps(d.report(checks)))
    assert doc["status"] == WARN and [c["name"] for c in doc["checks"]] == ["a", "b"]
    assert d.worst(checks + [d.Check("c", FAIL, "no")]) == FAIL


def test_a_fix_counts_only_in_the_chains_it_reaches():
    rs = ruleset(table("ip", "filter"), base("ip", "filter", "FORWARD", "forward", "drop"),
                 base("ip", "filter", "INPUT", "input", "drop"), chain("ip", "filter", "MINE"),
                 rule("ip", "filter", "FORWARD", {"jump": {"target": "MINE"}}),
                 rule("ip", "filter", "MINE", iface("iifname", "egt*"), ACCEPT),
                 rule("ip", "filter", "MINE", iface("oifname", "egt*"), ACCEPT))
    status = {c.facts["chain"]: c.status for c in d.firewall_checks(rs)}
    assert status == {"FORWARD": OK, "INPUT": WARN}


def test_replies_pass_by_a_plain_established_accept():
    established = {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                             "right": ["established", "related"]}}
    rs = ruleset(table("inet", "filter"), base("inet", "filter", "forward", "forward", "drop"),
                 rule("inet", "filter", "forward", established, ACCEPT),
                 rule("inet", "filter", "forward", iface("iifname", "egt*"), ACCEPT))
    assert [c.status for c in d.firewall_checks(rs)] == [OK]
    without = ruleset(*[o for o in rs["nftables"][1:] if "rule" not in o
                        or o["rule"]["expr"][0] is not established])
    assert [c.status for c in d.firewall_checks(without)] == [WARN]


@pytest.mark.parametrize("nsswitch,nscd,status", [
    ("hosts:          files dns\n", False, "ok"),
    ("hosts: files resolve [!UNAVAIL=return] dns\n", False, "warn"),
    ("hosts: files dns resolve\n", False, "ok"),
    ("hosts: files myhostname resolve\n", False, "warn"),
    ("hosts: files dns\n", True, "warn"),
    ("", False, "ok"),
])
def test_host_lookups_that_bypass_port_53_are_reported(nsswitch, nscd, status):
    from egress.enforce.doctor import host_lookups_check
    check = host_lookups_check(nsswitch, nscd)
    assert check.status == status and check.name == "host-lookups"
    if status == "warn":
        assert check.fix
