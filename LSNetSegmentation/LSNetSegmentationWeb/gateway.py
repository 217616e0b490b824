"""Per-user sessions for ``lsnet web``: one app process per browser session, behind one port.

trame shares its state between every browser connected to one server process, so one process can only
ever be one scene.  The gateway is what the user's browser talks to (``--host``/``--port``); it gives
each new browser a session cookie (``lsnet_session``: random, HttpOnly, SameSite=Strict) and starts an
app process of its own for it (``lsnet web --single-session`` on a free port of 127.0.0.1, with its
own scene, working folder and uploads).  Every request and WebSocket message of that browser is
relayed to its process, and to no other: a request without a known cookie gets a new session (the page)
or 403 (anything else), so one user cannot reach another's scene through the gateway.

Limits: ``max_sessions`` processes at a time (a new browser beyond that gets a 503 page saying so); a
session whose page has been closed for ``idle_timeout_s`` is ended (its process stopped, its working
folder removed by the process).  Stopping the gateway stops every session process; a session process
also exits by itself when the gateway dies (``--exit-with-parent``).

Plain aiohttp (trame's own web server library); no Slicer, no torch here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, WSMsgType, web

LOG = logging.getLogger("LSNetSegmentationWeb.gateway")  # not under "lsnet": the CLI quiets the engine logger

COOKIE = "lsnet_session"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
"""Headers that belong to one connection (RFC 9110 section 7.6.1) or that the relay recomputes; bodies are
relayed as they are (compressed ones stay compressed, with their Content-Encoding)."""
PAGE_PATHS = ("/", "/index.html")
"""Requests that may open a new session: the page itself (assets and the WebSocket need a session)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Session:
    token: str
    port: int
    process: subprocess.Popen
    last_seen: float = field(default_factory=time.monotonic)
    sockets: int = 0  # open WebSocket relays (an open page holds one)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


def _message_page(status: int, title: str, text: str) -> web.Response:
    body = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<link rel='icon' href='data:,'></head><body style='font-family:sans-serif;margin:3em'>"
            f"<h2>{title}</h2><p>{text}</p></body></html>")
    return web.Response(status=status, text=body, content_type="text/html")


class Gateway:
    """Starts, relays to and ends the session processes.

    Args:
        child_command: ``port -> argv`` of one session process (it must serve the page on 127.0.0.1:port).
        max_sessions: processes at most at a time.
        idle_timeout_s: a session with no open page for this long is ended.
        start_timeout_s: how long a session process may take to accept connections.
        log_dir: one log file per session process.
    """

    def __init__(self, child_command: Callable[[int], list], *, max_sessions: int = 4, idle_timeout_s: float = 1800.0,
                 start_timeout_s: float = 120.0, log_dir: Path, env: Optional[dict] = None):
        if max_sessions < 1:
            raise ValueError("--max-sessions must be at least 1")
        self.child_command = child_command
        self.max_sessions = int(max_sessions)
        self.idle_timeout_s = float(idle_timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.log_dir = Path(log_dir)
        self.env = env
        self.sessions: dict[str, Session] = {}
        self._starting = 0
        self._lock = asyncio.Lock()
        self._client: Optional[ClientSession] = None
        self._reaper: Optional[asyncio.Task] = None

    # --- life cycle -----------------------------------------------------------------------------------
    def application(self) -> web.Application:
        app = web.Application(client_max_size=0)  # the session process enforces the upload limit
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _app) -> None:
        # no pooled keep-alive connections: a new session process may get the port of one that died, and a
        # pooled connection to the dead one would then fail the new session's first request
        self._client = ClientSession(connector=TCPConnector(force_close=True), auto_decompress=False,
                                     timeout=ClientTimeout(total=None, sock_connect=10))
        self._reaper = asyncio.create_task(self._reap_forever())

    async def _on_cleanup(self, _app) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for token in list(self.sessions):
            self.end(token, "gateway stopped", wait=True)
        if self._client is not None:
            await self._client.close()

    def end(self, token: str, why: str, wait: bool = False) -> None:
        """Forget a session and stop its process (in a worker thread unless ``wait``: the relay goes on)."""
        session = self.sessions.pop(token, None)
        if session is None:
            return
        LOG.info("session %s… ended (%s): pid %d port %d", token[:6], why, session.process.pid, session.port)
        if wait:
            stop_process(session.process)
        else:
            asyncio.get_running_loop().run_in_executor(None, stop_process, session.process)

    async def _reap_forever(self) -> None:
        period = max(0.5, min(30.0, self.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            self.reap()

    def reap(self, now: Optional[float] = None) -> None:
        """End sessions whose process died or whose page has been closed for ``idle_timeout_s``."""
        now = time.monotonic() if now is None else now
        for token, s in list(self.sessions.items()):
            if not s.alive:
                self.end(token, f"process exited with {s.process.returncode}")
            elif s.sockets == 0 and now - s.last_seen > self.idle_timeout_s:
                self.end(token, f"no open page for {self.idle_timeout_s:.0f} s")

    # --- sessions -------------------------------------------------------------------------------------
    async def _new_session(self) -> Session:
        async with self._lock:
            self.reap()
            if len(self.sessions) + self._starting >= self.max_sessions:
                raise SessionsFull()
            self._starting += 1
        try:
            token = secrets.token_urlsafe(24)
            port = free_port()
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"session-{token[:8]}.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(self.child_command(port), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True)
            session = Session(token, port, proc)
            LOG.info("session %s… started: pid %d port %d", token[:6], proc.pid, port)
            deadline = time.monotonic() + self.start_timeout_s
            while not await _accepts(port):
                if not session.alive or time.monotonic() > deadline:
                    stop_process(proc)
                    tail = log_path.read_text(errors="replace")[-1500:]
                    LOG.error("session process did not start: %s", tail)
                    raise SessionFailed(tail.strip().splitlines()[-1] if tail.strip() else "no output")
                await asyncio.sleep(0.2)
            self.sessions[token] = session
            return session
        finally:
            self._starting -= 1

    async def handle(self, request: web.Request) -> web.StreamResponse:
        token = request.cookies.get(COOKIE, "")
        session = self.sessions.get(token)
        if session is not None and not session.alive:
            self.end(token, f"process exited with {session.process.returncode}")
            session = None
        fresh = False
        if session is None:
            if request.method != "GET" or request.path not in PAGE_PATHS or _is_websocket(request):
                return _message_page(403, "No session", "This request has no LSNet session. Open the page (/) again "
                                     "to start one.")
            try:
                session = await self._new_session()
            except SessionsFull:
                return _message_page(503, "All sessions are in use",
                                     f"This LSNet server runs at most {self.max_sessions} sessions at a time and all are "
                                     "in use. Try again later, or ask whoever runs it to raise --max-sessions.")
            except SessionFailed as exc:
                return _message_page(500, "The session could not start", f"{exc} (the server log has the details).")
            fresh = True
        session.last_seen = time.monotonic()
        if _is_websocket(request):
            return await self._relay_websocket(request, session)
        try:
            response = await self._relay_http(request, session)
        except ClientError as exc:
            died = await _exited(session.process, 2.0)
            self.end(session.token, f"its process does not answer ({type(exc).__name__})")
            if died and not fresh and request.method == "GET" and request.path in PAGE_PATHS:
                return await self.handle(request)  # a page load: once more, with a new session
            return _message_page(502, "The session ended", "Its process stopped answering. Reload the page to start a "
                                 "new session (what was open in the old one is gone).")
        if fresh:
            response.set_cookie(COOKIE, session.token, httponly=True, samesite="Strict", path="/")
        return response

    # --- relays ---------------------------------------------------------------------------------------
    async def _relay_http(self, request: web.Request, session: Session) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "cookie"}
        url = f"http://127.0.0.1:{session.port}{request.rel_url}"
        body = await request.read() if request.can_read_body else None
        async with self._client.request(request.method, url, headers=headers, data=body, allow_redirects=False) as r:
            payload = await r.read()
            out = {k: v for k, v in r.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "set-cookie"}
            return web.Response(status=r.status, body=payload, headers=out)

    async def _relay_websocket(self, request: web.Request, session: Session) -> web.WebSocketResponse:
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        browser = web.WebSocketResponse(protocols=protocols, max_msg_size=0, autoping=True)
        await browser.prepare(request)
        session.sockets += 1
        try:
            async with self._client.ws_connect(f"ws://127.0.0.1:{session.port}{request.rel_url}", protocols=protocols,
                                               max_msg_size=0) as app_side:
                await _pump_both(browser, app_side, session)
        except (OSError, ClientError) as exc:
            LOG.warning("session %s…: WebSocket to its process failed (%s)", session.token[:6], exc)
        finally:
            session.sockets -= 1
            session.last_seen = time.monotonic()
            await browser.close()
        return browser


class SessionsFull(Exception):
    pass


class SessionFailed(Exception):
    pass


async def _exited(process: subprocess.Popen, within_s: float) -> bool:
    """Whether ``process`` has exited, or does so within ``within_s`` (a process killed a moment ago)."""
    deadline = time.monotonic() + within_s
    while process.poll() is None:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _is_websocket(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


async def _accepts(port: int) -> bool:
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout=0.5)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _pump_both(browser, app_side, session: Session) -> None:
    async def pump(src, dst):
        async for msg in src:
            session.last_seen = time.monotonic()
            if msg.type == WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            else:  # CLOSE / ERROR: end both directions
                break

    tasks = [asyncio.create_task(pump(browser, app_side)), asyncio.create_task(pump(app_side, browser))]
    _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await app_side.close()


def stop_process(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process group of a session, SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def child_command(data_root, upload_limit_mb: int, device: str) -> Callable[[int], list]:
    """``port -> argv`` of one session process: ``lsnet web --single-session`` on 127.0.0.1."""
    parent = str(os.getpid())

    def command(port: int) -> list:
        return [sys.executable, "-m", "lsnet.app.cli", "web", "--single-session", "--host", "127.0.0.1",
                "--port", str(port), "--data-root", str(data_root), "--upload-limit-mb", str(upload_limit_mb),
                "--device", device, "--exit-with-parent", parent]

    return command


def warn_if_exposed(host: str, port: int) -> None:
    """The no-authentication warning, printed when ``--host`` is not a loopback address."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lsnet web: WARNING: listening on {host}: there is no authentication; anyone who can reach "
              f"port {port} can open files under the data root and run the model. Put it behind an SSH tunnel "
              "or a reverse proxy with authentication (docs/web.md).", file=sys.stderr)


def serve_sessions(data_root, host: str, port: int, upload_limit_mb: int, device: str = "cpu", max_sessions: int = 4,
                   idle_timeout_s: float = 1800.0) -> int:
    """``lsnet web``: the gateway, until SIGINT/SIGTERM; every session process is stopped on the way out."""
    from .paths import DataRoot

    root = DataRoot(data_root).root  # a bad --data-root fails here, before any session starts
    warn_if_exposed(host, port)
    logging.basicConfig(level=logging.INFO, format="lsnet web: %(message)s", stream=sys.stderr)
    log_dir = Path(tempfile.mkdtemp(prefix="lsnet-web-logs-"))
    gateway = Gateway(child_command(root, upload_limit_mb, device), max_sessions=max_sessions,
                      idle_timeout_s=idle_timeout_s, log_dir=log_dir)
    print(f"lsnet web: data root {root}; up to {max_sessions} sessions (one process each); session logs in "
          f"{log_dir}; open http://{host}:{port}/ in a browser", file=sys.stderr, flush=True)
    web.run_app(gateway.application(), host=host, port=port, print=None, handle_signals=True, shutdown_timeout=5.0)
    return 0
