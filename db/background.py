"""The store written from a process of its own, so a replay never waits on the database.

The parent sends batches over a pipe; a forked child owns the Store (its
engine, its imports) and writes them on the other core. Errors come back at
``finish``, or at the first flush when the store cannot even be opened.
This module imports nothing heavy: the child imports the store.
"""

from __future__ import annotations

import multiprocessing
import sys
import traceback

from egress.records import FlowRecord, Mode, NameBinding, TaskEvent
from tagging.manifest import Purpose


class WriterError(RuntimeError):
    """The store writer failed; the message is the store's one line."""


def _child(conn, inbox, cli_url: str | None, config_url: str | None, kind: str,
           sources: list[str]) -> None:
    import ctypes
    import signal
    # Ends with its parent, even one killed by SIGKILL: an orphaned writer has no one to
    # write for (what it was given before is written; the queue is gone).
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)   # PR_SET_PDEATHSIG
    try:
        from db.engine import resolve_url
        from db.errors import StoreError
        from db.recorder import StoreRecorder
        from db.store import Store
    except Exception as e:  # an import that fails is a broken install: say so
        conn.send(("error", f"cannot load the store: {e}"))
        return
    error = None
    try:
        store = Store.open(resolve_url(cli_url, config_url))
        recorder = StoreRecorder(store, kind=kind, sources=sources)
        conn.send(("ready", None))
    except StoreError as e:
        conn.send(("error", str(e)))
        return
    try:
        while True:
            verb, args = inbox.get()
            if verb == "stop":
                return
            if error is not None and verb != "finish" and kind != "live":
                continue            # the first error is what the user needs; drain the rest
            try:
                if verb == "finish":
                    if error is None:
                        recorder.finish_counters(*args)
                    conn.send(("error", error) if error else ("done", None))
                    return
                getattr(recorder, verb)(*args)
            except StoreError as e:
                error = error or str(e)
                if kind == "live":          # a long-lived writer goes on: say it now
                    print(f"egress: store: {e}", file=sys.stderr, flush=True)
            except Exception as e:      # a bug of ours: never let it pass silently
                error = f"store writer failed: {type(e).__name__}: {e}"
                traceback.print_exc()
    except (EOFError, OSError):
        pass                        # the parent went away; nothing more to write
    finally:
        store.close()


class BackgroundRecorder:
    """``egress.replay.Recorder`` that writes in a child process."""

    def __init__(self, cli_url: str | None, config_url: str | None, *, kind: str,
                 sources: list[str]):
        """Start the writer on the store --db names (else EGRESS_DB, the config, the default)."""
        ctx = multiprocessing.get_context("fork")
        self._conn, child_conn = ctx.Pipe()     # the writer's answers
        # Batches go through a queue: its feeder thread pickles and writes them, so the
        # judging thread never blocks on a full pipe while the writer is busy.
        self._inbox = ctx.Queue(maxsize=64)
        self._proc = ctx.Process(target=_child,
                                 args=(child_conn, self._inbox, cli_url, config_url, kind,
                                       list(sources)),
                                 name="egress-store-writer", daemon=True)
        self._proc.start()
        child_conn.close()
        self._ready = False

    def _check_ready(self, wait: bool) -> None:
        """Raise the writer's error if it could not open the store (never waits unless asked)."""
        if not self._ready and (wait or self._conn.poll()):
            status, message = self._recv()
            if status != "ready":
                raise WriterError(message)
            self._ready = True

    def _send(self, verb: str, *args) -> None:
        self._check_ready(wait=False)
        if not self._proc.is_alive():
            raise WriterError("the store writer stopped")
        self._inbox.put((verb, args))

    def _recv(self):
        try:
            return self._conn.recv()
        except EOFError:
            raise WriterError("the store writer stopped without a word") from None

    def task(self, task: str, purpose: Purpose, mode: Mode, started: int) -> None:
        self._send("task", task, purpose, mode, started)

    def records(self, batch: list[FlowRecord | TaskEvent]) -> None:
        self._send("records", batch)

    def bindings(self, batch: list[NameBinding]) -> None:
        self._send("bindings", batch)

    def end_task(self, task: str, ended: int) -> None:
        self._send("end_task", task, ended)

    def finish(self, result, inputs: dict) -> None:
        """Close the run with its counters and wait for every write; WriterError if any failed."""
        flows = {t or "": s.flows for t, s in result.tasks.items()}
        self._send("finish", inputs, flows)
        self._check_ready(wait=True)
        status, message = self._recv()
        self._proc.join(timeout=60)
        self._inbox.close()
        if status != "done":
            raise WriterError(message)

    def abandon(self) -> None:
        """Stop the writer after a failure elsewhere (what it wrote stays)."""
        if self._proc.is_alive():
            self._inbox.put(("stop", ()))
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.terminate()
        self._inbox.close()
