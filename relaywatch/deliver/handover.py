"""What this process is handing to destinations and has not recorded yet, journaled so
that its next start can say which queue entries may be delivered twice.

A node killed between a destination's ``250`` to DATA and the commit of that
outcome leaves the entry leased but delivered; the cluster's leader (or the
node's own next start) returns the lease and the entry is delivered again: the
one duplicate relaywatch allows (README, *Several nodes*).  Only the dead
process knew which of its leases were that far, so it keeps a journal,
``data_dir/handover.log``: a line ``+ID`` when a session starts on the entry,
``-ID`` once its outcome is committed (or nothing was sent).  The next start of
the node, before it leases anything, reads it: every ID started and not ended
may have reached the destination, and is logged as a possible duplicate (a
warning naming the queue id and the node) and counted (the
``possible_duplicate`` event, ``relaywatch_possible_duplicates_total``).

Why a local file and not the lease row: marking the row would be one more
store write (a statement, a WAL record, a dead row version) per message on the
hot path, and it would have to commit before the final dot to be of use.  The
journal costs one ``write(2)`` of a few dozen bytes per delivery (an end goes with
the next start), with no fsync: it survives the process (kill -9, a crash, the OOM killer), not the
machine; a host that crashes may lose its last lines, and a node that never
starts again logs nothing (the leader's "returned N message(s) leased by dead
nodes" line is then all there is).  "Started" is counted from the session's
first step, so the set is a superset of what was past DATA, bounded by the
node's sessions (``delivery.concurrency``).  The file is emptied whenever
nothing is in flight and it has grown past ``COMPACT_AT``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from relaywatch import events

log = logging.getLogger("relaywatch.scheduler")

JOURNAL_NAME = "handover.log"
COMPACT_AT = 1 << 20


def unfinished(text: str) -> list[str]:
    """The IDs a journal started and did not end, in the order they started (pure).
    A torn last line (the process died mid-write) is ignored."""
    open_ids: dict[str, None] = {}
    for line in text.split("\n")[:-1]:          # only lines the write completed
        mark, entry_id = line[:1], line[1:]
        if not entry_id:
            continue
        if mark == "+":
            open_ids[entry_id] = None
        elif mark == "-":
            open_ids.pop(entry_id, None)
    return list(open_ids)


class HandoverJournal:
    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._open: set[str] = set()
        self._ends: list[str] = []          # "-ID" lines not written yet
        self._size = 0

    def report_previous(self, node_name: str) -> list[str]:
        """At start, before leasing: log (and count) what the previous start of this
        node may have delivered without recording it; then begin a fresh journal."""
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        found = unfinished(text)
        for entry_id in found:
            log.warning("possible duplicate: message %s was being handed to its destination by node %s when "
                        "that node's previous run ended without recording the outcome; the copy delivered "
                        "again may be a second one", entry_id, node_name)
            events.emit("possible_duplicate", id=entry_id, node=node_name)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        except OSError as exc:   # serve checked data_dir; this is a disk gone bad, not a reason to stop
            log.warning("cannot open %s (%s): possible duplicates of a crash are not logged", self.path, exc)
        return found

    def started(self, entry_id: str) -> None:
        """Before the session's first step: this line must reach the kernel before the
        destination can have the message.  The ends noted since go in the same write."""
        if self._fd is None:
            return
        if not self._open and self._size > COMPACT_AT:
            os.ftruncate(self._fd, 0)        # nothing in flight: nothing the journal must keep
            self._size, self._ends = 0, []
        self._open.add(entry_id)
        self._ends.append(f"+{entry_id}\n")
        self._write("".join(self._ends))
        self._ends = []

    def ended(self, entry_id: str) -> None:
        """Recorded (or nothing was sent).  Written with the next start: an end lost with
        the process only makes its entry a possible duplicate that was not one."""
        if self._fd is None or entry_id not in self._open:
            return
        self._open.discard(entry_id)
        self._ends.append(f"-{entry_id}\n")

    def _write(self, line: str) -> None:
        data = line.encode()
        try:
            os.write(self._fd, data)
            self._size += len(data)
        except OSError as exc:   # a full disk: the mail goes on; only this bookkeeping is lost
            log.warning("cannot write %s (%s): possible duplicates of a crash are not logged", self.path, exc)

    def close(self) -> None:
        """A clean stop: what is still open (a delivery cancelled mid-session) stays for
        the next start to report; with nothing open the journal goes."""
        if self._fd is not None:
            if self._ends and self._open:
                self._write("".join(self._ends))
            os.close(self._fd)
            self._fd = None
            if not self._open:
                self.path.unlink(missing_ok=True)
