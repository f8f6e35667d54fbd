"""A seccomp filter for a task: only socket families its network namespace governs.

AF_VSOCK ignores network namespaces (KERNEL.md): a task could reach the
hypervisor or other guests around every rule we load. The filter lets
``socket`` and ``socketpair`` open AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK
only (others get EAFNOSUPPORT, as a kernel without them would); refuses
io_uring, which opens sockets without ``socket(2)``; refuses the TIOCSTI and
TIOCLINUX ioctls, which would type into the caller's terminal; and refuses
system calls of another ABI (32-bit or x32 numbers differ) with ENOSYS
rather than let them through unchecked.

Installed with prctl(PR_SET_SECCOMP) after PR_SET_NO_NEW_PRIVS, in the task's
own process just before it executes the command; inherited by every child
and kept across execve.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
AF_VSOCK = 40
ALLOWED_FAMILIES = (AF_UNIX, AF_INET, AF_INET6, AF_NETLINK)
"""Socket families a task may open: the ones its network namespace governs (AF_VSOCK,
among others, ignores network namespaces)."""

TIOCSTI, TIOCLINUX = 0x5412, 0x541C
"""ioctls that push input into a terminal: a task must not type into its caller's shell."""

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
X32_SYSCALL_BIT = 0x40000000

# linux/audit.h, and the system call numbers of each architecture's table
ARCHES = {
    "x86_64": (0xC000003E, {"socket": 41, "socketpair": 53, "ioctl": 16,
                            "io_uring": (425, 426, 427)}),
    "aarch64": (0xC00000B7, {"socket": 198, "socketpair": 199, "ioctl": 29,
                             "io_uring": (425, 426, 427)}),
}

# struct seccomp_data: nr (u32), arch (u32), instruction_pointer (u64), args[6] (u64)
OFF_NR, OFF_ARCH, OFF_ARG0, OFF_ARG1 = 0, 4, 16, 24

# classic BPF opcodes
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_RET_K = 0x06


def _assemble(code: list) -> bytes:
    """Instructions with symbolic jump targets: ("jeq", k, "label") jumps there when equal;
    ("label", name) marks a place."""
    places, n = {}, 0
    for insn in code:
        if insn[0] == "label":
            places[insn[1]] = n
        else:
            n += 1
    out, i = [], 0
    for insn in code:
        op = insn[0]
        if op == "label":
            continue
        if op == "ld":
            out.append(struct.pack("HBBI", BPF_LD_W_ABS, 0, 0, insn[1]))
        elif op == "ret":
            out.append(struct.pack("HBBI", BPF_RET_K, 0, 0, insn[1]))
        else:
            jump = places[insn[2]] - i - 1
            out.append(struct.pack("HBBI", BPF_JEQ_K if op == "jeq" else BPF_JGE_K,
                                   jump, 0, insn[1]))
        i += 1
    return b"".join(out)


def program(machine: str | None = None) -> bytes:
    """The filter for this machine's architecture, as packed sock_filter instructions."""
    machine = machine or platform.machine()
    if machine not in ARCHES:
        raise OSError(f"seccomp: no filter for architecture {machine}")
    arch, nr = ARCHES[machine]
    errno_ = lambda e: SECCOMP_RET_ERRNO | e                      # noqa: E731
    code = [("ld", OFF_ARCH), ("jeq", arch, "native"), ("ret", errno_(errno.ENOSYS)),
            ("label", "native"), ("ld", OFF_NR),
            ("jge", X32_SYSCALL_BIT, "nosys"),                  # x32 calls: other numbers
            ("jeq", nr["socket"], "family"), ("jeq", nr["socketpair"], "family"),
            ("jeq", nr["ioctl"], "ioctl")]
    # io_uring creates sockets without socket(2), past the family check: not for tasks
    code += [("jeq", n, "perm") for n in nr["io_uring"]]
    code += [("ret", SECCOMP_RET_ALLOW),
             ("label", "family"), ("ld", OFF_ARG0)]
    code += [("jeq", family, "allow") for family in ALLOWED_FAMILIES]
    code += [("ret", errno_(errno.EAFNOSUPPORT)),
             ("label", "ioctl"), ("ld", OFF_ARG1),
             ("jeq", TIOCSTI, "perm"), ("jeq", TIOCLINUX, "perm"),
             ("label", "allow"), ("ret", SECCOMP_RET_ALLOW),
             ("label", "perm"), ("ret", errno_(errno.EPERM)),
             ("label", "nosys"), ("ret", errno_(errno.ENOSYS))]
    return _assemble(code)


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
