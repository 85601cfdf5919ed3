"""Message bodies on their way into the queue.

Small bodies stay in memory and are committed inside the queue row (one fsync
for a whole group commit).  Anything over ``INLINE_LIMIT`` spills to a file
while it is still being received, so a 35 MB message never sits in memory;
the file is fsync'd and renamed into place before the row pointing at it is
committed.  A crash between the two leaves an orphan file, which
``sweep_orphans`` removes at start-up; never a row without its body.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
from pathlib import Path

from relaywatch.model import StoredBody

INLINE_LIMIT = 128 * 1024


class BodySpool:
    def __init__(self, spool_dir: Path, inline_limit: int = INLINE_LIMIT):
        self.spool_dir = spool_dir
        self.inline_limit = inline_limit
        self.size = 0
        self._buffer = bytearray()
        self._file = None
        self._tmp_path: str | None = None
        self.spilled = False   # the body went to a spool file (the spool directory was written)

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._buffer += data
        if len(self._buffer) > self.inline_limit:
            fd, self._tmp_path = tempfile.mkstemp(prefix="incoming-", dir=self.spool_dir)
            self.spilled = True
            self._file = os.fdopen(fd, "wb", buffering=256 * 1024)
            self._file.write(self._buffer)
            self._buffer = bytearray()

    def reader(self):
        """A binary file object over what was written so far (for signing, receive/dkim_sign.py)."""
        if self._file is None:
            import io
            return io.BytesIO(self._buffer)
        self._file.flush()
        return open(self._tmp_path, "rb")

    def discard(self) -> None:
        self._buffer = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp_path:
            try:
                os.unlink(self._tmp_path)
            except OSError:
                pass
            self._tmp_path = None

    async def finish(self, inline: bool = False) -> StoredBody:
        """Make the body durable; return what the queue row should hold.

        ``inline``: the store keeps every body itself (PostgreSQL, so that any
        node can deliver it); a spilled body is read back once for the commit.
        """
        if self._file is None:
            return StoredBody(size=self.size, data=bytes(self._buffer))
        if inline:
            f, tmp = self._file, self._tmp_path
            self._file, self._tmp_path = None, None

            def read_back() -> bytes:
                f.close()
                try:
                    with open(tmp, "rb") as src:
                        return src.read()
                finally:
                    os.unlink(tmp)
            return StoredBody(size=self.size, data=await asyncio.to_thread(read_back))
        f, tmp = self._file, self._tmp_path
        final = str(self.spool_dir / f"body-{secrets.token_hex(8)}")

        def sync() -> None:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.rename(tmp, final)
            dir_fd = os.open(self.spool_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._file, self._tmp_path = None, None
        try:
            await asyncio.to_thread(sync)
        except BaseException:
            for p in (tmp, final):
                try:
                    os.unlink(p)
                except OSError:
                    pass
            raise
        return StoredBody(size=self.size, path=final)


def sweep_orphans(spool_dir: Path, referenced: set[str]) -> int:
    """Remove spool files no queue row points at (left by a crash)."""
    removed = 0
    for path in spool_dir.glob("*"):
        if str(path) not in referenced:
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
    return removed

