"""
Durable file writes: a file replaced so that a crash leaves either its old
contents or the new ones, never part of either.
"""

from __future__ import annotations

import os


def fsync_directory(path: str) -> None:
    """
    Sync a directory, so that the names created, renamed or removed in it
    survive a crash.  This blocks on disk I/O.

    @raise OSError: When it can not be opened or synced.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: str, data: bytes, suffix: str, private: bool = False) -> None:
    """
    Write C{data} to C{path + suffix}, flush and fsync it, then rename it
    over C{path}.  The temporary file is removed when any of this fails.
    The directory is not fsync'd: the caller does that, once for all the
    names it created or renamed in it.  This blocks on disk I/O.

    @param suffix: Added to C{path} to name the temporary file, so that
        the files of writers that died can be recognised.
    @param private: Create the temporary file readable by its owner only,
        and fail (leaving it alone) when it exists already; otherwise it is
        created with the default permissions, or truncated.
    @raise OSError: When the file can not be written.
    """
    temporary = path + suffix
    if private:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") if private else open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
