"""A small ctypes wrapper over libnftables: one batch, one transaction, one-line errors.

Why not fork ``nft``: forking costs milliseconds, and the resolver updates
sets per DNS answer and waits for the kernel's acknowledgement (KERNEL.md).
Why not the Debian ``python3-nftables`` package: our venv does not see it,
and we need only five calls.

``nft_run_cmd_from_buffer`` applies everything in the text as one netlink
batch, so a ruleset, a refresh (add, delete, add) or a removal either
happens whole or not at all. libnftables opens its netlink socket in the
network namespace of the thread that uses it first; ``Nft`` notices when
the calling thread is in another namespace and opens a fresh context, so
it always acts in the namespace of the calling thread.
"""

from __future__ import annotations

import ctypes
import json as _json
import os
import re
import threading

LIBRARY = "libnftables.so.1"
"""Found by the dynamic loader (/usr/lib/x86_64-linux-gnu/libnftables.so.1 on Debian)."""

OUTPUT_HANDLE = 1 << 3
OUTPUT_JSON = 1 << 4
"""NFT_CTX_OUTPUT_* flags from nftables/libnftables.h."""


class NftError(RuntimeError):
    """A batch the kernel or the parser refused; the message is one line."""


_lib = None
_lib_lock = threading.Lock()


def _library():
    """Load libnftables once and declare the calls we use."""
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL(LIBRARY)
            except OSError as e:
                raise NftError(f"cannot load {LIBRARY} (Debian package libnftables1): {e}") \
                    from None
            sigs = {
                "nft_ctx_new": (ctypes.c_void_p, [ctypes.c_uint32]),
                "nft_ctx_free": (None, [ctypes.c_void_p]),
                "nft_ctx_buffer_output": (ctypes.c_int, [ctypes.c_void_p]),
                "nft_ctx_buffer_error": (ctypes.c_int, [ctypes.c_void_p]),
                "nft_ctx_get_output_buffer": (ctypes.c_char_p, [ctypes.c_void_p]),
                "nft_ctx_get_error_buffer": (ctypes.c_char_p, [ctypes.c_void_p]),
                "nft_ctx_output_get_flags": (ctypes.c_uint, [ctypes.c_void_p]),
                "nft_ctx_output_set_flags": (None, [ctypes.c_void_p, ctypes.c_uint]),
                "nft_ctx_set_dry_run": (None, [ctypes.c_void_p, ctypes.c_bool]),
                "nft_run_cmd_from_buffer": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p]),
                "nft_run_cmd_from_filename": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p]),
            }
            for name, (restype, argtypes) in sigs.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
            _lib = lib
    return _lib


def _netns() -> int:
    """The calling thread's network namespace (its inode number)."""
    try:
        return os.stat("/proc/thread-self/ns/net").st_ino
    except OSError:
        return 0


_FILE_LOCATION = re.compile(r"^/proc/self/fd/\d+:(\d+):[\d-]+: ")


def one_line(errors: str) -> str:
    """nft's error report (message, the command, a caret line) as one line.

    ``line 3: Error: Could not process rule: File exists: add element inet egress s { ... }``
    """
    lines = [ln.rstrip() for ln in errors.splitlines() if ln.strip()]
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if "Error:" in line:
            where = _FILE_LOCATION.match(line)
            message = (f"line {where.group(1)}: " if where else "") + line[line.index("Error:"):]
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if nxt and set(nxt) - set("^~ "):       # the offending command, not carets
                message += f": {nxt}"
                i += 1
            out.append(message)
        i += 1
    if not out:
        out = [" ".join(ln.strip() for ln in lines)] if lines else ["nft failed"]
    return "; ".join(out)


class Nft:
    """One libnftables context, re-opened when the calling thread changes namespace.

        nft = Nft()
        nft.run(generate_nft(rules))          # one transaction, or NftError
        nft.check(text)                       # parse and validate in the kernel, change nothing
        nft.run("list table inet egress", json=True)
    """

    def __init__(self):
        self._lib = _library()
        self._ctx = None
        self._ns = None
        self._lock = threading.Lock()

    def _context(self):
        ns = _netns()
        if self._ctx is None or ns != self._ns:
            self._free()
            ctx = self._lib.nft_ctx_new(0)               # NFT_CTX_DEFAULT
            if not ctx:
                raise NftError("nft_ctx_new failed")
            self._lib.nft_ctx_buffer_output(ctx)
            self._lib.nft_ctx_buffer_error(ctx)
            self._ctx, self._ns = ctx, ns
        return self._ctx

    def _free(self):
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def run(self, text: str, *, json: bool = False, handles: bool = False,
            dry_run: bool = False) -> str:
        """Apply ``text`` (nft syntax, many commands) as one transaction; return the output.

        ``json`` lists as ``nft -j`` does (the output, not the input, is JSON);
        ``handles`` as ``nft -a``; ``dry_run`` as ``nft -c``.
        """
        with self._lock:
            ctx = self._context()
            lib = self._lib
            flags = (OUTPUT_JSON if json else 0) | (OUTPUT_HANDLE if handles else 0)
            lib.nft_ctx_output_set_flags(ctx, flags)
            lib.nft_ctx_set_dry_run(ctx, dry_run)
            try:
                rc = lib.nft_run_cmd_from_buffer(ctx, text.encode("utf-8"))
                out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode("utf-8", "replace")
                err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode("utf-8", "replace")
            finally:
                lib.nft_ctx_set_dry_run(ctx, False)
                lib.nft_ctx_output_set_flags(ctx, 0)
        if rc != 0:
            if text.strip().count("\n"):
                err = self._locate(text) or err
            raise NftError(one_line(err))
        return out

    def _locate(self, text: str) -> str | None:
        """The error report of a dry run of ``text`` read as a file.

        nft 1.0.6 quotes the first line of a buffer, not the failing one, in
        its report; read from a file it names the right line and quotes it.
        """
        fd = os.memfd_create("egress-nft")
        try:
            os.write(fd, text.encode("utf-8"))
            with self._lock:
                ctx, lib = self._context(), self._lib
                lib.nft_ctx_set_dry_run(ctx, True)
                try:
                    rc = lib.nft_run_cmd_from_filename(ctx, f"/proc/self/fd/{fd}".encode())
                    err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode("utf-8", "replace")
                    lib.nft_ctx_get_output_buffer(ctx)      # drop what a dry run printed
                finally:
                    lib.nft_ctx_set_dry_run(ctx, False)
        finally:
            os.close(fd)
        return err if rc != 0 and err.strip() else None

    def check(self, text: str) -> None:
        """Validate ``text`` as ``nft -c`` does (parser and kernel), changing nothing."""
        self.run(text, dry_run=True)

    def list_json(self, what: str = "ruleset") -> dict:
        """``nft -j list WHAT`` parsed: ``{"nftables": [...]}``."""
        out = self.run(f"list {what}", json=True)
        return _json.loads(out) if out.strip() else {"nftables": []}

    def close(self) -> None:
        with self._lock:
            self._free()

    def __enter__(self) -> "Nft":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._free()
        except Exception:
            pass
