"""A real headless Chromium driven over the DevTools protocol (``--remote-debugging-pipe``:
JSON messages ending in NUL on file descriptors 3 and 4, no websocket library needed).

``load(url)`` opens a page and returns what a test checks: every request the page made,
its console messages and uncaught exceptions, log entries (CSP violations, failed loads),
its text and a full-page PNG screenshot.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

BINARIES = ("chromium", "chromium-browser")


def binary() -> str | None:
    return next((p for p in map(shutil.which, BINARIES) if p), None)


@dataclass
class Page:
    requests: list[str] = field(default_factory=list)
    """URLs of every request the page made (its own document included)."""
    console: list[tuple[str, str]] = field(default_factory=list)
    """(level, text) of console calls, exceptions and log entries (CSP, failed loads)."""
    text: str = ""
    """document.body.innerText."""
    scripts: int = 0
    """<script> elements in the DOM."""
    screenshot: bytes = b""

    def errors(self) -> list[tuple[str, str]]:
        return [c for c in self.console if c[0] in ("error", "warning", "exception", "assert")]


def _high(fds: tuple[int, int]) -> tuple[int, int]:
    """The pipe's ends moved to 10 and above, clear of the 3 and 4 the child is given
    (``exec 3<&4`` would otherwise clobber one end with the other)."""
    out = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds)
    for fd in fds:
        os.close(fd)
    return out


class Browser:
    def __init__(self, exe: str, timeout: float = 60):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="egress-chromium-")
        to_child, self._write = _high(os.pipe())
        self._read, from_child = _high(os.pipe())
        # The child's fd 3 reads our commands, its fd 4 writes replies and events (bash: dash
        # takes only one-digit descriptors in a redirection).
        self.proc = subprocess.Popen(
            ["bash", "-c", 'exec 3<&"$1" 4>&"$2"; shift 2; exec "$@"', "bash",
             str(to_child), str(from_child), exe, "--headless", "--no-sandbox",
             "--disable-gpu", "--hide-scrollbars", "--remote-debugging-pipe",
             "--no-first-run", "--disable-background-networking", "--disable-sync",
             "--disable-component-update", "--disable-default-apps",
             # Nothing leaves the machine, whatever a page asks for: every request still
             # shows in the DevTools events, then fails here.
             "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
             f"--user-data-dir={self.profile}", "about:blank"],
            pass_fds=(to_child, from_child), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._write)
        os.close(self._read)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        """One command; its result. Events that arrive meanwhile are kept in ``events``."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str) -> dict:
        deadline = time.monotonic() + self.timeout
        for e in self.events:
            if e.get("method") == method and e.get("sessionId") == session:
                return e
        while True:
            e = self._message(deadline)
            self.events.append(e)
            if e.get("method") == method and e.get("sessionId") == session:
                return e

    def load(self, url: str, width: int = 1280) -> Page:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Network", "Runtime", "Log", "Page"):
            self.send(f"{domain}.enable", session)
        self.send("Emulation.setDeviceMetricsOverride", session, width=width, height=900,
                  deviceScaleFactor=1, mobile=False)
        self.events.clear()
        self.send("Page.navigate", session, url=url)
        self.wait_for("Page.loadEventFired", session)
        # Anything the page does right after load (it has no script, but a bad page might).
        self.send("Runtime.evaluate", session,
                  expression="new Promise(r => setTimeout(r, 300))", awaitPromise=True)
        page = Page()

        def value(expression: str):
            return self.send("Runtime.evaluate", session, expression=expression,
                             returnByValue=True)["result"].get("value")

        page.text = value("document.body.innerText")
        page.scripts = value("document.scripts.length")
        size = self.send("Page.getLayoutMetrics", session)["cssContentSize"]
        shot = self.send("Page.captureScreenshot", session, format="png",
                         captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": width,
                               "height": min(size["height"], 16000), "scale": 1})
        page.screenshot = base64.b64decode(shot["data"])
        for e in self.events:
            if e.get("sessionId") != session:
                continue
            p = e.get("params", {})
            if e["method"] == "Network.requestWillBeSent":
                page.requests.append(p["request"]["url"])
            elif e["method"] == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", "")))
                                for a in p.get("args", []))
                page.console.append((p["type"], text))
            elif e["method"] == "Runtime.exceptionThrown":
                page.console.append(("exception", json.dumps(p["exceptionDetails"])[:500]))
            elif e["method"] == "Log.entryAdded":
                page.console.append((p["entry"]["level"], p["entry"]["text"]))
        self.send("Target.closeTarget", targetId=target)
        return page
