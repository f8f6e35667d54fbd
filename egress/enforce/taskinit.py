"""The task's side of the sandbox: ``python -m egress.enforce.taskinit FD``, started by
``egress.enforce.sandbox`` as root, the run's spec readable on file descriptor FD.

It joins the task's network namespace, makes its own mount and PID namespaces,
hides what a task could use to get around the network namespace (filesystem
unix sockets cross network namespaces: systemd --user, D-Bus, ssh-agent,
tmux, docker.sock; ``/run/netns`` would let a root task join the host's
namespaces), binds a ``resolv.conf`` naming the task's resolver, and runs the
command as the task's unprivileged user with no capabilities, no_new_privs,
a seccomp filter denying AF_VSOCK, only stdio, and a scrubbed environment.

Three processes, so that signals pass through and the exit status comes back:
this one (in the host's PID namespace, where the auditor sees it), the PID
namespace's init (reaps, passes signals on), and the command.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

# Imported now, before the task's /tmp, /var/tmp, /dev/shm and /run are hidden: egress may
# be installed under one of them (a clone in /tmp), and would then be out of reach.
from egress.enforce import seccomp

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
PR_CAPBSET_DROP = 24

FORWARDED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
             signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT)
"""Signals passed on to the command (SIGKILL and SIGSTOP cannot be caught)."""

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None):
    _check(_libc.mount(source.encode(), target.encode(),
                       fstype.encode() if fstype else None, flags,
                       data.encode() if data else None), f"mount {target}")


def enter_namespaces(netns_path: str) -> None:
    """Join the task's network namespace; new mount and PID namespaces (the PID one
    applies to children); mounts made here never propagate back to the host."""
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns {netns_path}")
    finally:
        os.close(fd)
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID), "unshare")
    _mount("none", "/", None, MS_REC | MS_PRIVATE)


PRIVATE = ("/tmp", "/var/tmp", "/dev/shm")
"""Shared scratch places: the task gets its own, empty (another run's files, or a unix
socket relaying to the network, would be reachable there)."""
EMPTIED = ("/run", "/var/run")
"""Where the host's daemons keep their sockets (the journal, D-Bus, nscd, systemd-resolved's
varlink, container runtimes, the named network namespaces): an empty tmpfs over all of it,
not a list of what to hide."""


def hide(paths: list[str], resolv_conf: str | None, home: dict | None = None) -> None:
    """An empty /run, private scratch places, /dev/null over the other hidden paths, the
    task's resolv.conf, and its home (in its private /tmp)."""
    resolv_target = os.path.realpath("/etc/resolv.conf")
    resolv_text = open(resolv_conf).read() if resolv_conf else None
    for path in EMPTIED:
        if os.path.isdir(path) and not os.path.islink(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=1m")
    for path in PRIVATE:
        if os.path.isdir(path) and not os.path.islink(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for path in paths:
        if not os.path.lexists(path) or path.startswith(EMPTIED + PRIVATE):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k")
        else:
            _mount("/dev/null", os.path.realpath(path), None, MS_BIND)
    if resolv_text is not None:
        _place_resolv_conf(resolv_target, resolv_text)
    if home:
        os.makedirs(home["path"], mode=0o700, exist_ok=True)
        os.chown(home["path"], home["uid"], home["gid"])


def _place_resolv_conf(target: str, text: str) -> None:
    """The task's resolv.conf where /etc/resolv.conf leads: written into the emptied /run
    when it leads there (systemd-resolved's stub file), else bound over the file."""
    if target.startswith(tuple(p + "/" for p in EMPTIED)):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as f:
            f.write(text)
        return
    source = "/run/egress-resolv.conf"
    with open(source, "w") as f:
        f.write(text)
    _mount(source, target, None, MS_BIND)


def _forward_to(pid: int) -> None:
    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    for sig in FORWARDED:
        signal.signal(sig, forward)


def _status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def _wait_for(pid: int, reap_all: bool) -> int:
    """Wait for ``pid`` (as init, reaping every orphan too); its exit status."""
    while True:
        try:
            got, status = os.waitpid(-1 if reap_all else pid, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            return 1
        if got == pid:
            return _status(status)


def drop_privileges(uid: int, gid: int) -> None:
    """No capabilities (bounding set emptied, then a non-zero uid clears the rest)."""
    cap = 0
    while _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise OSError("the task still runs as root")


def _take_terminal() -> None:
    """Run in our own process group, in the terminal's foreground when there is one, so
    ^C reaches the command (once) rather than the auditor."""
    os.setpgid(0, 0)
    if os.isatty(0):
        old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            os.tcsetpgrp(0, os.getpgrp())
        except OSError:
            pass
        signal.signal(signal.SIGTTOU, old)


def run_command(spec: dict) -> None:
    """The command's process: become the task user and execute (never returns)."""
    _take_terminal()
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_DFL)
    drop_privileges(spec["uid"], spec["gid"])
    seccomp.install()                       # also sets no_new_privs
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    try:
        os.chdir(spec["cwd"])
    except OSError:
        os.chdir("/")
    try:
        os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
    except OSError as e:
        print(f"egress run: {spec['argv'][0]}: {e.strerror}", file=sys.stderr)
        os._exit(127)


def init(spec: dict) -> None:
    """PID 1 of the task's PID namespace: its own /proc, then the command."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    pid = os.fork()
    if pid == 0:
        run_command(spec)
    _forward_to(pid)
    os._exit(_wait_for(pid, reap_all=True))


def main() -> None:
    with os.fdopen(int(sys.argv[1]), "r") as f:
        spec = json.load(f)
    try:
        enter_namespaces(spec["netns"])
        hide(spec["hide"], spec.get("resolv_conf"), spec.get("home"))
    except OSError as e:
        print(f"egress run: sandbox: {e}", file=sys.stderr)
        sys.exit(126)
    pid = os.fork()
    if pid == 0:
        try:
            init(spec)
        except Exception as e:              # noqa: BLE001 - said, then the task fails
            print(f"egress run: the task's init: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            os._exit(126)
    _forward_to(pid)
    sys.exit(_wait_for(pid, reap_all=False))


if __name__ == "__main__":
    main()
