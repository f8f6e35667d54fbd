"""A live task's purpose, read only if the task cannot have written it.

DESIGN: live, a manifest the task's user can write is refused. The file is opened once;
what is checked is the opened file (its owner, mode and any POSIX ACL) and every folder
on the way to it, as given and as resolved (a symlink in a folder the task can write
could be swapped between a check and a read); what is parsed is the bytes read from it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tagging import manifest

ACL = "system.posix_acl_access"


class PurposeFileError(RuntimeError):
    pass


def _writable_by(st: os.stat_result, has_acl: bool, uid: int | None, gid: int | None,
                 folder: bool) -> str | None:
    """Why the task could change this file or folder, or None."""
    if uid is not None and st.st_uid == uid:
        return "owns"
    if has_acl:
        return "may be given write access by a POSIX ACL on"
    if st.st_mode & stat.S_IWOTH and not (folder and st.st_mode & stat.S_ISVTX):
        return "can write"
    if gid is not None and st.st_gid == gid and st.st_mode & stat.S_IWGRP:
        return "can write (group)"
    return None


def _has_acl(target) -> bool:
    try:
        return ACL in os.listxattr(target)
    except OSError:
        return False


def load(path: str, uid: int | None, gid: int | None, who: str) -> manifest.Purpose:
    """The manifest at ``path``, refused with one line when ``who`` (uid/gid) could write it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise manifest.ManifestError(path, None, f"cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        why = _writable_by(st, _has_acl(fd), uid, gid, folder=False)
        if why:
            raise PurposeFileError(f"{path}: the task's user {who} {why} it; a live purpose "
                                   "must be out of the task's reach")
        given, resolved = Path(os.path.abspath(path)), Path(os.path.realpath(path))
        for folder in dict.fromkeys([*given.parents, *resolved.parents]):
            fst = folder.stat()
            why = _writable_by(fst, _has_acl(str(folder)), uid, gid, folder=True)
            if why:
                raise PurposeFileError(f"{path}: the task's user {who} {why} {folder}; a "
                                       "live purpose must be out of the task's reach")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read()
    finally:
        os.close(fd)
    return manifest.parse(raw, source=path)
