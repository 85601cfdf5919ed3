"""A small HTTP/1.1 server: h11 (sans-I/O) driven by asyncio streams.

Why our own and not an ASGI framework under uvicorn: the console runs inside
the receiving process, beside the SMTP server, and must not cost it a core or
its start-up time.  h11 parses and frames; this module only reads, writes and
enforces limits (a head of 16 KiB, a body of ``max_body`` — 413 past it —,
a deadline for each request, a cap on connections).  It knows no routes:
``handler(Request) -> Response`` is given by console/server.py.  It runs on
asyncio's loop and on uvloop alike (plain ``start_server`` streams).

Every response carries the strict security headers (SECURITY_HEADERS): the
console's pages later, and the API now, are never cached, framed or sniffed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Awaitable, Callable

import h11

log = logging.getLogger("relaywatch.console")

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
MAX_CONNECTIONS = 64
REQUEST_DEADLINE = 30.0      # seconds from a request's first byte to its end (slow clients)
IDLE_TIMEOUT = 60.0          # a kept-alive connection with no request is closed
READ_SIZE = 64 * 1024

SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


@dataclass(frozen=True)
class Request:
    method: str
    path: str                          # percent-decoded, without the query
    query: dict[str, list[str]]
    headers: dict[str, str]            # lower-case names; repeated headers joined with ", "
    body: bytes
    peer: str                          # the client's IP address


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    # Server-sent events: the body comes from this, chunk by chunk, until it ends or the
    # client goes; then the connection closes.
    stream: Callable[[], AsyncIterator[bytes]] | None = None


_MARKUP = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"))


def json_response(status: int, data, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    # Text from remote servers (banners, replies, certificate names) is the
    # attacker's: <, > and & leave as JSON escapes (they only ever occur inside
    # strings), so no byte of a response reads as markup, whatever sniffs it.
    # str.replace, not str.translate: translate to several characters goes through a dict per
    # character once one matches, 21 ms for a queue page of 100 (83 KB) on this machine.
    text = json.dumps(data, separators=(",", ":"))
    for char, escaped in _MARKUP:
        text = text.replace(char, escaped)
    return Response(status, text.encode(), headers=headers)


def error_response(status: int, message: str, field_name: str | None = None) -> Response:
    body = {"error": message}
    if field_name is not None:
        body["field"] = field_name
    return json_response(status, body)


Handler = Callable[[Request], Awaitable[Response]]


class _BodyTooLarge(Exception):
    pass


class HttpServer:
    def __init__(self, handler: Handler, *, ssl_context: ssl.SSLContext | None = None, max_body: int = MAX_BODY,
                 max_connections: int = MAX_CONNECTIONS):
        self.handler = handler
        self.ssl_context = ssl_context
        self.max_body = max_body
        self.max_connections = max_connections
        self.server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._accept, host, port, ssl=self.ssl_context,
                                                 reuse_address=True, limit=READ_SIZE)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self.server.wait_closed()
        self.server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._connections) >= self.max_connections:
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            await _discard(reader, limit=MAX_HEAD, timeout=0.5)   # so the client reads the 503, not a reset
            await _close(writer)
            return
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError):
            pass   # the client went away or was too slow: nothing to answer
        except asyncio.CancelledError:
            # stop(): end quietly.  (A cancelled connection task would make
            # asyncio's streams log a traceback for it: Python 3.11.)
            pass
        except Exception:   # never let a connection's failure reach the loop's handler
            log.exception("console connection failed")
        finally:
            self._connections.discard(task)
            await _close(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = (writer.get_extra_info("peername") or ("?",))[0]
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            try:
                # A head must come within IDLE_TIMEOUT (a kept-alive connection may idle
                # that long), its body within REQUEST_DEADLINE.
                event = await asyncio.wait_for(_next_event(conn, reader), IDLE_TIMEOUT)
                if not isinstance(event, h11.Request):
                    return   # ConnectionClosed (or a client that sent nothing)
                if _head_size(event) > MAX_HEAD:
                    # h11 bounds a head that arrives in pieces; one that came whole is measured here.
                    await _send(conn, writer, error_response(431, f"the request head is larger than {MAX_HEAD} bytes"))
                    return
                async with asyncio.timeout(REQUEST_DEADLINE):
                    body = await self._read_body(conn, reader, writer, event)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _send(conn, writer, error_response(exc.error_status_hint, "bad request"))
                return
            except _BodyTooLarge:
                await _send(conn, writer, error_response(413, f"the request body is larger than {self.max_body} bytes"))
                await _discard(reader)
                return
            request = _request(event, body, peer)
            started = time.perf_counter()
            try:
                response = await self.handler(request)
            except Exception:
                log.exception("console request %s %s failed", request.method, request.path)
                response = error_response(500, "internal error (the relay's log has the details)")
            # The handler's time, for the bench and the browser's devtools (bench/console_1m.py).
            server_timing = ("Server-Timing", f"app;dur={(time.perf_counter() - started) * 1000:.1f}")
            response = replace(response, headers=(*response.headers, server_timing))
            if response.stream is not None and request.method != "HEAD":
                await _send_stream(conn, writer, response)
                return
            await _send(conn, writer, response, head=request.method == "HEAD")
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read_body(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         request: h11.Request) -> bytes:
        for name, value in request.headers:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                raise _BodyTooLarge   # refused before a byte of it is read
        if conn.they_are_waiting_for_100_continue:   # curl asks before a body over 1 KiB
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            await writer.drain()
        chunks, size = [], 0
        while True:
            event = await _next_event(conn, reader)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body:
                    raise _BodyTooLarge
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise h11.RemoteProtocolError("the connection closed inside the request body")


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader):
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await reader.read(READ_SIZE)
        conn.receive_data(data)   # b"" is the end of the stream


def _head_size(event: h11.Request) -> int:
    return len(event.target) + sum(len(name) + len(value) + 4 for name, value in event.headers)


def _request(event: h11.Request, body: bytes, peer: str) -> Request:
    target = urllib.parse.urlsplit(event.target.decode("ascii", "replace"))
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Request(method=event.method.decode("ascii"), path=urllib.parse.unquote(target.path),
                   query=urllib.parse.parse_qs(target.query, keep_blank_values=True), headers=headers,
                   body=body, peer=peer)


async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, response: Response, head: bool = False) -> None:
    headers = [*SECURITY_HEADERS, *response.headers, ("Content-Length", str(len(response.body)))]
    if response.content_type:
        headers.append(("Content-Type", response.content_type))
    if conn.their_state is not h11.DONE:
        headers.append(("Connection", "close"))   # the rest of the request is not read
    out = conn.send(h11.Response(status_code=response.status, headers=headers))
    out += conn.send(h11.Data(data=response.body)) if response.body and not head else b""
    out += conn.send(h11.EndOfMessage())
    writer.write(out)
    await writer.drain()


async def _send_stream(conn: h11.Connection, writer: asyncio.StreamWriter, response: Response) -> None:
    """The head without a length (h11 frames the body chunked), then each chunk as it comes."""
    headers = [*SECURITY_HEADERS, *response.headers, ("Content-Type", response.content_type or "text/event-stream"),
               ("Connection", "close")]
    writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)))
    await writer.drain()
    async with contextlib.aclosing(response.stream()) as chunks:   # closed when the client goes, too
        async for chunk in chunks:
            if writer.is_closing():      # the client went (uvloop raises on a write then)
                return
            writer.write(conn.send(h11.Data(data=chunk)))
            await writer.drain()
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()


async def _discard(reader: asyncio.StreamReader, limit: int = 1024 * 1024, timeout: float = 2.0) -> None:
    """Read (and drop) what the client is still sending before closing: closing
    with unread bytes makes the kernel send a reset, and the client would see
    that instead of the 413 it was sent."""
    try:
        async with asyncio.timeout(timeout):
            while limit > 0:
                data = await reader.read(READ_SIZE)
                if not data:
                    return
                limit -= len(data)
    except (TimeoutError, ConnectionError, ssl.SSLError):
        pass


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5)
    except (ConnectionError, ssl.SSLError, TimeoutError, OSError):
        pass
