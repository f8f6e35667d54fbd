"""Who owns a flow, and how to cut it: sock_diag in the task's network namespace, /proc walk.

A flow seen on the host side (the task's own address, before NAT, and the destination)
names a socket inside the task's network namespace. ``find_socket`` asks the kernel for
that one socket with an exact-match sock_diag request (SOCK_DIAG_BY_FAMILY, no dump);
``owner_of`` finds the process holding ``socket:[inode]`` among the task's processes;
``destroy_sockets`` sends SOCK_DESTROY, so the holder sees ECONNABORTED on its next call.

Why our own struct code and not pyroute2's ``DiagSocket`` (0.9.7): it only dumps
(NLM_F_ROOT|NLM_F_MATCH, filtered by ports only, no addresses, no exact socket id), has no
SOCK_DESTROY, cannot set the cookie, and its marshal disables NLMSG_ERROR decoding
(``error_type = -1``), so an ENOENT or EOPNOTSUPP would go unseen.

The namespace: a netlink socket belongs to the network namespace it was created in, for
its whole life. So the socket is created on a short-lived thread that entered the task's
namespace with setns(CLONE_NEWNET) (ctypes; Python 3.11 has no ``os.setns``) and went back
before ending; setns changes only the calling thread, so the caller's threads never move.
After that the socket is used from any thread without a namespace switch.
``SockDiag(netns_path)`` keeps one such socket for many lookups (it keeps the namespace
alive while open); ``find_socket`` and ``destroy_sockets`` open one per call.

Kernel quirks handled here (net/ipv4/inet_diag.c, udp_diag.c):
- The exact lookup needs the cookie set to INET_DIAG_NOCOOKIE (both halves ~0), or the
  kernel compares it with the socket's and answers ESTALE.
- UDP's SOCK_DIAG_BY_FAMILY lookup reads the socket id swapped ("src and dst are swapped
  for historical reasons": idiag_src is the remote end); UDP's SOCK_DESTROY and both TCP
  requests read it as the socket sees it (idiag_src local). ``pack_request`` swaps for that
  one case.
- The UDP lookup is the receive path's: it also finds an unconnected socket bound to the
  local port (then the reply's remote end is 0.0.0.0:0), and, in a SO_REUSEPORT group, one
  socket of the group only.
- A TCP lookup can find a TIME_WAIT or SYN_RECV mini-socket: inode 0, no owner.
- SOCK_DESTROY needs CONFIG_INET_DIAG_DESTROY (without it the kernel answers EOPNOTSUPP,
  raised here as ``DestroyUnsupported``) and CAP_NET_ADMIN over the socket's namespace
  (EPERM otherwise).
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import errno
import ipaddress
import os
import socket
import struct
import threading
from dataclasses import dataclass

from egress.enforce.redact import redact_cmdline

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY, SOCK_DESTROY = 20, 21
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
CLONE_NEWNET = 0x40000000
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
ALL_STATES = 0xFFFFFFFF

PROTOS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
              11: "CLOSING", 12: "NEW_SYN_RECV", 13: "BOUND_INACTIVE"}
"""include/net/tcp_states.h; UDP uses ESTABLISHED (connected) and CLOSE (not connected)."""

_NLMSGHDR = struct.Struct("=IHHII")             # len, type, flags, seq, pid
_REQ_HEAD = struct.Struct("=BBBBI")             # family, protocol, ext, pad, states
_SOCKID = struct.Struct(">HH16s16s")            # sport, dport, src, dst (network order)
_SOCKID_TAIL = struct.Struct("=III")            # if, cookie[0], cookie[1] (host order)
_MSG_HEAD = struct.Struct("=BBBB")              # family, state, timer, retrans
_MSG_TAIL = struct.Struct("=IIIII")             # expires, rqueue, wqueue, uid, inode
REQUEST_LEN = _NLMSGHDR.size + _REQ_HEAD.size + _SOCKID.size + _SOCKID_TAIL.size     # 72
MSG_LEN = _MSG_HEAD.size + _SOCKID.size + _SOCKID_TAIL.size + _MSG_TAIL.size         # 72

_seq = iter(range(1, 1 << 31))
_seq_lock = threading.Lock()


class DiagError(OSError):
    pass


class _NoAnswer(DiagError):
    """The datagram held no answer to this request (only stale ones)."""


class DestroyUnsupported(DiagError):
    """The kernel cannot destroy sockets (built without CONFIG_INET_DIAG_DESTROY)."""


@dataclass(frozen=True)
class SockInfo:
    """One socket as the kernel reported it (addresses as the socket sees them: src local)."""

    inode: int              # 0 for TIME_WAIT / SYN_RECV mini-sockets (no owner)
    uid: int                # the socket's owner uid, as seen from the host's user namespace
    state: str              # TCP_STATES name
    family: int             # 4 or 6: the socket's own family (6 for a dual-stack socket)
    proto: str              # "tcp" or "udp"
    src: str
    sport: int
    dst: str
    dport: int
    cookie: int             # the kernel's socket cookie, stable for the socket's life
    ifindex: int = 0


@dataclass(frozen=True)
class ProcessInfo:
    pid: int                # in the host's PID namespace
    ppid: int
    uid: int                # real uid
    exe: str | None         # readlink /proc/PID/exe; None when gone or unreadable
    cmdline: list[str]      # redacted
    start_time: float       # seconds since the epoch
    start_ticks: int        # /proc/PID/stat field 22: with pid, identifies the process
    ns_pid: int | None = None           # the pid inside the task's PID namespace
    holders: tuple[int, ...] = ()       # every pid holding the socket (fork shares fds)

    def record(self):
        """As the flow record's ``process`` (the contract's ProcessInfo)."""
        from egress.records import ProcessInfo as Recorded
        return Recorded(pid=self.pid, ppid=self.ppid, uid=self.uid, exe=self.exe,
                        cmdline=" ".join(self.cmdline))


# ------------------------------------------------------------------ messages

def _proto_number(proto) -> int:
    if isinstance(proto, int):
        if proto not in PROTOS.values():
            raise ValueError(f"protocol {proto}: only TCP and UDP")
        return proto
    try:
        return PROTOS[str(proto).lower()]
    except KeyError:
        raise ValueError(f"protocol {proto!r}: only tcp and udp") from None


def _addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def _family_of(src: str, dst: str) -> tuple[int, bytes, bytes]:
    """(AF_*, src, dst as 16-byte fields)."""
    a, b = _addr(src), _addr(dst)
    if a.version != b.version:
        raise ValueError(f"{src} and {dst} are not of one family")
    if a.version == 4:
        return socket.AF_INET, a.packed.ljust(16, b"\0"), b.packed.ljust(16, b"\0")
    return socket.AF_INET6, a.packed, b.packed


def next_seq() -> int:
    with _seq_lock:
        return next(_seq)


def pack_request(msg_type: int, proto, src: str, sport: int, dst: str, dport: int, *,
                 seq: int = 0, cookie: int | None = None, ifindex: int = 0,
                 states: int = ALL_STATES) -> bytes:
    """An exact-match inet_diag_req_v2 for the socket whose local end is src:sport and whose
    remote end is dst:dport (as the task's socket sees it), for SOCK_DIAG_BY_FAMILY (reply:
    one inet_diag_msg or NLMSG_ERROR) or SOCK_DESTROY (acknowledged)."""
    number = _proto_number(proto)
    family, local, remote = _family_of(src, dst)
    if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
        raise ValueError(f"port out of range: {sport}, {dport}")
    if number == socket.IPPROTO_UDP and msg_type == SOCK_DIAG_BY_FAMILY:
        # udp_dump_one passes idiag_src to __udp4_lib_lookup as the packet's source
        local, sport, remote, dport = remote, dport, local, sport
    if cookie is None:
        c0 = c1 = INET_DIAG_NOCOOKIE
    else:
        c0, c1 = cookie & 0xFFFFFFFF, cookie >> 32
    flags = NLM_F_REQUEST | (NLM_F_ACK if msg_type == SOCK_DESTROY else 0)
    return (_NLMSGHDR.pack(REQUEST_LEN, msg_type, flags, seq, 0)
            + _REQ_HEAD.pack(family, number, 0, 0, states)
            + _SOCKID.pack(sport, dport, local, remote)
            + _SOCKID_TAIL.pack(ifindex, c0, c1))


def _ntop(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    addr = ipaddress.IPv6Address(raw)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)


def parse_diag_msg(body: bytes, proto) -> SockInfo:
    """An inet_diag_msg (the bytes after the netlink header)."""
    if len(body) < MSG_LEN:
        raise DiagError(errno.EBADMSG, f"inet_diag_msg too short ({len(body)} bytes)")
    family, state, _timer, _retrans = _MSG_HEAD.unpack_from(body, 0)
    off = _MSG_HEAD.size
    sport, dport, src, dst = _SOCKID.unpack_from(body, off)
    off += _SOCKID.size
    ifindex, c0, c1 = _SOCKID_TAIL.unpack_from(body, off)
    off += _SOCKID_TAIL.size
    _expires, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(body, off)
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise DiagError(errno.EBADMSG, f"inet_diag_msg of family {family}")
    number = _proto_number(proto)
    return SockInfo(inode=inode, uid=uid, state=TCP_STATES.get(state, str(state)),
                    family=4 if family == socket.AF_INET else 6,
                    proto="tcp" if number == socket.IPPROTO_TCP else "udp",
                    src=_ntop(family, src), sport=sport, dst=_ntop(family, dst),
                    dport=dport, cookie=c0 | (c1 << 32), ifindex=ifindex)


def parse_reply(data: bytes, seq: int, proto) -> SockInfo | None:
    """The answer to an exact SOCK_DIAG_BY_FAMILY: the socket, or None (ENOENT)."""
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            raise DiagError(errno.EBADMSG, "truncated netlink message")
        body = data[off + _NLMSGHDR.size: off + length]
        off += (length + 3) & ~3
        if mseq != seq:
            continue                                # a stale answer to an earlier request
        if mtype == NLMSG_ERROR:
            err = -struct.unpack_from("=i", body, 0)[0] if len(body) >= 4 else errno.EBADMSG
            if err in (0, errno.ENOENT):
                return None
            raise DiagError(err, f"sock_diag: {os.strerror(err)}")
        if mtype == SOCK_DIAG_BY_FAMILY:
            return parse_diag_msg(body, proto)
    raise _NoAnswer(errno.EBADMSG, f"no answer for request {seq}")


def parse_ack(data: bytes, seq: int) -> int:
    """The errno of the acknowledgement of request ``seq`` (0: done)."""
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            break
        if mtype == NLMSG_ERROR and mseq == seq and length >= _NLMSGHDR.size + 4:
            return -struct.unpack_from("=i", data, off + _NLMSGHDR.size)[0]
        off += (length + 3) & ~3
    raise _NoAnswer(errno.EBADMSG, f"no acknowledgement for request {seq}")


# ----------------------------------------------------------------- namespace

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns {what}: {os.strerror(err)}")


def open_diag_socket(netns_path: str | None) -> socket.socket:
    """A NETLINK_SOCK_DIAG socket of the network namespace at ``netns_path`` (None: ours).

    Made on a thread of its own that enters the namespace, creates the socket and goes back
    before it ends; the calling thread never changes namespace."""
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             NETLINK_SOCK_DIAG)
        sock.settimeout(5.0)
        sock.bind((0, 0))
        return sock

    if netns_path is None:
        return make()
    out: dict = {}

    def body() -> None:
        try:
            target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            out["error"] = e
            return
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            os.close(target)
            out["error"] = e
            return
        try:
            _setns(target, netns_path)
            try:
                out["sock"] = make()
            finally:
                # The thread ends next anyway; going back keeps it harmless if reused.
                try:
                    _setns(own, "back")
                except OSError as e:
                    out["back"] = e
        except BaseException as e:          # handed to the caller's thread
            out["error"] = e
        finally:
            os.close(target)
            os.close(own)

    thread = threading.Thread(target=body, name="egress-sockdiag-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        if "sock" in out:
            out["sock"].close()
        raise out["error"]
    return out["sock"]


class SockDiag:
    """sock_diag requests in one network namespace, over one socket (not thread-safe)."""

    def __init__(self, netns_path: str | None):
        self.netns_path = netns_path
        self.sock = open_diag_socket(netns_path)
        self._buf = bytearray(8192)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "SockDiag":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _recv(self) -> bytes:
        n = self.sock.recv_into(self._buf)
        return bytes(self._buf[:n])

    def _request(self, request: bytes, seq: int, parse):
        self.sock.send(request)
        for _ in range(64):                 # stale answers to requests that timed out
            try:
                return parse(self._recv(), seq)
            except _NoAnswer:
                continue
        raise DiagError(errno.EBADMSG, f"no answer for request {seq}")

    def find(self, proto, src: str, sport: int, dst: str, dport: int) -> SockInfo | None:
        seq = next_seq()
        request = pack_request(SOCK_DIAG_BY_FAMILY, proto, src, sport, dst, dport, seq=seq)
        return self._request(request, seq, lambda data, s: parse_reply(data, s, proto))

    def destroy_one(self, proto, src: str, sport: int, dst: str, dport: int,
                    cookie: int | None = None) -> bool:
        """SOCK_DESTROY for the socket of this tuple (and cookie): True if one was destroyed,
        False if there was none."""
        seq = next_seq()
        err = self._request(pack_request(SOCK_DESTROY, proto, src, sport, dst, dport,
                                         seq=seq, cookie=cookie), seq, parse_ack)
        if err == 0:
            return True
        if err in (errno.ENOENT, errno.ESTALE):
            return False
        if err == errno.EOPNOTSUPP:
            raise DestroyUnsupported(err, "SOCK_DESTROY is not supported by this kernel "
                                          "(CONFIG_INET_DIAG_DESTROY is off)")
        raise DiagError(err, f"SOCK_DESTROY: {os.strerror(err)}")

    def destroy(self, proto, src: str, sport: int, dst: str, dport: int,
                limit: int = 16) -> int:
        """Destroy every socket the kernel finds for the tuple, one after the other (each
        by its cookie, so a socket that took the tuple meanwhile is not hit blindly).
        A socket that stays findable after its destroy (a UDP socket bound explicitly keeps
        its local port) is counted once."""
        seen: set[int] = set()
        destroyed = 0
        for _ in range(limit):
            found = self.find(proto, src, sport, dst, dport)
            if found is None or found.cookie in seen:
                break
            seen.add(found.cookie)
            if self.destroy_one(proto, src, sport, dst, dport, cookie=found.cookie):
                destroyed += 1
        return destroyed


def find_socket(netns_path: str | None, proto, src: str, sport: int, dst: str,
                dport: int) -> SockInfo | None:
    """The socket in the namespace at ``netns_path`` whose local end is src:sport and remote
    end dst:dport (the flow as the task sent it, before NAT), or None."""
    with SockDiag(netns_path) as diag:
        return diag.find(proto, src, sport, dst, dport)


def destroy_sockets(netns_path: str | None, proto, src: str, sport: int, dst: str,
                    dport: int) -> int:
    """SOCK_DESTROY the socket(s) of that flow in that namespace: how many were destroyed.
    Their holders get ECONNABORTED (a TCP peer gets a RST). Raises DestroyUnsupported
    when the kernel lacks CONFIG_INET_DIAG_DESTROY."""
    with SockDiag(netns_path) as diag:
        return diag.destroy(proto, src, sport, dst, dport)


# ------------------------------------------------------------------ /proc

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_btime: float | None = None


def _boot_time() -> float:
    global _btime
    if _btime is None:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    _btime = float(line.split()[1])
                    break
            else:
                _btime = 0.0
    return _btime


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start ticks) from /proc/PID/stat, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()
    # fields[0] is field 3 (state): ppid is field 4, starttime field 22
    return int(fields[1]), int(fields[19])


def uid_of(pid: int) -> int | None:
    """The real uid of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def descends(pid: int, root: int, depth: int = 64) -> bool:
    """``pid`` is ``root`` or one of its descendants now (its parents, up the tree)."""
    while depth and pid > 1:
        if pid == root:
            return True
        got = _stat(pid)
        if got is None:
            return False
        pid, depth = got[0], depth - 1
    return pid == root


def children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (a child belongs to the thread that forked it)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def descendants(root: int) -> list[int]:
    """``root`` and its descendants, breadth first."""
    order, queue, seen = [], collections.deque([root]), {root}
    while queue:
        pid = queue.popleft()
        order.append(pid)
        for child in children(pid):
            if child not in seen:
                seen.add(child)
                queue.append(child)
    return order


def _holds(pid: int, target: str) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"{fd_dir}/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def _same_pidns(root: int) -> list[int]:
    """Every process in ``root``'s PID namespace (a slower scan of all of /proc)."""
    try:
        ns = os.stat(f"/proc/{root}/ns/pid").st_ino
    except OSError:
        return []
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}/ns/pid").st_ino == ns:
                    out.append(int(name))
            except OSError:
                continue
    return out


def process_info(pid: int, holders: tuple[int, ...] = ()) -> ProcessInfo | None:
    stat = _stat(pid)
    if stat is None:
        return None
    ppid, ticks = stat
    uid, ns_pid = -1, None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
                elif line.startswith("NSpid:"):
                    ns_pid = int(line.split()[-1])
    except OSError:
        return None
    try:
        exe: str | None = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
        argv = [a.decode(errors="replace") for a in raw.split(b"\0")]
        if argv and argv[-1] == "":
            argv.pop()
    except OSError:
        argv = []
    return ProcessInfo(pid=pid, ppid=ppid, uid=uid, exe=exe, cmdline=redact_cmdline(argv),
                       start_time=_boot_time() + ticks / _CLK_TCK, start_ticks=ticks,
                       ns_pid=ns_pid, holders=holders or (pid,))


_CACHE_SIZE = 4096
_cache: collections.OrderedDict[int, ProcessInfo] = collections.OrderedDict()
_cache_lock = threading.Lock()


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def _cached(inode: int) -> ProcessInfo | None:
    with _cache_lock:
        info = _cache.get(inode)
        if info is not None:
            _cache.move_to_end(inode)
    if info is None:
        return None
    stat = _stat(info.pid)                   # the same process (not a reused pid)?
    if stat is None or stat[1] != info.start_ticks or not _holds(info.pid, f"socket:[{inode}]"):
        with _cache_lock:
            _cache.pop(inode, None)
        return None
    return info


def owner_of(inode: int, pid_hint_root: int, *, all_holders: bool = True,
             whole_pidns: bool = True) -> ProcessInfo | None:
    """The process holding ``socket:[inode]``, searched among ``pid_hint_root`` (the task's
    init, by its host pid) and its descendants; if not there and ``whole_pidns``, among every
    process of the root's PID namespace (catches one reparented elsewhere). With
    ``all_holders`` every process is checked and ``holders`` lists all that share the
    socket; the one returned is the first found, breadth first (the oldest ancestor that
    holds it, usually the one that made it). Cached per inode (LRU, 4096 entries); a hit is
    used only while that pid, with the same start time, still holds the socket.

    Not seen: a socket held only in flight (SCM_RIGHTS in a unix socket's queue), in a
    thread's unshared fd table (CLONE_FILES off), or orphaned (closed TCP sockets still
    sending have inode 0).
    """
    if inode <= 0:
        return None
    hit = _cached(inode)
    if hit is not None:
        return dataclasses.replace(hit, cmdline=list(hit.cmdline))    # the cache's stays
    target = f"socket:[{inode}]"
    holders: list[int] = []
    tree = descendants(pid_hint_root)
    for pid in tree:
        if _holds(pid, target):
            holders.append(pid)
            if not all_holders:
                break
    if not holders and whole_pidns:
        inside = set(tree)
        for pid in _same_pidns(pid_hint_root):
            if pid not in inside and _holds(pid, target):
                holders.append(pid)
                if not all_holders:
                    break
    for pid in holders:
        info = process_info(pid, tuple(holders))
        if info is not None:
            with _cache_lock:
                _cache[inode] = info
                while len(_cache) > _CACHE_SIZE:
                    _cache.popitem(last=False)
            return dataclasses.replace(info, cmdline=list(info.cmdline))
    return None
