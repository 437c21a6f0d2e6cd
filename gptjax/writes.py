"""Writing files so that nothing is lost: through a temporary file of our own beside the target, renamed into place;
and the probe, before any work, that a directory (made for the probe if missing, then removed again) takes a file."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import tempfile
from collections.abc import Callable
from typing import BinaryIO


def temp_beside(path: str) -> tuple[int, str]:
    """(fd, name) of a new file beside path under a unique name (a PATH.tmp there may be somebody else's), with the
    mode any new file gets (0666 less the umask), not mkstemp's 0600; a link is never written through."""
    d, base = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = os.path.join(d, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write(path: str, content: str | bytes | Callable[[BinaryIO], None]) -> None:
    """Write text (UTF-8), bytes, or what content(f) writes to a binary file, to a temporary file beside path, then
    rename it into place: a reader sees the old file or the new one, never a part; a failed write leaves the old."""
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def probe(d: str) -> None:
    """Raise OSError unless directory d takes a new file. Missing directories up to d are made for the probe and
    removed again, so it leaves nothing behind; a file where a directory must be is NotADirectoryError naming it."""
    missing, p = [], os.path.abspath(d)  # the directories to make, deepest first
    while not os.path.isdir(p):
        if os.path.lexists(p):  # a file (or a dangling link)
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), p)
        missing.append(p)
        p = os.path.dirname(p)
    made = []
    try:
        for m in reversed(missing):
            os.mkdir(m)
            made.append(m)
        fd, tmp = tempfile.mkstemp(prefix=".gptjax-probe-", dir=d)
        os.close(fd)
        os.remove(tmp)
    finally:
        for m in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(m)


@contextlib.contextmanager
def locked(path: str, waiting: str, optional: bool = False):
    """Hold an exclusive lock on the file at path (made if missing) for the block; when another process holds it,
    print `waiting` to stderr once and wait. The lock goes with the process, however it ends. optional: where the
    lock file cannot be made (a read-only directory, which nobody can write into either), go on without it."""
    import fcntl
    import sys

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError:
        if not optional:
            raise
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"gptjax: {waiting}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def writer_tag() -> str:
    """PID@HOST: who writes a temporary entry, for remove_abandoned."""
    import socket

    return f"{os.getpid()}@{socket.gethostname()}"


def remove_abandoned(root: str, prefix: str) -> None:
    """Remove the entries of root named PREFIX + writer_tag() + "-..." whose process is gone: what a killed writer
    on this host left (a directory shared between hosts keeps the other hosts' entries: their pids mean nothing
    here)."""
    import shutil
    import socket

    host = socket.gethostname()
    for entry in os.listdir(root):
        pid, _, rest = entry[len(prefix):].partition("@")
        if not entry.startswith(prefix) or not rest.startswith(f"{host}-"):
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still at work
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):  # not one of ours, or another user's live process
            continue
        shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
