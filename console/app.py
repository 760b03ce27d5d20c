"""The console's web application (Starlette): pages, login, CSRF, roles, and the limits on every request.

Security model, briefly: a signed, HttpOnly, SameSite=Strict session cookie names a server-side session
(console/sessions.py); every POST carries the session's CSRF token; roles come from the users file at each
request; request bodies are capped ([console] max_body_bytes); pages send a strict Content-Security-Policy
(own scripts and styles only), and Jinja2 escapes everything it renders. The operator recorded with a
confirmation and the author of an activation are the logged-in user.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import redis
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from console.actions import Refused, confirm_frames
from console.data import ConsoleData, UnknownCamera
from console.sessions import LOGIN_COOKIE, SESSION_COOKIE, LoginLimiter, Session, SessionStore, same_token
from console.thumbs import ThumbnailError, Thumbnails
from console.users import ROLES, Role, User, Users
from daemon.config import Settings
from daemon.events import EventKind
from daemon.registry import UNPINNED, RegistryError

HERE = Path(__file__).parent
ADDRESS_FAILURES_FACTOR = 4  # a client address may fail this many times more than one user name (shared NAT)
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
THUMB_CACHE_CONTROL = "private, max-age=3600"
REDIS_DOWN = "Redis did not answer (unreachable or slower than [console] redis_timeout_s): the figures are not shown."


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _too_large(self.max_bytes)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _too_large(max_bytes: int) -> Response:
    return PlainTextResponse(f"request body larger than {max_bytes} bytes: refused", status_code=413)


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in SECURITY_HEADERS if h[0] not in names)]
            await send(message)

        await self.app(scope, receive, with_headers)


def _ts(ms: int | None) -> str:
    if ms is None:
        return ""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Console:
    """The application's state: settings, Redis, users, sessions, caches."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.cfg = settings.console
        self.client = client or self.cfg.redis_client(settings.redis)
        self.data = ConsoleData(self.client, settings)
        self.users = Users(self.cfg.users_file)
        self.sessions = SessionStore(self.cfg.session_ttl_s)
        self.limiter = LoginLimiter(self.cfg.login_max_failures, self.cfg.login_window_s)
        self.address_limiter = LoginLimiter(
            self.cfg.login_max_failures * ADDRESS_FAILURES_FACTOR, self.cfg.login_window_s
        )
        self.thumbs = Thumbnails(
            self.client, self.data.keys, settings.limits, self.cfg.thumb_px, self.cfg.thumb_cache_items
        )
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True))
        self.env.filters.update(ts=_ts, num=_num, q=lambda s: quote(str(s), safe=""))
        self.env.globals.update(event_kinds=[k.value for k in EventKind], roles=ROLES)

    # -------------------------------------------------------------------------------------------- helpers

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        auth = self.auth(request)
        html = self.env.get_template(name).render(
            request=request,
            user=auth[1] if auth else None,
            csrf=auth[0].csrf if auth else "",
            poll_ms=int(self.cfg.poll_interval_s * 1000),
            **context,
        )
        return HTMLResponse(html, status_code=status)

    def auth(self, request: Request) -> tuple[Session, User] | None:
        """The live session of the request and its user (removed users have none)."""
        cached = getattr(request.state, "auth", False)
        if cached is not False:
            return cached
        session = self.sessions.lookup(request.cookies.get(SESSION_COOKIE))
        user = self.users.get(session.user) if session else None
        request.state.auth = (session, user) if session and user else None
        return request.state.auth

    def refuse(self, request: Request, status: int, message: str) -> HTMLResponse:
        return self.render(request, "error.html", status=status, message=message)

    async def form(self, request: Request) -> FormData:
        return await request.form(max_files=0, max_fields=self.cfg.max_confirm_frames + 8)


Handler = Callable[[Console, Request, Session, User], Awaitable[Response]]


def guarded(role: Role, post: bool = False) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """An endpoint for users with at least `role`. A page without a session sends to the login page; a POST
    (`post`) needs a live session and its CSRF token, checked before the role and before anything else."""

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            console: Console = request.app.state.console
            auth = console.auth(request)
            if auth is None and not post:
                return RedirectResponse("/login?" + urlencode({"next": request.url.path}), status_code=303)
            if auth is None:
                return console.refuse(request, 403, "no valid session (logged out or expired): log in again")
            if post:
                form = await console.form(request)
                if not same_token(auth[0].csrf, form.get("csrf")):  # type: ignore[arg-type]
                    return console.refuse(request, 403, "the form's CSRF token is missing or wrong: reload the page")
                request.state.form = form
            if not auth[1].may(role):
                return console.refuse(request, 403, f"this needs the {role} role")
            return await handler(console, request, *auth)

        return endpoint

    return wrap


def page(role: Role) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    return guarded(role)


def action(role: Role) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    return guarded(role, post=True)


# ------------------------------------------------------------------------------------------------ login


def _safe_next(target: str | None) -> str:
    return target if target and target.startswith("/") and not target.startswith("//") else "/line"


async def login_form(request: Request) -> Response:
    console: Console = request.app.state.console
    return _login_page(console, request, 200, "")


def _login_page(console: Console, request: Request, status: int, message: str) -> Response:
    token, cookie = console.sessions.login_token()
    response = console.render(
        request,
        "login.html",
        status=status,
        message=message,
        login_token=token,
        next=_safe_next(request.query_params.get("next")),
    )
    response.set_cookie(LOGIN_COOKIE, cookie, httponly=True, samesite="strict", secure=console.cfg.cookie_secure)
    return response


async def login(request: Request) -> Response:
    console: Console = request.app.state.console
    form = await console.form(request)
    if not console.sessions.check_login_token(request.cookies.get(LOGIN_COOKIE), form.get("csrf")):  # type: ignore[arg-type]
        return _login_page(console, request, 403, "The login form expired or was not sent from this page: try again.")
    name = str(form.get("username", ""))[:64]
    address = request.client.host if request.client else "?"
    keys = [f"user:{name}"]
    if console.limiter.blocked(keys) or console.address_limiter.blocked([address]):
        return _login_page(console, request, 429, "Too many failed logins: wait a few minutes and try again.")
    user = await run_in_threadpool(console.users.authenticate, name, str(form.get("password", "")))
    if user is None:
        console.limiter.failed(keys)
        console.address_limiter.failed([address])
        return _login_page(console, request, 401, "Wrong user name or password.")
    _, cookie = console.sessions.create(user.name)
    response = RedirectResponse(_safe_next(str(form.get("next", ""))), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=console.cfg.session_ttl_s,
        httponly=True,
        samesite="strict",
        secure=console.cfg.cookie_secure,
    )
    response.delete_cookie(LOGIN_COOKIE)
    return response


@action("viewer")
async def logout(console: Console, request: Request, session: Session, user: User) -> Response:
    console.sessions.revoke(session.sid)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


# ------------------------------------------------------------------------------------------------ pages


async def home(request: Request) -> Response:
    return RedirectResponse("/line", status_code=303)


@page("viewer")
async def line(console: Console, request: Request, session: Session, user: User) -> Response:
    tiles = await run_in_threadpool(console.data.line)
    return console.render(request, "line.html", tiles=tiles, flagged_window=console.cfg.flagged_window)


@page("viewer")
async def line_tiles(console: Console, request: Request, session: Session, user: User) -> Response:
    tiles = await run_in_threadpool(console.data.line)
    return console.render(request, "_tiles.html", tiles=tiles, flagged_window=console.cfg.flagged_window)


@page("viewer")
async def camera(console: Console, request: Request, session: Session, user: User) -> Response:
    name = request.path_params["camera"]
    try:
        view = await run_in_threadpool(console.data.camera, name)
    except UnknownCamera:
        return console.refuse(request, 404, f"no recent verdicts of camera {name}")
    confirmed = request.query_params.get("confirmed", "")
    return console.render(
        request,
        "camera.html",
        view=view,
        confirmed=int(confirmed) if confirmed.isdigit() else None,
        max_confirm=console.cfg.max_confirm_frames,
    )


@action("operator")
async def confirm(console: Console, request: Request, session: Session, user: User) -> Response:
    camera_id = request.path_params["camera"]
    form: FormData = request.state.form
    frame_ids = [str(v) for v in form.getlist("frame_id")]
    note = str(form.get("note", ""))
    try:
        ids = await run_in_threadpool(
            confirm_frames, console.client, console.settings, camera_id, frame_ids, note, user.name
        )
    except Refused as exc:
        return console.refuse(request, exc.status, str(exc))
    return RedirectResponse(f"/cameras/{quote(camera_id, safe='')}?confirmed={len(ids)}", status_code=303)


@page("viewer")
async def versions(console: Console, request: Request, session: Session, user: User) -> Response:
    view = await run_in_threadpool(console.data.versions)
    return console.render(request, "versions.html", view=view, done=request.query_params.get("done", ""))


@page("admin")
async def version_confirm(console: Console, request: Request, session: Session, user: User) -> Response:
    """The confirmation step before an activation or a rollback: what will change, and one POST button."""
    q = request.query_params
    what = q.get("action", "")
    scope, version = q.get("scope", ""), q.get("version", "")
    if what not in ("activate", "rollback") or not scope or (what == "activate" and not version):
        return console.refuse(
            request, 400, "say what to do: action=activate&scope=S&version=V or action=rollback&scope=S"
        )
    registry = console.data.registry
    try:  # a scope that is not typed (camera:ID, line:NAME, default) is refused here, before any read
        current = await run_in_threadpool(registry.active_in, scope)
        history = await run_in_threadpool(registry.history, scope)
    except RegistryError as exc:
        return console.refuse(request, 400, str(exc))
    target = version if what == "activate" else (history[1] if len(history) > 1 else "")
    if target == UNPINNED:  # rolling back an unpin
        target = "nothing of its own (it falls back to its line's or the default's)"
    return console.render(request, "confirm_version.html", what=what, scope=scope, target=target, current=current)


@action("admin")
async def activate(console: Console, request: Request, session: Session, user: User) -> Response:
    form: FormData = request.state.form
    scope, version = str(form.get("scope", "")), str(form.get("version", ""))
    try:
        await run_in_threadpool(console.data.registry.activate, scope, version, False, user.name)
    except RegistryError as exc:
        return console.refuse(request, 400, str(exc))
    return RedirectResponse("/versions?" + urlencode({"done": f"{version} active in {scope}"}), status_code=303)


@action("admin")
async def rollback(console: Console, request: Request, session: Session, user: User) -> Response:
    scope = str(request.state.form.get("scope", ""))
    try:
        a = await run_in_threadpool(console.data.registry.rollback, scope, user.name)
    except RegistryError as exc:
        return console.refuse(request, 400, str(exc))
    return RedirectResponse("/versions?" + urlencode({"done": f"rolled back {scope} to {a.version}"}), status_code=303)


@page("viewer")
async def events(console: Console, request: Request, session: Session, user: User) -> Response:
    scope = request.query_params.get("camera") or None
    kind = request.query_params.get("kind") or None
    found = await run_in_threadpool(console.data.event_list, scope, kind)
    rows = [(e, json.dumps(e.detail, sort_keys=True)) for e in found]
    return console.render(request, "events.html", rows=rows, scope=scope or "", kind=kind or "")


@page("viewer")
async def thumbnail(console: Console, request: Request, session: Session, user: User) -> Response:
    try:
        data = await run_in_threadpool(console.thumbs.get, request.path_params["frame_id"])
    except ThumbnailError as exc:
        return PlainTextResponse(str(exc), status_code=422)
    if data is None:
        return PlainTextResponse("frame not cached (unknown or expired)", status_code=404)
    return Response(data, media_type="image/jpeg", headers={"cache-control": THUMB_CACHE_CONTROL})


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    console: Console = request.app.state.console
    try:
        await run_in_threadpool(console.client.ping)
    except redis.RedisError as exc:
        return PlainTextResponse(f"redis: {exc}", status_code=503)
    return PlainTextResponse("ready")


async def redis_error(request: Request, exc: Exception) -> Response:
    console: Console = request.app.state.console
    name = "_banner.html" if request.url.path.endswith("/tiles") else "error.html"
    return console.render(request, name, status=503, message=REDIS_DOWN, detail=str(exc), banner=True)


def create_app(settings: Settings, client: redis.Redis | None = None) -> ASGIApp:
    console = Console(settings, client)
    app = Starlette(
        routes=[
            Route("/", home),
            Route("/login", login_form, methods=["GET"]),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/line", line),
            Route("/line/tiles", line_tiles),
            Route("/cameras/{camera}", camera),
            Route("/cameras/{camera}/confirm", confirm, methods=["POST"]),
            Route("/versions", versions),
            Route("/versions/confirm", version_confirm),
            Route("/versions/activate", activate, methods=["POST"]),
            Route("/versions/rollback", rollback, methods=["POST"]),
            Route("/events", events),
            Route("/thumbs/{frame_id:path}", thumbnail),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        ],
        exception_handlers={redis.RedisError: redis_error},
    )
    app.state.console = console
    return SecurityHeaders(BodyLimit(app, settings.console.max_body_bytes))


@contextmanager
def serving(settings: Settings, client: redis.Redis | None = None, start_timeout_s: float = 10.0) -> Iterator[str]:
    """The console in a background thread on [console] host and port (0: a free port), for the demo,
    tests and benchmarks; yields its base URL and stops it on exit."""
    import uvicorn

    cfg = settings.console
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, client), host=cfg.host, port=cfg.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="console", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"the console did not start on {cfg.host}:{cfg.port}")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{cfg.host}:{port}"
    finally:
        server.should_exit = True
        thread.join(start_timeout_s)


def serve(settings: Settings) -> None:
    """Run the console until SIGTERM or SIGINT, then return (exit status 0, as the worker's): uvicorn itself
    would re-raise the signal after its graceful shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    cfg = settings.console
    config = uvicorn.Config(
        create_app(settings), host=cfg.host, port=cfg.port, log_level=settings.log.level, server_header=False
    )
    Server(config).run()
