"""A RabbitMQ user of a test's own, so that a test can tell its credentials from pika's guest/guest defaults."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import requests

from support.services import require_service, unavailable

HOST, PORT = "127.0.0.1", 5672
MANAGEMENT = "http://127.0.0.1:15672/api"  # the management plugin, if enabled; guest may use it from loopback
_EVERYTHING = ".*"


@contextmanager
def rabbitmq_user(vhost: str = "/") -> Iterator[tuple[str, str]]:
    """A new user and its password, allowed everything on ``vhost``; deleted afterwards.

    Made with ``rabbitmqctl`` on this machine, else the management HTTP API; with neither the test
    is skipped (under ``CI=true``: fails), naming what was tried.
    """
    require_service("RabbitMQ", HOST, PORT)
    user = f"cos-webhook-test-{uuid.uuid4().hex[:12]}"
    password = uuid.uuid4().hex
    tried: list[str] = []
    for admin in (_Rabbitmqctl(), _ManagementApi()):
        problem = admin.add(user, password, vhost)
        if problem is None:
            try:
                yield user, password
            finally:
                admin.delete(user)
            return
        tried.append(problem)
    unavailable(f"cannot create a RabbitMQ user: {'; '.join(tried)}")


class _Rabbitmqctl:
    def add(self, user: str, password: str, vhost: str) -> str | None:
        if shutil.which("rabbitmqctl") is None:
            return "rabbitmqctl is not installed"
        for args in (["add_user", user, password], ["set_permissions", "-p", vhost, user, *[_EVERYTHING] * 3]):
            problem = self._run(args)
            if problem is not None:
                self.delete(user)
                return problem
        return None

    def delete(self, user: str) -> None:
        self._run(["delete_user", user])

    @staticmethod
    def _run(args: list[str]) -> str | None:
        try:
            done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"rabbitmqctl {args[0]}: {exc}"
        if done.returncode != 0:
            return f"rabbitmqctl {args[0]} exited {done.returncode}: {(done.stderr or done.stdout).strip()[:200]}"
        return None


class _ManagementApi:
    auth = ("guest", "guest")

    def add(self, user: str, password: str, vhost: str) -> str | None:
        permissions = {"configure": _EVERYTHING, "write": _EVERYTHING, "read": _EVERYTHING}
        for url, body in (
            (f"{MANAGEMENT}/users/{quote(user, safe='')}", {"password": password, "tags": ""}),
            (f"{MANAGEMENT}/permissions/{quote(vhost, safe='')}/{quote(user, safe='')}", permissions),
        ):
            try:
                response = requests.put(url, json=body, auth=self.auth, timeout=10)
            except requests.RequestException as exc:
                return f"the management API at {MANAGEMENT}: {type(exc).__name__}"
            if not response.ok:
                self.delete(user)
                return f"the management API answered {response.status_code} to PUT {url}"
        return None

    def delete(self, user: str) -> None:
        # If this fails the user is left behind; its random name collides with nothing.
        with contextlib.suppress(requests.RequestException):
            requests.delete(f"{MANAGEMENT}/users/{quote(user, safe='')}", auth=self.auth, timeout=10)
