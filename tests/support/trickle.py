"""A deliberately slow HTTP peer on 127.0.0.1, for tests of deadlines.

    with Trickle() as server:                          # answers one byte every 0.3 s, forever
    with Trickle(answer=None) as server:               # reads each request, never answers
    with Trickle(read_every=0.1) as server:            # takes a request's body 1 KiB per 0.1 s
    with Trickle(response(body), head=..., chunk=64 * 1024, every=0.1) as server:   # a paced download
    with Trickle(tls=context) as server:               # the same over TLS (server.url is https://)

Each connection is served by its own thread, request after request (keep-alive), until the
client closes it or :meth:`Trickle.stop` closes everything. With ``first``, the first request on
each connection is answered with it at once, so a reused connection can be told from a new one.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

_READ = 64 * 1024
_SLOW_READ = 1024
# A status line and a header that never ends: at a byte every few tenths of a second no client
# reads all of it, and none gives up on a header line before 64 KiB.
ENDLESS = b"HTTP/1.1 200 OK\r\nX-Padding: " + b"." * 60_000


def response(body: bytes = b"", status: str = "200 OK", headers: Mapping[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 response with ``Content-Length``."""
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Trickle:
    """Serves every request on ``url`` with ``answer``, ``head`` bytes at once, then ``chunk`` bytes per ``every`` s."""

    def __init__(
        self,
        answer: bytes | None = ENDLESS,
        *,
        every: float = 0.3,
        chunk: int = 1,
        head: int = 0,
        read_every: float | None = None,
        first: bytes | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.answer = answer
        self.every = every
        self.chunk = chunk
        self.head = head
        self.read_every = read_every
        self.first = first
        self.tls = tls
        self.connections = 0  # accepted so far
        self.requests = 0  # request heads read so far
        self._seen = threading.Condition()
        self._stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if read_every is not None:
            # A small window: the client's send blocks soon instead of filling large buffers.
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._start(self._accept)

    def __enter__(self) -> Trickle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> None:
        """Block until ``n`` request heads have arrived; AssertionError after ``timeout``."""
        with self._seen:
            if not self._seen.wait_for(lambda: self.requests >= n, timeout):
                raise AssertionError(f"{self.requests} requests arrived, expected {n}")

    def stop(self) -> None:
        """Close the listener and every connection, and wait for the threads."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in list(self._open):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="trickle")
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            self._open.add(sock)
            self._start(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        buffered = b""
        served = 0
        try:
            if self.tls is not None:
                self._open.discard(sock)
                sock = self.tls.wrap_socket(sock, server_side=True)
                self._open.add(sock)
            while not self._stopping.is_set():
                head, buffered = self._read_head(sock, buffered)
                if head is None:
                    return
                with self._seen:
                    self.requests += 1
                    self._seen.notify_all()
                buffered = self._read_body(sock, head, buffered)
                if buffered is None:
                    return
                answer = self.first if served == 0 and self.first is not None else self.answer
                served += 1
                if answer is None:
                    self._stopping.wait()
                    return
                if answer is self.first:
                    sock.sendall(answer)
                    continue
                sock.sendall(answer[: self.head])
                for start in range(self.head, len(answer), self.chunk):
                    if self._stopping.wait(self.every):
                        return
                    sock.sendall(answer[start : start + self.chunk])
        except OSError:
            return  # the client gave up: what these tests are about
        finally:
            self._open.discard(sock)
            sock.close()

    def _read_head(self, sock: socket.socket, buffered: bytes) -> tuple[str | None, bytes]:
        while b"\r\n\r\n" not in buffered:
            data = sock.recv(_READ)
            if not data:
                return None, b""
            buffered += data
        head, _, rest = buffered.partition(b"\r\n\r\n")
        return head.decode("latin-1"), rest

    def _read_body(self, sock: socket.socket, head: str, buffered: bytes) -> bytes | None:
        """Consume the request's body (Content-Length only); what follows it, or None at EOF."""
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        while len(buffered) < length:
            if self.read_every is not None and self._stopping.wait(self.read_every):
                return None
            data = sock.recv(_SLOW_READ if self.read_every is not None else _READ)
            if not data:
                return None
            buffered += data
        return buffered[length:]


def self_signed(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context for 127.0.0.1 with a new self-signed certificate, and that certificate's file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context, cert_path
