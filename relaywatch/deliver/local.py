"""Local delivery into Maildir folders under ``data_dir/mailboxes/<domain>/<user>``.

Maildir's rule gives durability without locks: write into ``tmp/``, fsync,
then rename into ``new/``.  A crash leaves at most a file in ``tmp/``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

from relaywatch.model import StoredBody
from relaywatch.route import split_address


def mailbox_path(data_dir: Path, address: str) -> Path:
    local, domain = split_address(address)
    return data_dir / "mailboxes" / domain / local.lower()


def _deliver(maildir: Path, body: StoredBody, delivered_to: str) -> str:
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    name = f"{time.time():.6f}.{secrets.token_hex(6)}.{socket.gethostname()}"
    tmp = maildir / "tmp" / name
    with open(tmp, "wb") as out:
        out.write(f"Delivered-To: {delivered_to}\r\n".encode("utf-8", "replace"))
        if body.data is not None:
            out.write(body.data)
        else:
            with open(body.path, "rb") as src:
                shutil.copyfileobj(src, out, 1024 * 1024)
        out.flush()
        os.fsync(out.fileno())
    os.rename(tmp, maildir / "new" / name)
    fd = os.open(maildir / "new", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return name


async def deliver_local(data_dir: Path, address: str, body: StoredBody) -> str:
    """Deliver one copy; return the Maildir file name.  Raises OSError."""
    return await asyncio.to_thread(_deliver, mailbox_path(data_dir, address), body, address)
