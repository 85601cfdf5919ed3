"""The body to send to one destination: a stored body made to fit what it offers.

The rewrite itself is pure and lives in the kernel (relaywatch/mime.py:
lines of at most 998 octets, 7-bit for a destination without 8BITMIME), since
DKIM signing on the receiving side uses it too; this is delivery's edge to it,
from a stored body (inline or spooled) to the bytes of one transaction.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Mapping

from relaywatch.mime import Scan, downgrade, needs_change
from relaywatch.model import StoredBody

log = logging.getLogger(__name__)

_READ_CHUNK = 1024 * 1024


def _spooled_for_destination(path: str, eight_bit_ok: bool) -> bytes | None:
    scan = Scan(eight_bit_ok=eight_bit_ok)
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            scan.feed(chunk)
            if scan.needed:
                break
        if not scan.needed:
            return None
        f.seek(0)
        return downgrade(f.read(), eight_bit_ok=eight_bit_ok)


async def body_for_destination(body: StoredBody, capabilities: Mapping[str, str]) -> StoredBody:
    """``body`` as the destination with these EHLO ``capabilities`` accepts it.

    The same object when nothing changes (the common case costs a few µs for
    an inline body).  A spooled body is scanned in chunks in a thread; when it
    must change, the changed copy is held in memory for this transaction (the
    store's copy is never altered).  A bug in the conversion must not stop
    delivery: then the message goes as it is, as before, and the log says so."""
    eight_bit_ok = "8BITMIME" in capabilities
    try:
        if body.data is not None:
            if not needs_change(body.data, eight_bit_ok=eight_bit_ok):
                return body
            data = await asyncio.to_thread(downgrade, body.data, eight_bit_ok=eight_bit_ok)
        else:
            data = await asyncio.to_thread(_spooled_for_destination, body.path, eight_bit_ok)
            if data is None:
                return body
    except OSError:
        raise
    except Exception:
        log.exception("could not convert a message for a destination without 8BITMIME or with "
                      "line limits; sending it unchanged")
        return body
    return StoredBody(size=len(data), data=data)
