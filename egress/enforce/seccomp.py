"""A seccomp filter that denies AF_VSOCK sockets to a task.

AF_VSOCK ignores network namespaces (KERNEL.md): a task could reach the
hypervisor or other guests around every rule we load. The filter answers
``socket(AF_VSOCK, ...)`` and ``socketpair(AF_VSOCK, ...)`` with
EAFNOSUPPORT, as a kernel without vsock would, and allows everything else.
System calls of another architecture (32-bit code on a 64-bit host, where the
socket numbers differ) are refused with ENOSYS rather than let through
unchecked.

Installed with prctl(PR_SET_SECCOMP) after PR_SET_NO_NEW_PRIVS, in the task's
own process just before it executes the command; inherited by every child
and kept across execve.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

AF_VSOCK = 40

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000

# linux/audit.h, and the socket/socketpair numbers of each architecture's table
ARCHES = {
    "x86_64": (0xC000003E, {"socket": 41, "socketpair": 53}),
    "aarch64": (0xC00000B7, {"socket": 198, "socketpair": 199}),
}

# struct seccomp_data: nr (u32), arch (u32), instruction_pointer (u64), args[6] (u64)
OFF_NR, OFF_ARCH, OFF_ARG0 = 0, 4, 16

# classic BPF opcodes
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def program(machine: str | None = None) -> bytes:
    """The filter for this machine's architecture, as packed sock_filter instructions."""
    machine = machine or platform.machine()
    if machine not in ARCHES:
        raise OSError(f"seccomp: no AF_VSOCK filter for architecture {machine}")
    arch, numbers = ARCHES[machine]
    deny = SECCOMP_RET_ERRNO | errno.EAFNOSUPPORT
    return b"".join([
        _insn(BPF_LD_W_ABS, 0, 0, OFF_ARCH),
        _insn(BPF_JEQ_K, 1, 0, arch),                          # our arch: go on
        _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),
        _insn(BPF_LD_W_ABS, 0, 0, OFF_NR),
        _insn(BPF_JEQ_K, 2, 0, numbers["socket"]),             # -> load the family
        _insn(BPF_JEQ_K, 1, 0, numbers["socketpair"]),
        _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        _insn(BPF_LD_W_ABS, 0, 0, OFF_ARG0),                   # low 32 bits of args[0]
        _insn(BPF_JEQ_K, 0, 1, AF_VSOCK),
        _insn(BPF_RET_K, 0, 0, deny),
        _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ])


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(machine: str | None = None) -> None:
    """Set no_new_privs and load the filter into the calling process (irreversible)."""
    code = program(machine)
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
