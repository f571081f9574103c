"""API keys: which key tier each route needs, the check of a presented key (`Authorization:
Bearer <key>`, or Anthropic's `x-api-key: <key>`) or of the dashboard's sign-in cookie, and the sign-in throttle. Keys are compared
in constant time and never logged or echoed; with no keys configured every route stays open.
`app.api.auth.ApiKeyMiddleware` applies the check in front of every route."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Literal

from fastapi import Request
from starlette.datastructures import Headers
from starlette.types import Scope

from app.config import ApiKeys, SecurityConfig
from app.errors import Forbidden, ServiceError, Unauthorized

logger = logging.getLogger(__name__)

Tier = Literal["public", "api", "dashboard", "admin", "metrics"]
SESSION_COOKIE = "poolserve_session"
DASHBOARD_PUBLIC = frozenset({"/dashboard/login", "/dashboard/logout"})
READ_METHODS = frozenset({"GET", "HEAD"})
REALM = 'Bearer realm="poolserve"'


def route_path(scope: Scope) -> str:
    """The path the routes match: without the `root_path` a Serve route prefix adds (key tiers
    and error shapes depend on it; the full path would miss `/v1/pools` under a prefix)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def route_tier(method: str, path: str, security: SecurityConfig) -> Tier:
    """The key a request needs. Unknown routes need an API key too (401 before 404)."""
    path = path.rstrip("/") or "/"
    if path in DASHBOARD_PUBLIC:
        return "public"
    if path == "/metrics":
        return "public" if security.metrics_public else "metrics"
    if path == "/health" and security.health_public:
        return "public"
    if path == "/v1/usage":
        return "admin"
    if path == "/v1/pools" or path.startswith("/v1/pools/"):
        return "api" if method in READ_METHODS else "admin"
    if path == "/dashboard" or path.startswith("/dashboard/"):
        return "dashboard"
    return "api"


def bearer_token(headers: Headers) -> bytes | None:
    """The key of `Authorization: Bearer <key>`, else of `x-api-key: <key>` (the header the
    Anthropic SDK sends); b"" for any other Authorization value; None: no key presented."""
    value = headers.get("authorization")
    if value is None:
        key = headers.get("x-api-key")
        return (key or "").strip().encode("latin-1") or None
    scheme, _, token = value.strip().partition(" ")
    return token.strip().encode("latin-1") if scheme.lower() == "bearer" else b""


class SignInThrottle:
    """Failed sign-ins per client address: after `limit` failures within `window_s` the address
    is refused (even with a good key) until its oldest failure leaves the window. Remembers at
    most `max_clients` addresses (the least recently failing are forgotten first)."""

    def __init__(
        self,
        limit: int,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self.max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> float | None:
        """Seconds `client` must wait before it may try again; None when it may try now."""
        failures = self._recent(client)
        if failures is None or len(failures) < self.limit:
            return None
        return max(failures[0] + self.window_s - self.clock(), 0.0) or None

    def failed(self, client: str) -> None:
        failures = self._recent(client)
        if failures is None:
            failures = self._failures[client] = deque(maxlen=self.limit)
        failures.append(self.clock())
        self._failures.move_to_end(client)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)

    def _recent(self, client: str) -> deque[float] | None:
        failures = self._failures.get(client)
        if failures is None:
            return None
        horizon = self.clock() - self.window_s
        while failures and failures[0] <= horizon:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return None
        return failures


def _encoded(keys: frozenset[str]) -> tuple[bytes, ...]:
    return tuple(key.encode() for key in sorted(keys))


def _matches(candidate: bytes, keys: tuple[bytes, ...]) -> bool:
    found = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        found |= hmac.compare_digest(candidate, key)
    return found


class Authenticator:
    """Checks a presented key (or dashboard cookie) against the keys of a route's tier.

    Each tier is enforced once it has keys: API keys (with admin keys) on every route; admin
    keys alone on pool changes; metrics keys (with admin keys) on /metrics, else the API tier.
    """

    def __init__(
        self,
        keys: ApiKeys,
        security: SecurityConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.security = security
        self.clock = clock
        self.sign_ins = SignInThrottle(
            security.dashboard_sign_in_attempts, security.dashboard_sign_in_window_seconds
        )
        admin = _encoded(keys.admin)
        self._admin = admin
        self._api = _encoded(keys.api) + admin if keys.api else ()
        self._metrics_separate = bool(keys.metrics)
        self._metrics = _encoded(keys.metrics) + admin if keys.metrics else self._api

    @classmethod
    def from_config(cls, security: SecurityConfig) -> Authenticator:
        keys = security.load_keys()
        logger.info(
            "API keys: %d api, %d admin, %d metrics; /metrics %s, /health %s, CORS %s",
            len(keys.api),
            len(keys.admin),
            len(keys.metrics),
            "public" if security.metrics_public else "keyed",
            "public" if security.health_public else "keyed",
            security.cors_allow_origins or "off",
        )
        return cls(keys, security)

    @staticmethod
    def of(request: Request) -> Authenticator:
        authenticator: Authenticator = request.app.state.authenticator
        return authenticator

    @property
    def enabled(self) -> bool:
        return bool(self._api or self._admin or self._metrics)

    @property
    def dashboard_keyed(self) -> bool:
        return bool(self._api)

    def check(
        self, tier: Tier, key: bytes | None, cookie: str | None = None
    ) -> ServiceError | None:
        """None when the request may pass, else the 401/403 to answer."""
        if tier == "public":
            return None
        if tier == "admin" and self._admin:
            if key and _matches(key, self._admin):
                return None
            if key and _matches(key, self._api):
                return Forbidden(
                    "pool changes (create, renew, delete) and usage reports need an admin key"
                )
            return self._unauthorized(key)
        accepted = self._metrics if tier == "metrics" else self._api
        if not accepted:
            return None
        if key and _matches(key, accepted):
            return None
        if tier == "dashboard" and cookie is not None and self.session_valid(cookie):
            return None
        if tier == "metrics" and self._metrics_separate:
            if key is None:
                return Unauthorized(
                    "/metrics needs a metrics key: send 'Authorization: Bearer <key>'"
                )
            return Unauthorized("the key is not valid for /metrics")
        return self._unauthorized(key)

    @staticmethod
    def _unauthorized(key: bytes | None) -> Unauthorized:
        if key is None:
            return Unauthorized(
                "this service needs an API key: send 'Authorization: Bearer <key>' or "
                "'x-api-key: <key>'"
            )
        if not key:
            return Unauthorized("the Authorization header must be 'Bearer <key>'")
        return Unauthorized("the API key is not valid")

    def key_accepted_for_dashboard(self, key: str) -> bool:
        return bool(key) and _matches(key.encode(), self._api)

    def session_cookie(self, key: str) -> str:
        """A sign-in cookie value for a dashboard key: its expiry and an HMAC keyed by the key, so
        it reveals nothing of the key, holds on every ingress replica, and dies with the key."""
        expires = int(self.clock()) + self.security.dashboard_session_seconds
        return f"{expires}.{_session_mac(key.encode(), expires)}"

    def session_valid(self, cookie: str) -> bool:
        expires_text, _, mac = cookie.partition(".")
        if not expires_text.isdigit() or int(expires_text) <= self.clock():
            return False
        expires = int(expires_text)
        found = False
        for key in self._api:
            found |= hmac.compare_digest(mac.encode(), _session_mac(key, expires).encode())
        return found


def _session_mac(key: bytes, expires: int) -> str:
    return hmac.new(key, f"poolserve-dashboard:{expires}".encode(), hashlib.sha256).hexdigest()


def cookie_value(headers: Headers, name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None
