"""Deadlines for whole network exchanges, where requests' ``timeout`` only bounds each read.

A server that sends one byte every few seconds never trips a per-read timeout, so a worker
waiting on it would wait forever. A :class:`Deadline` bounds the whole exchange instead::

    with Deadline(30, "POST to sink http") as deadline:
        try:
            session.post(url, data=body, timeout=30)   # session from deadline_session()
        except requests.RequestException:
            if deadline.expired:
                raise DeliveryError(deadline.passed_message()) from None
            raise

While a deadline is current (per thread), every connection of a :func:`deadline_session` that
connects or sends a request belongs to it. When it passes, an alarm shuts those sockets down,
which ends any send or receive blocked on them at once; the session then raises
:class:`DeadlineExceeded`, and refuses to start requests under a deadline already passed.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import ProxyManager

from webhook.alarm import ALARMS, Alarm

DEFAULT_MIN_RATE = 1024 * 1024
"""Bytes per second a transfer is allowed by default (as ``WEBHOOK_MIN_TRANSFER_RATE``)."""
DEFAULT_TIMEOUT = 30.0
"""Seconds one whole exchange with COS or CI is allowed by default (as ``WEBHOOK_COS_TIMEOUT``)."""

_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("deadline", default=None)
_active: set[Deadline] = set()  # every entered, not yet exited deadline in the process
_active_lock = threading.Lock()


class DeadlineExceeded(requests.RequestException):
    """A request that could not finish, or start, before its deadline passed.

    Deliberately neither a ``ConnectionError`` nor a ``Timeout``: clients that retry those (the
    COS SDK does, after a pause) would try again under a deadline that has already passed.
    """


def transfer_budget(base: float, size: int, min_rate: int) -> float:
    """Seconds for an exchange that moves ``size`` bytes: ``base`` plus the bytes' time at ``min_rate``."""
    return base + max(size, 0) / min_rate


def current() -> Deadline | None:
    """The calling thread's innermost active deadline, if any."""
    return _current.get()


class Deadline:
    """A context manager bounding everything done inside it, in this thread, to ``seconds``.

    Entered once. Nested deadlines are fine: an outer one passing ends the inner one's work too.
    """

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds  # the whole budget, extensions included
        self.what = what
        self._lock = threading.Lock()
        self._due: float | None = None  # time.monotonic() when it passes; None until entered
        self._abandoned: str | None = None  # why, once expire_now() was called
        self._exited_expired: bool | None = None  # frozen at exit
        self._parent: Deadline | None = None
        self._token: contextvars.Token[Deadline | None] | None = None
        self._alarm: Alarm | None = None
        self._watched: set[_Watching] = set()

    def __enter__(self) -> Deadline:
        with self._lock:
            if self._due is not None:
                raise RuntimeError(f"deadline for {self.what} entered twice")
            self._due = time.monotonic() + self.seconds
            self._schedule()
        self._parent = _current.get()
        self._token = _current.set(self)
        with _active_lock:
            _active.add(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        with self._lock:
            self._exited_expired = self._passed()
            alarm, self._alarm = self._alarm, None
            self._watched.clear()
        if alarm is not None:
            ALARMS.cancel(alarm)
        with _active_lock:
            _active.discard(self)
        if self._token is not None:
            _current.reset(self._token)

    @property
    def expired(self) -> bool:
        """Whether the deadline (or an enclosing one) has passed or was abandoned; frozen at exit."""
        if self._exited_expired is not None:
            return self._exited_expired
        return self._passed()

    @property
    def remaining(self) -> float:
        """Seconds left (0 once expired); the full budget before it is entered."""
        if self.expired:
            return 0.0
        left = self.seconds if self._due is None else max(0.0, self._due - time.monotonic())
        return left if self._parent is None else min(left, self._parent.remaining)

    def extend(self, seconds: float) -> None:
        """Grant ``seconds`` more, e.g. once a transfer's size is known; too late once expired."""
        with self._lock:
            if self._due is None or self._exited_expired is not None or self._passed():
                return
            self.seconds += seconds
            self._due += seconds
            self._schedule()

    def expire_now(self, reason: str | None = None) -> None:
        """Abandon the work now: cut its connections; :meth:`passed_message` gives ``reason``."""
        with self._lock:
            if self._exited_expired is not None:
                return
            if self._abandoned is None:
                self._abandoned = reason or ""
            watched = list(self._watched)
        for connection in watched:
            connection.sever(self)

    @classmethod
    def expire_all(cls, reason: str) -> int:
        """Abandon every active deadline in the process (e.g. a shutdown budget ran out); how many."""
        with _active_lock:
            everyone = list(_active)
        for deadline in everyone:
            deadline.expire_now(reason)
        return len(everyone)

    def passed_message(self) -> str:
        """Why the work stopped, for an error message: ``no complete answer within 30s (deadline)``."""
        culprit = self._culprit()
        reason = culprit._abandoned
        if reason is not None:
            # "worker shutting down" and "abandoned: worker shutting down" read the same.
            return reason if reason.startswith("abandoned") else f"abandoned: {reason}".removesuffix(": ")
        return f"no complete answer within {_seconds(culprit.seconds)}s (deadline)"

    def exceeded(self, request: requests.PreparedRequest | None = None) -> DeadlineExceeded:
        """The exception a deadline-aware session raises for this deadline."""
        return DeadlineExceeded(f"{self.what}: {self.passed_message()}", request=request)

    # -- internals -------------------------------------------------------------------------

    def _passed(self) -> bool:
        if self._abandoned is not None:
            return True
        if self._due is not None and time.monotonic() >= self._due:
            return True
        return self._parent is not None and self._parent.expired

    def _culprit(self) -> Deadline:
        """The deadline in the chain that ended the work: one abandoned, else one past due, else self."""
        chain = self._chain()
        now = time.monotonic()
        for deadline in chain:
            if deadline._abandoned is not None:
                return deadline
        for deadline in chain:
            if deadline._due is not None and now >= deadline._due:
                return deadline
        return self

    def _chain(self) -> list[Deadline]:
        chain: list[Deadline] = []
        node: Deadline | None = self
        while node is not None:
            chain.append(node)
            node = node._parent
        return chain

    def _schedule(self) -> None:
        """(Re)set the alarm for ``_due``; the caller holds the lock."""
        assert self._due is not None
        if self._alarm is not None:
            ALARMS.cancel(self._alarm)
        self._alarm = ALARMS.set(self._due, self._fire)

    def _fire(self) -> None:
        with self._lock:
            # An alarm replaced by extend() or outlived by exit may still run: it must do nothing.
            if self._exited_expired is not None or self._due is None or time.monotonic() < self._due:
                return
            watched = list(self._watched)
        for connection in watched:
            connection.sever(self)

    def _watch(self, connection: _Watching) -> None:
        """``connection`` now works for this deadline (and the ones enclosing it)."""
        for deadline in self._chain():
            with deadline._lock:
                if deadline._exited_expired is None:
                    deadline._watched.add(connection)
        if self.expired:
            connection.sever(self)


expire_all = Deadline.expire_all


def _seconds(value: float) -> str:
    if value >= 10:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.1f}".removesuffix(".0")
    return f"{value:.2g}"


# -- the requests/urllib3 side -----------------------------------------------------------------

if TYPE_CHECKING:
    from urllib3._base_connection import BaseHTTPConnection

    _ConnectionBase = HTTPConnection
else:
    _ConnectionBase = object


# Who owns a connection changes in the thread taking it, while a deadline may sever it from
# another: checking the owner and shutting the socket down must not interleave with a new owner.
_OWNERSHIP = threading.Lock()


class _Watching(_ConnectionBase):
    """A urllib3 connection that hands its socket to the current deadline whenever it is used."""

    owner: Deadline | None = None  # the deadline of the request using it now

    def connect(self) -> None:
        super().connect()
        self._claim()

    # A keep-alive connection from the pool has no connect(): it is claimed here, per request.
    def request(self, *args: Any, **kwargs: Any) -> None:
        self._claim()
        super().request(*args, **kwargs)

    def _claim(self) -> None:
        with _OWNERSHIP:
            self.owner = _current.get()
        if self.owner is not None:
            self.owner._watch(self)

    def sever(self, deadline: Deadline) -> None:
        """Shut the socket down if ``deadline`` (still) governs this connection; safe from any thread."""
        with _OWNERSHIP:
            owner = self.owner
            if owner is None or deadline not in owner._chain():
                return  # back in the pool, or taken over by another request since
            sock: Any = self.sock
            raw = sock if isinstance(sock, socket.socket) else getattr(sock, "socket", None)  # TLS in TLS
            if isinstance(raw, socket.socket):
                with contextlib.suppress(OSError):  # already closed
                    # socket.socket's own shutdown: SSLSocket.shutdown would also drop the TLS state
                    # that the blocked thread is still using.
                    socket.socket.shutdown(raw, socket.SHUT_RDWR)


class _Connection(_Watching, HTTPConnection):
    pass


class _TlsConnection(_Watching, HTTPSConnection):
    pass


def _disown(connection: object) -> None:
    # An idle connection in the pool belongs to no deadline: one passing now must not cut it
    # while another request is taking it out.
    if isinstance(connection, _Watching):
        with _OWNERSHIP:
            connection.owner = None


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection

    def _put_conn(self, conn: BaseHTTPConnection | None) -> None:
        _disown(conn)
        super()._put_conn(conn)


class _TlsPool(HTTPSConnectionPool):
    ConnectionCls = _TlsConnection

    def _put_conn(self, conn: BaseHTTPConnection | None) -> None:
        _disown(conn)
        super()._put_conn(conn)


_POOLS: dict[str, type[HTTPConnectionPool]] = {"http": _Pool, "https": _TlsPool}


class _Adapter(HTTPAdapter):
    """requests' adapter with the pools above; TLS settings reach them exactly as before."""

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, ProxyManager):  # not SOCKS, whose pools are its own
            manager.pool_classes_by_scheme = _POOLS
        return manager


class _Session(requests.Session):
    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        deadline = _current.get()
        if deadline is None:
            return super().send(request, **kwargs)
        if deadline.remaining <= 0:
            raise deadline.exceeded(request)
        # Per-operation timeouts never outlast the deadline: connecting (and a TLS handshake)
        # happens before there is a socket to shut down.
        kwargs["timeout"] = _within(kwargs.get("timeout"), deadline.remaining)
        try:
            response = super().send(request, **kwargs)
        except DeadlineExceeded:
            raise
        except requests.RequestException as exc:
            if deadline.expired:
                raise deadline.exceeded(request) from exc
            raise
        if deadline.expired:
            # What was read under the deadline may have been cut short by it: a body, or (streamed
            # or not) the headers, since http.client takes the end of a severed socket for their end.
            response.close()
            raise deadline.exceeded(request)
        return response


def _within(timeout: Any, remaining: float) -> Any:
    if timeout is None or isinstance(timeout, int | float):
        connect = read = timeout
    elif isinstance(timeout, tuple):
        connect, read = timeout
    else:
        return timeout  # a urllib3 Timeout object: as given, the alarm still applies
    remaining = max(remaining, 0.001)
    return (
        remaining if connect is None else min(connect, remaining),
        remaining if read is None else min(read, remaining),
    )


def deadline_session(pool_connections: int = 10, pool_maxsize: int = 10) -> requests.Session:
    """A :class:`requests.Session` whose requests are bounded by the current :class:`Deadline`, if any.

    Without a current deadline it behaves exactly like a plain session.
    """
    session = _Session()
    for prefix in ("http://", "https://"):
        session.mount(prefix, _Adapter(pool_connections=pool_connections, pool_maxsize=pool_maxsize))
    return session


def _after_fork() -> None:
    # The child has none of the parent's threads: their deadlines (and alarms) are gone.
    global _active_lock
    _active_lock = threading.Lock()
    _active.clear()


os.register_at_fork(after_in_child=_after_fork)
