"""A TCP forwarder for tests: an outage of a shared server (Redis, RabbitMQ) without stopping it.

with TcpProxy(("127.0.0.1", 6379)) as proxy:
    client = connect("127.0.0.1", proxy.port)
    proxy.down()    # connecting is refused, open connections are dropped
    proxy.up()      # forwarding again, on the same port
    proxy.stall()   # connections stay open but no byte passes until up()
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from sqlalchemy.engine import make_url

_POLL = 0.05  # seconds: how quickly the accept loop notices down()


class TcpProxy:
    """Listens on 127.0.0.1:<port> (chosen at start, kept across down/up) and forwards to ``target``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.accepted = 0  # connections forwarded so far
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._flowing = threading.Event()  # cleared by stall(): pumps hold their data
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self.up()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Accept and forward connections (again), on the same port; resumes a stall."""
        self._flowing.set()
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Rebinding the port right after down() must not fail on connections still in TIME_WAIT.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(_POLL)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), name="tcp-proxy", daemon=True)
        self._acceptor.start()

    def down(self) -> None:
        """Refuse new connections and drop every open one, as a crashed server would."""
        listener, self._listener = self._listener, None
        if self._acceptor is not None:
            self._acceptor.join()  # within _POLL: it watches self._listener
            self._acceptor = None
        if listener is not None:
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, set()
        for sock in connections:
            _close(sock)
        self._flowing.set()  # pumps blocked by a stall wake up and see their sockets closed

    @property
    def open_connections(self) -> int:
        """Connections being forwarded now; one the client closed leaves a moment later."""
        with self._lock:
            return len(self._connections) // 2  # a client's socket and the one to the target

    def settled(self, connections: int, timeout: float = 10.0) -> int:
        """:attr:`open_connections` once it is ``connections``, or when ``timeout`` seconds have passed."""
        deadline = time.monotonic() + timeout
        while self.open_connections != connections and time.monotonic() < deadline:
            time.sleep(_POLL)
        return self.open_connections

    def stall(self) -> None:
        """Keep connections open but pass no data (a hung server) until :meth:`up`."""
        self._flowing.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            for sock in (client, server):
                sock.settimeout(None)
            with self._lock:
                self._connections |= {client, server}
                self.accepted += 1
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                self._flowing.wait()
                sink.sendall(chunk)
        except OSError:
            pass  # either side closed: the pair is over
        _close(source)
        _close(sink)
        with self._lock:
            self._connections -= {source, sink}


def _close(sock: socket.socket) -> None:
    # shutdown wakes a thread blocked in recv on this socket, which close alone does not.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@contextlib.contextmanager
def proxied_database(url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A proxy in front of ``url``'s PostgreSQL server, and the same URL through it."""
    direct = make_url(url)
    with TcpProxy((direct.host or "127.0.0.1", direct.port or 5432)) as proxy:
        yield proxy, direct.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
