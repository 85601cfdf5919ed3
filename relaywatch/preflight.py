"""What ``serve`` needs from this machine, checked before anything listens.

A config file can be valid and still not start: ``server.data_dir`` may be a
file or on a read-only file system, a ``server.listen`` address may be taken
by another program or not be one of this machine's.  ``serve`` runs these
checks before it opens the queue, starts the delivery process or listens, and
stops with one line per problem naming the key.  ``config check`` runs them
too; there a port held by the running relaywatch itself is no problem (see
``listen_problems``).  The checks only look: nothing is created or kept open.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
from pathlib import Path

from relaywatch.config import Config, format_hostport
from relaywatch.runtime import control


def start_problems(config: Config, *, serving: bool) -> list[str]:
    """Every reason ``serve`` would fail to start on this machine, one line each, naming the key.

    ``serving``: called by ``serve`` itself (a port in use is a problem even if a
    relaywatch holds it); otherwise by ``config check``."""
    running = control.running_server(config.server.data_dir)
    problems = data_dir_problems(config.server.data_dir) + listen_problems(
        config.server.listen, running=running, serving=serving)
    for key in ("submission_listen", "submissions_listen"):   # the AUTH ports
        problems += listen_problems(getattr(config.server, key), running=running, serving=serving,
                                    key=f"server.{key}")
    if config.http.listen is not None:   # the console's port ([http] listen)
        problems += listen_problems((config.http.listen,), running=running, serving=serving, key="http.listen")
    return problems


def data_dir_problems(data_dir: Path) -> list[str]:
    key = "server.data_dir"
    if data_dir.exists() and not data_dir.is_dir():
        return [f"{key}: {data_dir} is a file, not a directory"]
    existing = data_dir
    while not existing.exists():
        existing = existing.parent
    if existing != data_dir:
        if not existing.is_dir():
            return [f"{key}: {data_dir} cannot be created: {existing} is a file, not a directory"]
        if not _writable(existing):
            return [f"{key}: {data_dir} cannot be created: {existing} {_why_not_writable(existing)}"]
        return []
    if not _writable(data_dir):
        return [f"{key}: {data_dir} {_why_not_writable(data_dir)}"]
    out = []
    for name in ("spool", "queue.sqlite3", control.PID_FILE_NAME):
        path = data_dir / name
        if path.exists() and not _writable(path):
            out.append(f"{key}: {path} {_why_not_writable(path)}")
    return out


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0))


def _why_not_writable(path: Path) -> str:
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        return "is on a read-only file system"
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = f"uid {os.geteuid()}"
    return f"is not writable by {user} (serve must run as a user that may write there)"


def listen_problems(listen, *, running: int | None = None, serving: bool = True,
                    key: str = "server.listen") -> list[str]:
    """Bind (and close again) every address ``serve`` would listen on, as the event loop will.

    All sockets stay bound until every address has been tried, so two entries
    that collide are seen as well.  A bound socket that does not listen
    accepts no connection.  With ``serving`` false (``config check``) a port in
    use by the running relaywatch (``running``) is its own and no problem."""
    held: list[socket.socket] = []
    out = []
    try:
        for host, port in listen:
            where = format_hostport(host, port)
            problem = _bind(host, port, held)
            if problem is None:
                continue
            if problem is IN_USE:
                if running is None:
                    problem = "is already in use by another program"
                elif serving:
                    problem = f"is already in use by the running relaywatch (pid {running}); stop it first"
                else:
                    continue
            out.append(f"{key}: {where} {problem}")
    finally:
        for sock in held:
            sock.close()
    return out


IN_USE = "is in use"


def _bind(host: str, port: int, held: list[socket.socket]) -> str | None:
    """None if ``host:port`` can be bound, else why not: IN_USE or a phrase."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"does not resolve to an address ({exc.strerror})"
    bound = 0
    for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
        sock = socket.socket(family, kind, proto)
        held.append(sock)
        # As asyncio's and uvloop's create_server(reuse_address=True) do.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                continue   # one family of a name may be missing (asyncio skips it too)
            if exc.errno == errno.EADDRINUSE:
                return IN_USE
            if exc.errno == errno.EACCES:
                return "cannot be used: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            return f"cannot be used: {exc.strerror}"
        bound += 1
    if not bound:
        return "is not an address of this machine"
    return None
