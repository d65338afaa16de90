"""Who is looking: without login one shared feed (the UI's own broker identity); with login, one feed per
person, connected with the MQTT username and password they typed, so the page shows exactly what that
identity may read on the broker. Sessions are random tokens kept in memory (a restart logs everybody out)
and end after ``idle_s`` without a request."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from flops.settings import BrokerAddress
from flops.ui.feed import Feed

log = structlog.get_logger(__name__)

COOKIE = "flops_ui_session"


@dataclass
class Session:
    username: str
    feed: Feed
    last_used: float


class Sessions:
    """Logged-in people and their feeds."""

    def __init__(
        self,
        address: BrokerAddress,
        tls_files: dict[str, str | None],
        *,
        idle_s: float = 3600.0,
        max_sessions: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.tls_files = tls_files
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def login(self, username: str, password: str) -> str:
        """A new session token; BrokerUnavailable when the broker refuses these credentials."""
        address = self.address.model_copy(update={"username": username, "password": password})
        feed = Feed(address, **self.tls_files).start()
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._expire_locked()
            if len(self._sessions) >= self.max_sessions:
                oldest = min(self._sessions, key=lambda t: self._sessions[t].last_used)
                self._end_locked(oldest)
            self._sessions[token] = Session(username, feed, self._clock())
        log.info("ui login", username=username)
        return token

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            self._expire_locked()
            session = self._sessions.get(token)
            if session is not None:
                session.last_used = self._clock()
            return session

    def logout(self, token: str | None) -> None:
        with self._lock:
            if token in self._sessions:
                self._end_locked(token)

    def close(self) -> None:
        with self._lock:
            for token in list(self._sessions):
                self._end_locked(token)

    def _expire_locked(self) -> None:
        now = self._clock()
        for token in [t for t, s in self._sessions.items() if now - s.last_used > self.idle_s]:
            self._end_locked(token)

    def _end_locked(self, token: str) -> None:
        session = self._sessions.pop(token)
        session.feed.stop()
        log.info("ui session ended", username=session.username)
