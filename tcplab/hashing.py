"""Hashing the start of an open file: the server (a kept partial) and the client (before resuming) both do."""

from __future__ import annotations

import errno
import os
from typing import Any

#: Bytes read at a time.
CHUNK_SIZE = 1 << 20


def hashRange(fd: int, length: int, hasher: Any, chunkSize: int = CHUNK_SIZE) -> None:
    """(Blocking.) Feed the first ``length`` bytes of ``fd`` to ``hasher``.

    Reads with ``pread``, so the file position is left alone. Raises OSError when
    a read fails, or (EIO) when the file holds fewer than ``length`` bytes.
    """
    position = 0
    while position < length:
        chunk = os.pread(fd, min(chunkSize, length - position), position)
        if not chunk:
            raise OSError(errno.EIO, "it got shorter while it was being read")
        hasher.update(chunk)
        position += len(chunk)
