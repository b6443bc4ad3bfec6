"""A small fault-injecting HTTP reverse proxy for storage tests and the streaming benchmark.

It sits on 127.0.0.1 between the Cloud Storage client and the local storage emulator and makes the
emulator look like a distant, flaky service: every request waits ``latency_s`` before it is
forwarded, and a configurable share of requests is answered with ``503 Service Unavailable``, has
its connection dropped before any response, or gets a response whose body is cut off half-way
(connection closed after the headers and part of the body). Together these cover the transient
failures the data loader must survive (429/5xx, dropped connections, interrupted transfers).

The proxy is deliberately bounded: it serves at most ``max_requests`` requests (later ones are
answered with 503 and counted in ``over_budget``) and only ever connects to the upstream given at
construction, which must be a loopback address.
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import threading
from typing import Optional

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
               "trailer", "upgrade", "content-length"}
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_COUNTER = {"503": "errors_503", "drop": "drops", "truncate": "truncations"}
_LIST_OBJECTS = re.compile(r"^/storage/v1/b/[^/?]+/o(\?|$)")


class FaultProxy:
    """Localhost reverse proxy (an asyncio server on its own thread) that adds latency and
    injects faults. It speaks keep-alive HTTP/1.1 to clients and forwards each request upstream
    on a fresh connection.

    Args:
        upstream_host, upstream_port: the real server (must be loopback).
        latency_s: delay added to every request before it is forwarded.
        error_rate: share of requests answered with 503 without reaching the upstream.
        drop_rate: share of requests whose connection is closed before any response.
        truncate_rate: share of requests whose response body is cut off half-way.
        seed: seed of the fault lottery (one shared ``random.Random``; thread scheduling still
            decides which request draws which number).
        max_requests: hard bound on the number of requests served.
        upstream_concurrency: at most this many requests are forwarded at once (the emulator is a
            single-threaded server with a short listen backlog).
        list_page_size: if set, object-listing responses are split into pages of this many items
            linked by ``nextPageToken``, as real Cloud Storage does (the emulator returns one page).

    Counters (zeroed by :meth:`reset_counters`): ``requests``, ``errors_503``, ``drops``,
    ``truncations``, ``over_budget``, ``list_pages``, ``paths`` (requests per URL path) and
    ``max_in_flight``, the most media downloads (``/download/...``) waiting at once.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, latency_s: float = 0.0,
                 error_rate: float = 0.0, drop_rate: float = 0.0, truncate_rate: float = 0.0,
                 seed: int = 0, max_requests: int = 50_000, upstream_concurrency: int = 4,
                 list_page_size: Optional[int] = None):
        if upstream_host not in _LOOPBACK:
            raise ValueError(f"upstream_host must be a loopback address, got {upstream_host!r}")
        self.upstream = (upstream_host, upstream_port)
        self.max_requests = max_requests
        self.list_page_size = list_page_size
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._upstream_concurrency = upstream_concurrency
        self.set_faults(latency_s=latency_s, error_rate=error_rate, drop_rate=drop_rate,
                        truncate_rate=truncate_rate)
        self.reset_counters()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._port: Optional[int] = None

    # ----------------------------------------------------------------------------------- config
    def set_faults(self, *, latency_s: float = 0.0, error_rate: float = 0.0,
                   drop_rate: float = 0.0, truncate_rate: float = 0.0) -> None:
        """Change latency and fault rates (takes effect for the next request)."""
        if min(latency_s, error_rate, drop_rate, truncate_rate) < 0 or \
                error_rate + drop_rate + truncate_rate > 1:
            raise ValueError("latency and rates must be >= 0 and the rates must sum to <= 1")
        self.latency_s, self.error_rate = latency_s, error_rate
        self.drop_rate, self.truncate_rate = drop_rate, truncate_rate

    def reset_counters(self) -> None:
        """Zero the request and fault counters."""
        with self._lock:
            self.requests = self.errors_503 = self.drops = self.truncations = 0
            self.over_budget = self.in_flight = self.max_in_flight = self.list_pages = 0
            self.paths: dict[str, int] = {}

    # -------------------------------------------------------------------------------- lifecycle
    def start(self) -> "FaultProxy":
        ready = threading.Event()

        async def serve():
            self._upstream_slots = asyncio.Semaphore(self._upstream_concurrency)
            self._stopped = asyncio.Event()
            server = await asyncio.start_server(self._serve_client, "127.0.0.1", 0, backlog=256)
            self._port = server.sockets[0].getsockname()[1]
            ready.set()
            async with server:
                await self._stopped.wait()
            for task in list(self._clients):  # end open keep-alive connections too
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)

        def run():
            try:
                self._loop.run_until_complete(serve())
            finally:
                self._loop.close()

        self._clients: set = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=run, daemon=True, name="fault-proxy")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._port is not None, "proxy not started"
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --------------------------------------------------------------------------------- serving
    def _draw(self, path: str, download: bool) -> str:
        """Count the request and decide its fate."""
        with self._lock:
            self.requests += 1
            if download:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            key = path.split("?", 1)[0]
            self.paths[key] = self.paths.get(key, 0) + 1
            if self.requests > self.max_requests:
                self.over_budget += 1
                return "503"
            r = self._rng.random()
            for fate, rate in (("503", self.error_rate), ("drop", self.drop_rate),
                               ("truncate", self.truncate_rate)):
                if r < rate:
                    setattr(self, _COUNTER[fate], getattr(self, _COUNTER[fate]) + 1)
                    return fate
                r -= rate
            return "ok"

    async def _serve_client(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        """Serve one keep-alive client connection, request after request."""
        # Without TCP_NODELAY, Nagle's algorithm and delayed ACKs add ~40 ms per response.
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._clients.add(asyncio.current_task())
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
                headers = _parse_headers(head)
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if not await self._respond(method, path, head, body, writer):
                    return
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(asyncio.current_task())
            writer.close()

    async def _respond(self, method: str, path: str, head: bytes, body: bytes,
                       writer: asyncio.StreamWriter) -> bool:
        """Answer one request (or fail it); returns whether the connection stays open."""
        download = path.startswith("/download/")  # media GETs: counted in in_flight
        fate = self._draw(path, download)
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            if fate == "503":
                status, headers = "503 Service Unavailable", [("Content-Type", "application/json")]
                payload = b'{"error": {"code": 503, "message": "injected fault"}}'
            elif fate != "drop":
                status, headers, payload = await self._forward(method, path, head, body)
                if self.list_page_size and method == "GET" and status.startswith("200") and \
                        _LIST_OBJECTS.match(path):
                    payload = self._paginate(path, payload)
        finally:
            if download:  # leave before answering, so a client's next request can't overlap
                with self._lock:
                    self.in_flight -= 1
        if fate == "drop":
            return False
        lines = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers
                                           if k.lower() not in _HOP_BY_HOP]
        lines.append(f"Content-Length: {len(payload)}")
        response_head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if method == "HEAD":
            payload = b""
        if fate == "truncate" and len(payload) > 1:
            writer.write(response_head + payload[: len(payload) // 2])
            await writer.drain()
            return False
        writer.write(response_head + payload)
        await writer.drain()
        return True

    def _paginate(self, path: str, payload: bytes) -> bytes:
        """Cut a full object listing down to the page that ``pageToken`` (an offset) selects."""
        from urllib.parse import parse_qs, urlsplit

        listing = json.loads(payload)
        offset = int(parse_qs(urlsplit(path).query).get("pageToken", ["0"])[0])
        items = listing.get("items", [])
        end = offset + self.list_page_size
        listing["items"] = items[offset:end]
        listing.pop("nextPageToken", None)
        if end < len(items):
            listing["nextPageToken"] = str(end)
        with self._lock:
            self.list_pages += 1
        return json.dumps(listing).encode()

    async def _forward(self, method: str, path: str, head: bytes, body: bytes):
        """Send the request upstream on a fresh connection; return (status, headers, body)."""
        headers = [(k, v) for k, v in _parse_headers(head, keep_case=True).items()
                   if k.lower() not in _HOP_BY_HOP and k.lower() != "host"]
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.upstream[0]}:{self.upstream[1]}",
                 "Connection: close", f"Content-Length: {len(body)}"]
        request = ("\r\n".join(lines + [f"{k}: {v}" for k, v in headers]) + "\r\n\r\n")
        async with self._upstream_slots:
            reader, writer = await asyncio.open_connection(*self.upstream)
            try:
                writer.write(request.encode("latin-1") + body)
                response = await reader.read()  # the upstream closes after one response
            finally:
                writer.close()
        response_head, _, payload = response.partition(b"\r\n\r\n")
        status = response_head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 1)[1]
        return status, list(_parse_headers(response_head + b"\r\n", keep_case=True).items()), \
            payload


def _parse_headers(head: bytes, keep_case: bool = False) -> dict:
    """Header fields of an HTTP message head (request/status line skipped)."""
    fields = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip() if keep_case else name.strip().lower()] = value.strip()
    return fields


def main(argv=None) -> None:
    """Run the proxy as its own process: ``python fault_proxy.py UPSTREAM_PORT [--latency S] ...``.

    Prints ``PORT <n>`` once listening, then serves until stdin closes or the process is killed.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("upstream_port", type=int)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--drop-rate", type=float, default=0.0)
    parser.add_argument("--truncate-rate", type=float, default=0.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    args = parser.parse_args(argv)
    proxy = FaultProxy("127.0.0.1", args.upstream_port, latency_s=args.latency,
                       error_rate=args.error_rate, drop_rate=args.drop_rate,
                       truncate_rate=args.truncate_rate, max_requests=args.max_requests).start()
    print(f"PORT {proxy.port}", flush=True)
    try:
        sys.stdin.read()  # returns when the parent closes our stdin (or exits)
    finally:
        print(f"REQUESTS {proxy.requests}", flush=True)
        proxy.stop()


if __name__ == "__main__":
    main()
