"""One bounded reader for every file poolkeeper takes as input: the config, its included
fragments, the validation cache's entries and the files they name.

A path on the command line can name anything: `/dev/zero` would be read until MemoryError, a
FIFO would block the reader for ever, a 50 MB file would cost seconds and a gigabyte in the
YAML parser. So: regular files only (checked before and after opening, and the open itself
cannot block, O_NONBLOCK), and the size checked before reading, then enforced while reading
(the file may grow, and /proc files report size 0). Kept free of imports beyond `os`: the
daemon's start from the cache reads through it on the way to READY=1.
"""

from __future__ import annotations

import errno
import os
import stat

MAX_CONFIG_BYTES = 32 * 1024 * 1024  # a config or fragment: a 50,000-job spec is ~5 MiB

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class TooLarge(Exception):
    """The file is larger than the limit: nothing of it was read (or kept)."""

    def __init__(self, path: str, limit: int) -> None:
        super().__init__(f"{path}: larger than {limit} bytes")
        self.path = path
        self.limit = limit


def read_regular(path: str, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of the regular file at `path`, if it has at most `limit` of them.

    Raises OSError when the file cannot be read (its strerror says why, e.g. 'No such file or
    directory', 'Is a directory', 'not a regular file (it is a FIFO)') and TooLarge."""
    return read_regular_stat(path, limit)[0]


def read_regular_stat(path: str, limit: int) -> tuple[bytes, os.stat_result]:
    """read_regular(), plus the stat of the descriptor that was read."""
    _require_regular(os.stat(path).st_mode)  # don't even open a device or a FIFO
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        _require_regular(st.st_mode)  # replaced between the stat and the open
        if st.st_size > limit:
            raise TooLarge(path, limit)
        chunks: list[bytes] = []
        left = limit + 1  # one byte more than allowed tells a file that grew
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise TooLarge(path, limit)
        return b"".join(chunks), st
    finally:
        os.close(fd)


def _require_regular(mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
    kind = _KINDS.get(stat.S_IFMT(mode), "not a file")
    raise OSError(errno.EINVAL, f"not a regular file (it is {kind})")
