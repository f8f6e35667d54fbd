"""Run a task's command contained: the auditor's side of ``egress.enforce.taskinit``.

The command runs as a dedicated unprivileged user: never root, and never the
sudo caller's own uid, whose tmux, ssh-agent and home directory the task could
otherwise use. ``--user`` names one; otherwise ``egress-task`` is created on
first use as a system user with no home and no login shell.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from dataclasses import dataclass, field

DEFAULT_USER = "egress-task"

HIDDEN = ["/run/user", "/run/netns", "/var/run/netns", "/run/dbus", "/var/run/dbus",
          "/run/docker.sock", "/var/run/docker.sock", "/run/docker", "/run/containerd",
          "/run/podman", "/run/systemd/private", "/run/systemd/journal", "/run/screen",
          "/tmp/.X11-unix", "/var/lib/egress"]
"""What a task must not reach: session buses and agents of every user, container runtimes,
the named network namespaces, the store. Absent paths are skipped."""

SCRUBBED = ("SSH_AUTH_SOCK", "SSH_AGENT_PID", "DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR",
            "TMUX", "TMUX_PANE", "STY", "DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY",
            "GPG_AGENT_INFO", "KRB5CCNAME", "EGRESS_DB", "SUDO_USER", "SUDO_UID", "SUDO_GID",
            "SUDO_COMMAND", "MAIL", "OLDPWD")
"""Variables that point a process at the caller's sessions, agents or credentials."""


class SandboxError(RuntimeError):
    pass


def _take_back_terminal() -> None:
    """The task ran in the terminal's foreground; the caller's process group gets it back."""
    import signal
    try:
        if not os.isatty(0):
            return
        old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            os.tcsetpgrp(0, os.getpgrp())
        finally:
            signal.signal(signal.SIGTTOU, old)
    except OSError:
        pass


@dataclass(frozen=True)
class TaskUser:
    name: str
    uid: int
    gid: int
    home: str


def task_user(name: str | None = None, caller_uid: int | None = None) -> TaskUser:
    """The user a task runs as; ``egress-task`` is created when asked for and missing."""
    wanted = name or DEFAULT_USER
    try:
        entry = pwd.getpwnam(wanted)
    except KeyError:
        if name is not None:
            raise SandboxError(f"--user: no user {name!r}") from None
        made = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir",
                               "/nonexistent", "--shell", "/usr/sbin/nologin",
                               "--comment", "egress task", wanted],
                              capture_output=True, text=True)
        if made.returncode != 0:
            raise SandboxError(f"cannot create user {wanted}: {made.stderr.strip()}")
        entry = pwd.getpwnam(wanted)
    if entry.pw_uid == 0:
        raise SandboxError(f"--user: {wanted} is root; a task never runs as root")
    if caller_uid is not None and entry.pw_uid == caller_uid:
        raise SandboxError(f"--user: {wanted} is the calling user; its agents, sockets and "
                           "home would be the task's")
    return TaskUser(wanted, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def caller_uid() -> int | None:
    """The real user behind sudo, when there is one."""
    value = os.environ.get("SUDO_UID")
    return int(value) if value and value.isdigit() else None


def task_environment(env: dict[str, str], user: TaskUser, home: str) -> dict[str, str]:
    out = {k: v for k, v in env.items() if k not in SCRUBBED}
    out.update(HOME=home, USER=user.name, LOGNAME=user.name)
    out.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return out


@dataclass
class Sandbox:
    """A command contained in a task's network namespace (``netns``: a path under
    /run/netns), started by ``start`` and waited for by ``wait``."""

    netns: str
    argv: list[str]
    user: TaskUser
    resolv_conf: str | None = None
    hide: list[str] = field(default_factory=lambda: list(HIDDEN))
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    cwd: str = field(default_factory=os.getcwd)
    proc: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        home, make_home = self.user.home, None
        if not os.path.isdir(home) or os.stat(home).st_uid != self.user.uid:
            # a home of its own in its private /tmp, gone with the task
            home = "/tmp/home"
            make_home = {"path": home, "uid": self.user.uid, "gid": self.user.gid}
        spec = {"netns": self.netns, "argv": self.argv, "uid": self.user.uid,
                "gid": self.user.gid, "cwd": self.cwd, "hide": self.hide,
                "resolv_conf": self.resolv_conf, "home": make_home,
                "env": task_environment(self.env, self.user, home)}
        read, write = os.pipe()
        try:
            # The spec goes through a pipe, not argv: it holds the environment.
            # -I and cwd "/": this process is root, and the caller's directory is the task's
            # workspace: nothing there may land on its import path (an egress/ package the
            # task wrote would run as root at the next run).
            self.proc = subprocess.Popen([sys.executable, "-I", "-m", "egress.enforce.taskinit",
                                          str(read)], pass_fds=(read,), close_fds=True,
                                         cwd="/")
        finally:
            os.close(read)
        with os.fdopen(write, "w") as f:
            json.dump(spec, f)
        return self.proc

    def signal(self, signum: int) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def wait(self) -> int:
        assert self.proc is not None
        status = self.proc.wait()
        _take_back_terminal()
        return 128 - status if status < 0 else status

    def close(self) -> None:
        """Nothing to remove: the task's home lived in its private /tmp."""
