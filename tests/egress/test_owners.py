"""owners and redact without privileges: the sock_diag messages byte by byte, replies built
by hand, the destroy loop against a scripted kernel, the /proc walk on our own processes,
and the command-line redaction table."""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from egress.enforce import owners
from egress.enforce.redact import MASK, redact_cmdline, secret_env, secret_option

# ------------------------------------------------------------------ redaction

REDACTIONS = [
    # option values
    (["tool", "--password", "hunter2"], ["tool", "--password", MASK]),
    (["tool", "--password=hunter2"], ["tool", f"--password={MASK}"]),
    (["tool", "--api-key", "k1", "--apikey=k2", "--api_key", "k3"],
     ["tool", "--api-key", MASK, f"--apikey={MASK}", "--api_key", MASK]),
    (["tool", "--token", "t", "--access-token=t", "--client-secret", "s"],
     ["tool", "--token", MASK, f"--access-token={MASK}", "--client-secret", MASK]),
    (["tool", "--secret-access-key", "abc", "--private-key=abc"],
     ["tool", "--secret-access-key", MASK, f"--private-key={MASK}"]),
    (["java", "-Djavax.net.ssl.keyStorePassword=changeit", "-jar", "a.jar"],
     ["java", f"-Djavax.net.ssl.keyStorePassword={MASK}", "-jar", "a.jar"]),
    (["openssl", "enc", "-pass", "pass:hunter2", "-in", "f"],
     ["openssl", "enc", "-pass", f"pass:{MASK}", "-in", "f"]),
    # not values: where the secret is, switches, unrelated options
    (["tool", "--password-file", "/etc/pw", "--token-url", "https://auth.example/t"],
     ["tool", "--password-file", "/etc/pw", "--token-url", "https://auth.example/t"]),
    (["tool", "--no-password", "db", "--ask-pass", "x"],
     ["tool", "--no-password", "db", "--ask-pass", "x"]),
    (["tool", "--token", "--verbose", "arg"], ["tool", "--token", "--verbose", "arg"]),
    (["tool", "--author", "bob", "--keyboard", "us", "--tokenizer", "bpe"],
     ["tool", "--author", "bob", "--keyboard", "us", "--tokenizer", "bpe"]),
    # mysql-like -pSECRET; -p alone prompts; -P is the port
    (["mysql", "-uroot", "-phunter2", "-P3306", "db"],
     ["mysql", "-uroot", f"-p{MASK}", "-P3306", "db"]),
    (["/usr/bin/mysqldump", "-p", "db"], ["/usr/bin/mysqldump", "-p", "db"]),
    (["mariadb", "--password=x", "db"], ["mariadb", f"--password={MASK}", "db"]),
    # -p means port elsewhere; sshpass then ssh: each program's own rules
    (["ssh", "-p", "2222", "host"], ["ssh", "-p", "2222", "host"]),
    (["sshpass", "-p", "hunter2", "ssh", "-p", "22", "u@h"],
     ["sshpass", "-p", MASK, "ssh", "-p", "22", "u@h"]),
    (["sshpass", "-phunter2", "ssh", "h"], ["sshpass", f"-p{MASK}", "ssh", "h"]),
    (["redis-cli", "-a", "pw", "ping"], ["redis-cli", "-a", MASK, "ping"]),
    # curl: headers, user:password, bearer
    (["curl", "-H", "Authorization: Bearer abc.def.ghi", "https://x"],
     ["curl", "-H", f"Authorization: Bearer {MASK}", "https://x"]),
    (["curl", "--header=authorization: Basic dXNlcjpwYXNz"],
     ["curl", f"--header=authorization: Basic {MASK}"]),
    (["curl", "-H", "X-Api-Key: 12345", "-H", "Accept: text/html"],
     ["curl", "-H", f"X-Api-Key: {MASK}", "-H", "Accept: text/html"]),
    (["curl", "-H", "Cookie: session=abc"], ["curl", "-H", f"Cookie: {MASK}"]),
    (["curl", "-u", "bob:hunter2", "https://x"], ["curl", "-u", f"bob:{MASK}", "https://x"]),
    (["curl", "-ubob:hunter2", "--user=bob:pw"], ["curl", f"-ubob:{MASK}", f"--user=bob:{MASK}"]),
    (["curl", "-u", "bob", "https://x"], ["curl", "-u", "bob", "https://x"]),
    (["curl", "--oauth2-bearer", "tok", "https://x"],
     ["curl", "--oauth2-bearer", MASK, "https://x"]),
    (["git", "-c", "http.extraheader=AUTHORIZATION: basic eHh4Onl5eQ==", "clone", "u"],
     ["git", "-c", f"http.extraheader=AUTHORIZATION: basic {MASK}", "clone", "u"]),
    # URLs
    (["git", "clone", "https://alice:s3cret@example.com/r.git"],
     ["git", "clone", f"https://alice:{MASK}@example.com/r.git"]),
    (["psql", "postgresql://app:pw@db:5432/x"], ["psql", f"postgresql://app:{MASK}@db:5432/x"]),
    (["curl", "https://alice@example.com/"], ["curl", "https://alice@example.com/"]),
    (["curl", "https://s3/x?X-Amz-Signature=abc&X-Amz-Credential=cred&part=1"],
     ["curl", f"https://s3/x?X-Amz-Signature={MASK}&X-Amz-Credential={MASK}&part=1"]),
    (["curl", "https://api/x?access_token=abc&page=2"],
     ["curl", f"https://api/x?access_token={MASK}&page=2"]),
    # environment-style
    (["env", "GITHUB_TOKEN=abc", "AWS_SECRET_ACCESS_KEY=wJalr", "PGPASSWORD=pw", "LANG=C", "x"],
     ["env", f"GITHUB_TOKEN={MASK}", f"AWS_SECRET_ACCESS_KEY={MASK}", f"PGPASSWORD={MASK}",
      "LANG=C", "x"]),
    (["env", "MY_API_KEY=1", "AUTH_HEADER=x", "DB_PASSWORD_FILE=/run/s", "PWD=/tmp"],
     ["env", f"MY_API_KEY={MASK}", f"AUTH_HEADER={MASK}", "DB_PASSWORD_FILE=/run/s", "PWD=/tmp"]),
    (["docker", "run", "-e", "OPENAI_API_KEY=x", "-e", "DEBUG=1", "img"],
     ["docker", "run", "-e", f"OPENAI_API_KEY={MASK}", "-e", "DEBUG=1", "img"]),
    # pairs inside an argument
    (["psql", "host=db user=app password=hunter2 dbname=x"],
     ["psql", f"host=db user=app password={MASK} dbname=x"]),
    (["curl", "-d", '{"user": "bob", "password": "hu\\"nter2"}'],
     ["curl", "-d", f'{{"user": "bob", "password": "{MASK}"}}']),
    (["sh", "-c", "export TOKEN=abc; run --design=x"],
     ["sh", "-c", f"export TOKEN={MASK}; run --design=x"]),
    # token shapes anywhere
    (["aws", "configure", "set", "aws_access_key_id", "AKIAIOSFODNN7EXAMPLE"],
     ["aws", "configure", "set", "aws_access_key_id", MASK]),
    (["gh", "auth", "login", "--with-token", "ghp_" + "a1B2" * 9],
     ["gh", "auth", "login", "--with-token", MASK]),
    (["x", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"], ["x", MASK]),
    (["x", "key is sk-proj-abcDEF1234567890abcdef here"], ["x", f"key is {MASK} here"]),
    (["x", "sk-ant-api03-abcdefghijklmnopqrstuvwxyz012345"], ["x", MASK]),
    (["x", "xoxb-1234567890-0987654321-abcdefghijkl"], ["x", MASK]),
    (["x", "glpat-abcdefghij0123456789"], ["x", MASK]),
    (["x", "AIzaSyA1234567890abcdefghijklmnopqrstu"], ["x", MASK]),
    (["x", "hf_abcdefghijklmnopqrstuvwxyz0123456789"], ["x", MASK]),
    (["x", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abc_DEF-123"], ["x", MASK]),
    (["x", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"], ["x", MASK]),
    (["x", "deadbeefdeadbeefdeadbeefdeadbeef"], ["x", MASK]),
    (["x", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNz\n-----END OPENSSH PRIVATE KEY-----"],
     ["x", MASK]),
    # not tokens: digests, paths, short hex, words
    (["docker", "pull", "img@sha256:" + "ab" * 32], ["docker", "pull", "img@sha256:" + "ab" * 32]),
    (["python3", "/home/user/projects/MyProject2/src/Main/Application3.py"],
     ["python3", "/home/user/projects/MyProject2/src/Main/Application3.py"]),
    (["git", "show", "abc1234"], ["git", "show", "abc1234"]),
    (["ls", "-la", "/tmp"], ["ls", "-la", "/tmp"]),
    ([], []),
]


@pytest.mark.parametrize("argv, expected", REDACTIONS,
                         ids=[" ".join(a)[:50] for a, _ in REDACTIONS])
def test_redact_cmdline(argv, expected):
    assert redact_cmdline(argv) == expected


def test_redact_does_not_change_its_input():
    argv = ["curl", "-u", "bob:pw"]
    redact_cmdline(argv)
    assert argv == ["curl", "-u", "bob:pw"]


@pytest.mark.parametrize("name, secret", [
    ("password", True), ("db-password", True), ("keyStorePassword", True), ("api-key", True),
    ("apikey", True), ("token", True), ("auth", True), ("pass", True), ("passin", True),
    ("password-file", False), ("no-password", False), ("key", False), ("sort-key", False),
    ("author", False), ("tokenizer", False), ("token-type", False), ("client-id", False)])
def test_secret_option(name, secret):
    assert secret_option(name) is secret


@pytest.mark.parametrize("key, secret", [
    ("GITHUB_TOKEN", True), ("PGPASSWORD", True), ("AWS_SECRET_ACCESS_KEY", True),
    ("MYSQL_PWD", True), ("HTTP_AUTH", True), ("PWD", False), ("OLDPWD", False),
    ("PATH", False), ("HOME", False), ("TOKEN_FILE", False), ("SSH_AUTH_SOCK", False),
    # ssh -o options: a word inside a name is not a secret name
    ("StrictHostKeyChecking", False), ("HostKeyAlias", False), ("KEYMAP", False),
    ("apiKey", True), ("LICENSE_KEY", True)])
def test_secret_env(key, secret):
    assert secret_env(key) is secret


# ------------------------------------------------------------------ messages

NLMSGHDR = "=IHHII"


def test_pack_request_tcp_ipv4_exact_match():
    raw = owners.pack_request(owners.SOCK_DIAG_BY_FAMILY, "tcp", "10.213.0.2", 40000,
                              "203.0.113.7", 22, seq=77)
    assert len(raw) == 72
    assert struct.unpack_from(NLMSGHDR, raw, 0) == (72, 20, 0x1, 77, 0)   # REQUEST, no DUMP
    family, proto, ext, pad, states = struct.unpack_from("=BBBBI", raw, 16)
    assert (family, proto, ext, pad, states) == (socket.AF_INET, 6, 0, 0, 0xFFFFFFFF)
    sport, dport = struct.unpack_from(">HH", raw, 24)
    assert (sport, dport) == (40000, 22)
    assert raw[28:44] == socket.inet_aton("10.213.0.2") + bytes(12)       # idiag_src: local
    assert raw[44:60] == socket.inet_aton("203.0.113.7") + bytes(12)      # idiag_dst: remote
    assert struct.unpack_from("=III", raw, 60) == (0, 0xFFFFFFFF, 0xFFFFFFFF)  # if, NOCOOKIE


def test_pack_request_udp_lookup_is_swapped_but_destroy_is_not():
    get = owners.pack_request(owners.SOCK_DIAG_BY_FAMILY, "udp", "10.213.0.2", 5353,
                              "198.51.100.1", 53, seq=1)
    assert get[17] == socket.IPPROTO_UDP
    assert struct.unpack_from(">HH", get, 24) == (53, 5353)
    assert get[28:32] == socket.inet_aton("198.51.100.1")                 # udp_dump_one quirk
    assert get[44:48] == socket.inet_aton("10.213.0.2")
    kill = owners.pack_request(owners.SOCK_DESTROY, "udp", "10.213.0.2", 5353,
                               "198.51.100.1", 53, seq=2, cookie=(5 << 32) | 9)
    assert struct.unpack_from(NLMSGHDR, kill, 0) == (72, 21, 0x1 | 0x4, 2, 0)   # ACK asked
    assert struct.unpack_from(">HH", kill, 24) == (5353, 53)
    assert kill[28:32] == socket.inet_aton("10.213.0.2")
    assert struct.unpack_from("=III", kill, 60) == (0, 9, 5)


def test_pack_request_ipv6():
    raw = owners.pack_request(owners.SOCK_DESTROY, 6, "2001:db8::2", 1, "2001:db8::1", 2)
    assert raw[16] == socket.AF_INET6 and raw[17] == 6
    assert raw[28:44] == socket.inet_pton(socket.AF_INET6, "2001:db8::2")
    assert raw[44:60] == socket.inet_pton(socket.AF_INET6, "2001:db8::1")


@pytest.mark.parametrize("args", [
    ("icmp", "10.0.0.1", 1, "10.0.0.2", 2), ("tcp", "10.0.0.1", 1, "2001:db8::1", 2),
    ("tcp", "10.0.0.1", 70000, "10.0.0.2", 2), ("tcp", "nonsense", 1, "10.0.0.2", 2)])
def test_pack_request_refuses(args):
    with pytest.raises(ValueError):
        owners.pack_request(owners.SOCK_DIAG_BY_FAMILY, *args)


def diag_msg(*, family=socket.AF_INET, state=1, src="10.213.0.2", sport=40000,
             dst="203.0.113.7", dport=443, ifindex=3, cookie=(1, 2), uid=1000,
             inode=123456, seq=5, mtype=20) -> bytes:
    """An inet_diag_msg the way the kernel lays it out, in its netlink header."""
    af = socket.AF_INET if family == socket.AF_INET else socket.AF_INET6
    a = socket.inet_pton(af, src).ljust(16, b"\0")
    b = socket.inet_pton(af, dst).ljust(16, b"\0")
    body = (struct.pack("=BBBB", family, state, 0, 0) + struct.pack(">HH", sport, dport) + a + b
            + struct.pack("=III", ifindex, *cookie) + struct.pack("=IIIII", 0, 0, 0, uid, inode))
    return struct.pack(NLMSGHDR, 16 + len(body), mtype, 0, seq, 0) + body


def nlmsg_error(err: int, seq: int) -> bytes:
    body = struct.pack("=i", -err) + struct.pack(NLMSGHDR, 72, 20, 1, seq, 0)
    return struct.pack(NLMSGHDR, 16 + len(body), 2, 0, seq, 0) + body


def test_parse_reply_ipv4():
    info = owners.parse_reply(diag_msg(), 5, "tcp")
    assert info == owners.SockInfo(inode=123456, uid=1000, state="ESTABLISHED", family=4,
                                   proto="tcp", src="10.213.0.2", sport=40000,
                                   dst="203.0.113.7", dport=443, cookie=1 | (2 << 32),
                                   ifindex=3)


def test_parse_reply_dual_stack_socket_gives_ipv4_addresses():
    info = owners.parse_reply(diag_msg(family=socket.AF_INET6, src="::ffff:10.213.0.2",
                                       dst="::ffff:203.0.113.7", state=7), 5, "udp")
    assert (info.family, info.src, info.dst, info.state, info.proto) == \
        (6, "10.213.0.2", "203.0.113.7", "CLOSE", "udp")
    v6 = owners.parse_reply(diag_msg(family=socket.AF_INET6, src="2001:db8::2",
                                     dst="2001:db8::1", state=6, inode=0), 5, "tcp")
    assert (v6.src, v6.dst, v6.state, v6.inode) == ("2001:db8::2", "2001:db8::1", "TIME_WAIT", 0)


def test_parse_reply_errors():
    assert owners.parse_reply(nlmsg_error(errno.ENOENT, 5), 5, "tcp") is None
    with pytest.raises(owners.DiagError) as e:
        owners.parse_reply(nlmsg_error(errno.EPERM, 5), 5, "tcp")
    assert e.value.errno == errno.EPERM
    with pytest.raises(owners.DiagError):                # only an answer to another request
        owners.parse_reply(diag_msg(seq=4), 5, "tcp")
    # a stale answer first, then ours, in one datagram
    assert owners.parse_reply(diag_msg(seq=4, inode=1) + diag_msg(seq=5, inode=2), 5,
                              "tcp").inode == 2
    with pytest.raises(owners.DiagError):                # truncated
        owners.parse_reply(diag_msg()[:60], 5, "tcp")
    with pytest.raises(owners.DiagError):                # header says more than there is
        owners.parse_reply(diag_msg()[:-4], 5, "tcp")


class ScriptedKernel:
    """A stand-in for the sock_diag socket: answers each request from a script."""

    def __init__(self, answers):
        # per request: ("sock", cookie) | ("ack", errno) | ("none",)
        self.answers = list(answers)
        self.sent: list[bytes] = []
        self.pending = b""

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        seq = struct.unpack_from(NLMSGHDR, data, 0)[3]
        kind, *arg = self.answers.pop(0)
        if kind == "sock":
            self.pending = diag_msg(seq=seq, cookie=(arg[0], 0))
        elif kind == "ack":
            self.pending = nlmsg_error(arg[0], seq)
        else:
            self.pending = nlmsg_error(errno.ENOENT, seq)
        return len(data)

    def recv_into(self, buf) -> int:
        data, self.pending = self.pending, b""
        buf[:len(data)] = data
        return len(data)

    def close(self):
        pass


def scripted(answers) -> tuple[owners.SockDiag, ScriptedKernel]:
    diag = object.__new__(owners.SockDiag)
    diag.netns_path, diag.sock, diag._buf = "scripted", ScriptedKernel(answers), bytearray(8192)
    return diag, diag.sock


FLOW = ("tcp", "10.213.0.2", 40000, "203.0.113.7", 443)


def test_destroy_finds_then_destroys_by_cookie_until_gone():
    diag, kernel = scripted([("sock", 11), ("ack", 0), ("none",)])
    assert diag.destroy(*FLOW) == 1
    types = [struct.unpack_from(NLMSGHDR, m, 0)[1] for m in kernel.sent]
    assert types == [20, 21, 20]
    assert struct.unpack_from("=III", kernel.sent[1], 60) == (0, 11, 0)   # by its cookie


def test_destroy_counts_a_socket_that_stays_findable_once():
    diag, kernel = scripted([("sock", 11), ("ack", 0), ("sock", 11)])
    assert diag.destroy(*FLOW) == 1 and not kernel.answers


def test_destroy_of_nothing_and_of_a_socket_gone_meanwhile():
    assert scripted([("none",)])[0].destroy(*FLOW) == 0
    assert scripted([("sock", 3), ("ack", errno.ENOENT), ("none",)])[0].destroy(*FLOW) == 0


def test_destroy_without_kernel_support_says_so():
    diag, _ = scripted([("sock", 3), ("ack", errno.EOPNOTSUPP)])
    with pytest.raises(owners.DestroyUnsupported) as e:
        diag.destroy(*FLOW)
    assert e.value.errno == errno.EOPNOTSUPP and "CONFIG_INET_DIAG_DESTROY" in str(e.value)
    diag, _ = scripted([("sock", 3), ("ack", errno.EPERM)])
    with pytest.raises(owners.DiagError) as e:
        diag.destroy(*FLOW)
    assert e.value.errno == errno.EPERM and not isinstance(e.value, owners.DestroyUnsupported)


# ------------------------------------------------------------------ /proc

def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def test_owner_of_finds_a_child_holding_the_socket_and_its_parent_sharing_it():
    owners.clear_cache()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import ctypes, sys, time; ctypes.CDLL(None).prctl(15, b'a) b (c', 0, 0, 0);"
         "print('up', flush=True); time.sleep(30)", "--token=hunter2"],
        pass_fds=(sock.fileno(),), stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "up\n"
        inode = _inode(sock)
        info = owners.owner_of(inode, os.getpid())
        assert info.pid == os.getpid()                   # breadth first: the parent first
        assert set(info.holders) == {os.getpid(), child.pid}
        only_child = owners.process_info(child.pid)
        assert only_child.ppid == os.getpid()            # a comm with ") (" parses
        assert only_child.cmdline[-1] == f"--token={MASK}"
        assert abs(only_child.start_time - time.time()) < 60
        assert only_child.exe == os.readlink(f"/proc/{child.pid}/exe")
        sock.close()                                     # now only the child holds it
        moved = owners.owner_of(inode, os.getpid())     # the cached entry no longer holds
        assert moved.pid == child.pid and moved.holders == (child.pid,)
    finally:
        child.kill()
        child.wait()


def test_owner_of_cache_is_checked_on_each_hit():
    owners.clear_cache()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inode = _inode(sock)
    assert owners.owner_of(inode, os.getpid()).pid == os.getpid()
    assert owners.owner_of(inode, os.getpid()).pid == os.getpid()       # from the cache
    sock.close()
    assert owners.owner_of(inode, os.getpid()) is None                  # not a stale hit
    assert owners.owner_of(0, os.getpid()) is None


def test_descendants_walks_children_of_every_thread():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        tree = owners.descendants(os.getpid())
        assert tree[0] == os.getpid() and sleeper.pid in tree
    finally:
        sleeper.kill()
        sleeper.wait()


def test_diag_socket_in_our_own_namespace_leaves_it_alone():
    """The namespace switch itself, without privileges: open_diag_socket on our own netns
    file goes through the setns thread (root) or fails with EPERM, never moving us."""
    before = (os.stat("/proc/self/ns/net").st_ino, os.stat("/proc/thread-self/ns/net").st_ino)
    try:
        owners.open_diag_socket("/proc/self/ns/net").close()
    except PermissionError:
        pass
    assert before == (os.stat("/proc/self/ns/net").st_ino,
                      os.stat("/proc/thread-self/ns/net").st_ino)
