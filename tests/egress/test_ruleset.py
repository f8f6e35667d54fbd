"""The rule generator: its text, and the real nft, ipset and iptables accepting it.

Tools run in a scratch network namespace made per test (never the root one);
those tests need root and skip without it, unless CI=true (then they fail).
"""

import ctypes
import os
import re
import secrets
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main
from egress.enforce import ruleset
from egress.enforce.nft import Nft, NftError, one_line
from egress.enforce.ruleset import (Match, TaskRules, arm_deadman, elements_for_name,
                                    generate_iptables, generate_nft, names, refresh_elements,
                                    remove_nft)
from tagging import manifest
from tests.factories import PURPOSE_HEAD

RICH = PURPOSE_HEAD + """
profiles = ["pypi"]

[[allow]]
host = "api.example.org"
ports = [443, "8000-8080"]

[[allow]]
host = "*.example.org"
ports = ["1-1024", 53]
transport = "udp"

[[allow]]
host = "ping.example.org"
transport = "icmp"

[[allow]]
cidr = "198.51.100.0/24"
ports = [22, 443, "400-500"]

[[allow]]
cidr = "198.51.100.128/25"
ports = [22, 443, "400-500"]

[[allow]]
cidr = "2001:db8::/32"
ports = ["8000-8100", 443]

[[allow]]
cidr = "2001:db8:1::/48"
transport = "udp"
ports = [3478]

[[allow]]
cidr = "203.0.113.0/24"
transport = "icmp"

[[allow]]
cidr = "2001:db8:ffff::/48"
transport = "icmp"

[[allow]]
cidr = "10.213.0.1/32"
protocol = "dns"
"""
PURPOSE = manifest.parse(RICH, "rich.toml")
MATCHES = ["interface:veth-t1", "uid:1001"]


def rules(match="interface:veth-t1", mode="enforce", task="fix-1234", **kw):
    kw.setdefault("resolver4", "10.213.0.1")
    kw.setdefault("resolver6", "fd00:213::1")
    if match.startswith("interface:"):
        kw.setdefault("task_addr4", "10.213.0.2")
        kw.setdefault("task_addr6", "fd00:213::2")
    return TaskRules(task=task, purpose=PURPOSE, match=Match.parse(match), mode=mode, **kw)


def chain_rules(text: str, chain_suffix: str) -> list[str]:
    return [line.split(f"{chain_suffix} ", 1)[1] for line in text.splitlines()
            if line.startswith("add rule ") and f"{chain_suffix} " in line]


# -------------------------------------------------------------------- match

@pytest.mark.parametrize("text, kind, value", [
    ("interface:veth-t1", "interface", "veth-t1"),
    ("uid:1001", "uid", 1001),
    ("cgroup:/egress/t1", "cgroup", "egress/t1"),
    ("cgroup:egress//t1/", "cgroup", "egress/t1"),
])
def test_match_parse(text, kind, value):
    m = Match.parse(text)
    assert (m.kind, m.value) == (kind, value) and Match.parse(str(m)) == m


def test_match_accepts_the_cgroup_directory_itself():
    mount = ruleset.cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 here")
    assert Match.parse(f"cgroup:{mount}/egress/t1").value == "egress/t1"


@pytest.mark.parametrize("text, problem", [
    ("veth0", "expected interface:NAME"),
    ("interface:", "expected interface:NAME"),
    ("interface:a-name-far-too-long", "not an interface name"),
    ("interface:veth*", "not an interface name"),
    ('interface:a"b', "not an interface name"),
    ("uid:root", "not a numeric uid"),
    ("uid:-5", "not a numeric uid"),
    ("uid:0", "uid 0 would match root"),
    ("cgroup:/", "root would match every process"),
    ("cgroup:a/../b", "not a plain cgroup name"),
    ('cgroup:a/"b', "not a plain cgroup name"),
    ("cgroup:" + "/x" * 9, "deeper than 8"),
    ("pid:42", "not interface, uid or cgroup"),
])
def test_match_parse_errors_are_one_line(text, problem):
    with pytest.raises(ValueError) as e:
        Match.parse(text)
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_nft_cgroup_path_is_relative_to_sys_fs_cgroup():
    assert ruleset.nft_cgroup_path("egress/t1", "/sys/fs/cgroup/unified") == "unified/egress/t1"
    assert ruleset.nft_cgroup_path("egress/t1", "/sys/fs/cgroup") == "egress/t1"
    with pytest.raises(ValueError, match="outside /sys/fs/cgroup"):
        ruleset.nft_cgroup_path("egress/t1", "/mnt/cg2")


# ------------------------------------------------------------------- naming

@pytest.mark.parametrize("task", ["fix-1234", "a", "x" * 128, "a.b:c_d-e", "9lives", "fwd",
                                  "accept", "FIX-1234"])
def test_names_are_plain_unique_identifiers(task):
    prefix = names(task)
    assert re.fullmatch(r"t_[A-Za-z0-9_]+_[0-9a-f]{8}", prefix) and len(prefix) <= 44
    assert names(task) == prefix


def test_names_differ_for_ids_that_sanitise_alike():
    ids = ["a-b", "a.b", "a:b", "a_b", "A-b"]
    assert len({names(t) for t in ids}) == len(ids)


def test_task_rules_validate():
    with pytest.raises(ValueError, match="not audit or enforce"):
        rules(mode="loose")
    with pytest.raises(ValueError, match="not an IPv4 address"):
        rules(resolver4="fd00::1")
    with pytest.raises(ValueError, match="not a task id"):
        rules(task="has space")
    with pytest.raises(ValueError, match="inside the mark mask"):
        rules(block_mark=0x1, mark_mask=0xF0)
    assert rules(mode=manifest.Mode.AUDIT).mode == "audit"


# ---------------------------------------------------------- what names earn

def test_elements_for_name():
    assert elements_for_name(PURPOSE, "API.Example.org.") == [
        ("tcp", 443, 443), ("tcp", 8000, 8080), ("udp", 1, 1024), ("udp", 53, 53)]
    assert elements_for_name(PURPOSE, "ping.example.org") == [
        ("icmp", 0, 0), ("udp", 1, 1024), ("udp", 53, 53)]
    assert elements_for_name(PURPOSE, "example.org") == []          # not the suffix itself
    assert elements_for_name(PURPOSE, "pypi.org") == [("tcp", 443, 443)]
    assert elements_for_name(PURPOSE, "evil.example") == []
    assert elements_for_name(PURPOSE, "not a name..") == []


def test_refresh_is_add_delete_add_into_the_right_sets():
    r = rules()
    p = names(r.task)
    text = refresh_elements(r, "203.0.113.10", elements_for_name(PURPOSE, "api.example.org"), 60)
    lines = text.splitlines()
    assert len(lines) == 4 * 3
    assert lines[:3] == [
        f"add element inet egress {p}_h4 {{ 203.0.113.10 . tcp . 443 timeout 60s }}",
        f"delete element inet egress {p}_h4 {{ 203.0.113.10 . tcp . 443 }}",
        f"add element inet egress {p}_h4 {{ 203.0.113.10 . tcp . 443 timeout 60s }}"]
    assert any(f"{p}_r4_" in line and "{ 203.0.113.10 timeout 60s }" in line for line in lines)
    six = refresh_elements(r, "2001:db8::10", [("icmp", 0, 0)], 5)
    assert f"add element inet egress {p}_i6 {{ 2001:db8::10 timeout 5s }}" in six
    assert refresh_elements(r, "203.0.113.10", [], 60) == ""
    with pytest.raises(ValueError, match="no port range"):
        refresh_elements(r, "203.0.113.10", [("tcp", 1, 2)], 60)
    with pytest.raises(ValueError):
        refresh_elements(r, "not-an-address", [("tcp", 443, 443)], 60)


def test_arm_deadman_is_add_delete_add_of_the_tasks_key():
    r = rules(deadman_seconds=7)
    p = names(r.task)
    assert arm_deadman(r).splitlines() == [
        f'add element inet egress {p}_live {{ "veth-t1" timeout 7s }}',
        f'delete element inet egress {p}_live {{ "veth-t1" }}',
        f'add element inet egress {p}_live {{ "veth-t1" timeout 7s }}']
    assert arm_deadman(rules(deadman_seconds=0)) == ""


# ------------------------------------------------------------------ the text

def test_egress_chain_order():
    text = generate_nft(rules())
    body = chain_rules(text, "_egress")
    steps = ["!= @", "ip saddr != 10.213.0.2", "ip6 saddr != ", "ct mark and 0x00f00000 == "
             "0x00100000", "ct state established,related accept", "ip daddr 10.213.0.1 ",
             "ip6 daddr fd00:213::1 ", "tcp dport 53 ", "udp dport 53 ", "th dport @t_",
             "icmp type echo-request", "egress deny"]
    positions = [next(i for i, rule in enumerate(body) if step in rule) for step in steps]
    assert positions == sorted(positions), body
    assert body[0].startswith("iifname != @") and body[0].endswith("drop")
    assert "reject with tcp reset" in body[-2] and "icmpx type admin-prohibited" in body[-1]
    assert all("log prefix" in rule for rule in body[-2:])


def test_audit_logs_and_accepts_the_rest():
    body = chain_rules(generate_nft(rules(mode="audit")), "_egress")
    assert "log prefix" in body[-1] and body[-1].endswith("accept")
    assert not any("egress deny" in rule for rule in body)
    assert any(rule.startswith("udp dport 53") and "reject" in rule for rule in body)


def test_interface_task_is_forwarded_and_has_an_input_chain():
    r = rules()
    p = names(r.task)
    text = generate_nft(r)
    assert f'add element inet egress dispatch_forward {{ "veth-t1" : jump {p}_egress }}' in text
    assert f'add element inet egress dispatch_input {{ "veth-t1" : jump {p}_input }}' in text
    body = chain_rules(text, "_input")
    assert body[-1].endswith("drop") and any("nd-neighbor-solicit" in rule for rule in body)
    assert "add element inet egress dispatch_uid" not in text


def test_uid_task_is_local_and_not_anti_spoofed():
    r = rules("uid:1001")
    text = generate_nft(r)
    assert f"add element inet egress dispatch_uid {{ 1001 : jump {names(r.task)}_egress }}" \
        in text
    assert f"{names(r.task)}_input" not in text and "saddr !=" not in text
    assert chain_rules(text, "_egress")[0].startswith("meta skuid != @")


def test_cidr_sets_are_collapsed_and_ports_merged():
    text = generate_nft(rules())
    assert "{ 198.51.100.0/24 }" in text and "198.51.100.128/25" not in text
    assert "tcp dport { 22, 400-500 }" in text
    assert "tcp dport { 443, 8000-8100 }" in text


def test_deadman_off_leaves_no_live_set():
    text = generate_nft(rules(deadman_seconds=0))
    assert "_live" not in text


def test_remove_names_only_this_task():
    r = rules()
    p = names(r.task)
    for line in remove_nft(r).splitlines():
        if line.startswith("delete "):
            assert p in line or line.startswith(("delete element inet egress dispatch_",))
            assert "table" not in line


def test_iptables_text():
    ipset, ipt = generate_iptables(rules())
    assert "hash:ip,port" in ipset and "0.0.0.0/1" in ipset
    assert "-A FORWARD -i veth-t1 -j EGR-" in ipt and "-A INPUT -i veth-t1 -j EGR-" in ipt
    assert "--reject-with tcp-reset" in ipt and ipt.rstrip().endswith("COMMIT")
    _, uid = generate_iptables(rules("uid:1001", mode="audit"))
    assert "-A OUTPUT -m owner --uid-owner 1001 -j EGR-" in uid and "tcp-reset" in uid


def test_iptables_with_names_resolved_now():
    _, ipt = generate_iptables(rules(), resolve=lambda name: ["203.0.113.5", "2001:db8::5"])
    lines = [line for line in ipt.splitlines() if "api.example.org resolved " in line]
    assert lines and all("-d 203.0.113.5 " in line for line in lines)
    assert re.search(r'resolved \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"', lines[0])
    assert "2001:db8::5" not in ipt and "*.example.org" not in ipt


def test_many_ports_split_across_multiport_rules():
    many = manifest.parse(PURPOSE_HEAD + '[[allow]]\ncidr = "198.51.100.0/24"\nports = ['
                          + ", ".join(str(p) for p in range(1000, 1040, 2)) + "]\n", "m.toml")
    r = TaskRules(task="t1", purpose=many, match=Match.parse("uid:1001"))
    _, ipt = generate_iptables(r)
    multiport = [line for line in ipt.splitlines() if "multiport" in line]
    assert len(multiport) == 2
    assert all(len(line.split("--dports ")[1].split()[0].split(",")) <= 15 for line in multiport)


def test_nft_errors_become_one_line():
    report = ("/proc/self/fd/5:3:23-25: Error: syntax error, unexpected fwd, expecting string\n"
              "add chain inet egress fwd\n                      ^^^\n")
    assert one_line(report) == ("line 3: Error: syntax error, unexpected fwd, expecting string: "
                                "add chain inet egress fwd")


# ---------------------------------------------------------------------- CLI

def write_purpose(tmp_path, text=RICH):
    path = tmp_path / "purpose.toml"
    path.write_text(text)
    return path


def test_cli_generate_nft(tmp_path):
    path = write_purpose(tmp_path)
    result = CliRunner().invoke(main, ["rules", "generate", "--purpose", str(path), "--match",
                                       "interface:veth-t1", "--task", "t1", "--resolver",
                                       "10.213.0.1", "--resolver", "fd00::1"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("# egress: task t1, interface:veth-t1, audit\n")
    assert "ip6 daddr fd00::1 meta l4proto" in result.output


def test_cli_generate_iptables(tmp_path):
    path = write_purpose(tmp_path, RICH.replace('purpose = "test"',
                                                'purpose = "test"\ntask = "t2"'))
    result = CliRunner().invoke(main, ["rules", "generate", "--purpose", str(path), "--match",
                                       "uid:1001", "--format", "iptables", "--mode", "enforce"])
    assert result.exit_code == 0, result.output
    assert "ipset restore" in result.output and "-A OUTPUT -m owner --uid-owner 1001" \
        in result.output


@pytest.mark.parametrize("args, message", [
    (["--match", "veth0", "--task", "t1"], "expected interface:NAME"),
    (["--match", "uid:1001"], "which task is this?"),
    (["--match", "uid:1001", "--task", "t1", "--resolver", "nope"], "not an IP address"),
    (["--match", "uid:1001", "--task", "t1", "--resolver", "10.0.0.1", "--resolver",
      "10.0.0.2"], "at most one IPv4"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    path = write_purpose(tmp_path)
    result = CliRunner().invoke(main, ["rules", "generate", "--purpose", str(path), *args])
    assert result.exit_code == 1
    assert result.output.startswith("egress: ") and message in result.output
    assert result.output.count("\n") == 1


def test_cli_refuses_loosening(tmp_path):
    path = write_purpose(tmp_path, RICH.replace('purpose = "test"',
                                                'purpose = "test"\nmode = "enforce"'))
    result = CliRunner().invoke(main, ["rules", "generate", "--purpose", str(path), "--match",
                                       "uid:1001", "--task", "t1", "--mode", "audit"])
    assert result.exit_code == 1 and "may not loosen" in result.output


# --------------------------------------------------- the real tools, as root

def need_root(*tools):
    problem = None
    if os.geteuid() != 0:
        problem = "needs root (a scratch network namespace)"
    else:
        missing = [t for t in ("ip", *tools) if shutil.which(t) is None]
        if missing:
            problem = f"needs {', '.join(missing)} (tests/system-deps.sh)"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)


def run(*cmd, input=None, check=True):
    got = subprocess.run(list(cmd), input=input, capture_output=True, text=True, timeout=60)
    if check and got.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {got.stderr.strip()}")
    return got


@pytest.fixture
def netns():
    """A scratch network namespace, removed after the test; its name."""
    need_root("nft", "nsenter")
    name = f"egrs{os.getpid() % 10000:04d}{secrets.token_hex(2)}"
    run("ip", "netns", "add", name)
    try:
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)


def nft(ns, *args, input=None, check=True):
    # nsenter keeps our mount namespace (ip netns exec would hide /sys/fs/cgroup).
    return run("nsenter", f"--net=/run/netns/{ns}", "nft", *args, input=input, check=check)


@pytest.mark.parametrize("match", MATCHES)
@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_nft_accepts_the_ruleset(netns, match, mode):
    text = generate_nft(rules(match, mode))
    got = nft(netns, "-c", "-f", "-", input=text, check=False)
    assert got.returncode == 0, got.stderr


def test_ruleset_loads_reloads_refreshes_and_removes(netns):
    a, b = rules("interface:veth-t1"), rules("uid:1001", task="other")
    nft(netns, "-f", "-", input=generate_nft(a))
    nft(netns, "-f", "-", input=generate_nft(a))                 # idempotent
    nft(netns, "-f", "-", input=generate_nft(b))
    for address in ("203.0.113.10", "2001:db8::10"):
        pairs = elements_for_name(PURPOSE, "api.example.org") + [("icmp", 0, 0)]
        for _ in range(2):                                       # new, then live
            nft(netns, "-f", "-", input=refresh_elements(a, address, pairs, 30))
    nft(netns, "-f", "-", input=arm_deadman(a))
    listing = nft(netns, "list", "set", "inet", "egress", f"{names(a.task)}_h4").stdout
    assert "203.0.113.10 . tcp . 443 timeout 30s" in listing
    assert listing.count("203.0.113.10 . tcp . 443") == 1
    # The same interface for another task is refused, not silently taken over.
    clash = rules("interface:veth-t1", task="clash")
    assert nft(netns, "-f", "-", input=generate_nft(clash), check=False).returncode != 0
    nft(netns, "-f", "-", input=remove_nft(a))
    nft(netns, "-f", "-", input=remove_nft(a))                   # removing twice is fine
    table = nft(netns, "list", "table", "inet", "egress").stdout
    assert names(a.task) not in table and "veth-t1" not in table
    assert f"{names(b.task)}_egress" in table and "1001 : jump" in table


def test_cgroup_rule_loads_when_the_path_exists(netns):
    mount = ruleset.cgroup2_mount()
    if mount is None or not mount.startswith(ruleset.CGROUP_ROOT):
        pytest.skip("no cgroup2 under /sys/fs/cgroup")
    group = Path(mount) / netns
    group.mkdir()
    try:
        for mode in ("audit", "enforce"):
            text = generate_nft(rules(f"cgroup:{group}", mode))
            assert 'socket cgroupv2 level 1 != @' in text
            got = nft(netns, "-c", "-f", "-", input=text, check=False)
            assert got.returncode == 0, got.stderr
        missing = generate_nft(rules(f"cgroup:/{netns}-missing"))
        assert nft(netns, "-c", "-f", "-", input=missing, check=False).returncode != 0
    finally:
        group.rmdir()


@pytest.mark.parametrize("match", MATCHES)
@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_iptables_restore_accepts_the_rules(netns, match, mode):
    need_root("ipset", "iptables-restore")
    r = rules(match, mode)
    for resolve in (None, lambda name: ["203.0.113.5"]):
        ipset, ipt = generate_iptables(r, resolve=resolve)
        run("ip", "netns", "exec", netns, "ipset", "restore", input=ipset)
        got = run("ip", "netns", "exec", netns, "iptables-restore", "--noflush", "--test",
                  input=ipt, check=False)
        assert got.returncode == 0, got.stderr
    ipset, _ = generate_iptables(r)
    run("ip", "netns", "exec", netns, "ipset", "restore", input=ipset)  # again: -exist


def test_iptables_restore_refuses_rules_without_their_sets(netns):
    need_root("iptables-restore")
    _, ipt = generate_iptables(rules())
    got = run("ip", "netns", "exec", netns, "iptables-restore", "--noflush", "--test",
              input=ipt, check=False)
    assert got.returncode != 0 and "doesn't exist" in got.stderr


# ----------------------------------------------------------- the Nft wrapper

CLONE_NEWNET = 0x40000000


def in_netns(ns, fn):
    """Run ``fn`` in a thread that entered ``ns``: setns changes only the calling thread."""
    out = {}

    def body():
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                out["error"] = OSError(ctypes.get_errno(), "setns")
                return
        finally:
            os.close(fd)
        try:
            out["value"] = fn()
        except Exception as e:           # handed to the test's thread
            out["error"] = e

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture
def two_netns(netns):
    other = netns + "b"
    run("ip", "netns", "add", other)
    try:
        yield netns, other
    finally:
        run("ip", "netns", "del", other, check=False)


def test_nft_wrapper_acts_in_the_calling_threads_namespace(two_netns):
    one, two = two_netns
    n = Nft()
    in_netns(one, lambda: n.run(generate_nft(rules())))
    assert "table inet egress" in in_netns(one, lambda: n.run("list tables"))
    assert "egress" not in in_netns(two, lambda: n.run("list tables"))
    listed = in_netns(one, lambda: n.list_json("table inet egress"))
    assert any("chain" in item and item["chain"]["name"] == "forward_filter"
               for item in listed["nftables"])


def test_nft_wrapper_batches_are_atomic_and_errors_one_line(netns):
    n = Nft()
    in_netns(netns, lambda: n.run("add table inet scratch"))
    bad = "add chain inet scratch good\nadd chain inet scratch fwd\n"
    with pytest.raises(NftError) as e:
        in_netns(netns, lambda: n.run(bad))
    assert str(e.value) == ("line 2: Error: syntax error, unexpected fwd, expecting string: "
                            "add chain inet scratch fwd")
    with pytest.raises(NftError, match="No such file or directory: delete element"):
        in_netns(netns, lambda: n.run("add set inet scratch s { type ipv4_addr; }\n"
                                      "add element inet scratch s { 192.0.2.1 }\n"
                                      "delete element inet scratch s { 192.0.2.9 }\n"))
    listing = in_netns(netns, lambda: n.run("list table inet scratch"))
    assert "good" not in listing and "set s" not in listing     # nothing of either batch
    in_netns(netns, lambda: n.check("add chain inet scratch checked"))
    assert "checked" not in in_netns(netns, lambda: n.run("list table inet scratch"))
    with pytest.raises(NftError):
        in_netns(netns, lambda: n.check("add chain inet nosuchtable x"))
