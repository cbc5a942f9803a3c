"""The sandbox's HTTP front end: COS object calls and CI job calls, as the real SDK sends them.

:class:`Sandbox` runs it in a background thread and :func:`serve` in the foreground; the requests
themselves are handled by the WSGI application in :mod:`webhook.dev.sandbox.api`.

Point ``webhook.ci.client.make_client`` at :attr:`Sandbox.endpoint`: the SDK then connects here and
names the bucket in ``Host`` (``<bucket>.cos.<region>.myqcloud.com``), which is how requests
are routed. The CI API is also served on ``<bucket>.ci.<region>.myqcloud.com``.

Served: PUT (also a server-side copy with ``x-cos-copy-source``), GET (with ``Range``), HEAD and
DELETE Object, with ``Content-Type`` and ``x-cos-meta-*`` kept; HEAD Bucket (every bucket named
``<name>-<appid>`` exists); the CI calls CreateMediaJobs and DescribeMediaJob
(:mod:`webhook.dev.sandbox.jobs`) and DescribeMediaJobs (:mod:`webhook.dev.sandbox.listing`). Requests
are signed in the ``Authorization`` header or, for presigned URLs, in the query string.

A presigned URL names the bucket's host, and its signature covers that host. With
``CosConfig(IP=...)`` the SDK would put the IP in the URL instead and lose the bucket, so sign
with a client that has no IP (``make_client(id, key, region)``) and send the URL here with its
host kept in ``Host``: :meth:`Sandbox.request_target` does the rewriting.

Temporary keys are issued as a CVM's metadata service does (:mod:`webhook.dev.sandbox.keys`,
:attr:`Sandbox.keys`, :attr:`Sandbox.credentials_url`): requests signed with them must carry their
token and arrive before they expire. Chosen CAM actions can be denied (``keys.deny``).

TDMQ for CMQ is served too, on the sandbox's own address (:mod:`webhook.dev.sandbox.cmq`, :attr:`Sandbox.cmq`):
jobs submitted with ``CallBackType: TDMQ`` put their callback document on its queues.

Faults (:mod:`webhook.dev.sandbox.faults`) make chosen requests fail: :attr:`Sandbox.faults` in a
test, or ``/_sandbox/faults`` on any host for a running sandbox (so an object of that name is
out of reach). Examples, to develop against a flaky COS::

    sandbox.faults.add(Fault(kind="object GET", status=503, retry_after=5, times=2))
    sandbox.faults.add(Fault(kind="object GET", path="/out/*", reset=4096, rate=0.3, seed=1))
    sandbox.faults.clear()

    curl -X POST http://127.0.0.1:9000/_sandbox/faults -d '{"kind": "CI describe", "delay": 3}'
    curl http://127.0.0.1:9000/_sandbox/faults            # what is active, and how often it fired
    curl -X DELETE http://127.0.0.1:9000/_sandbox/faults  # clear

A fault is checked after the request is routed and its signature accepted. ``status`` answers
with COS's ``<Error>`` body instead of serving the request (a CI submit creates no job).
``reset`` and ``truncate`` send the headers with the full ``Content-Length``, then part of the
body, then end the connection with a TCP reset or a clean close.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from qcloud_cos import CosS3Client

from webhook.ci.client import make_client
from webhook.config import Settings
from webhook.config_values import CosEndpoint
from webhook.dev.sandbox.admin import FAULTS_PATH
from webhook.dev.sandbox.api import SandboxApp
from webhook.dev.sandbox.cmq import FAULTS_PATH as CMQ_FAULTS_PATH
from webhook.dev.sandbox.cmq import CmqService
from webhook.dev.sandbox.faults import Faults
from webhook.dev.sandbox.jobs import MediaJobs, SentCallback
from webhook.dev.sandbox.keys import ROLE_PATH, Keyring
from webhook.dev.sandbox.responses import ResettingServer
from webhook.dev.sandbox.results import CallbackShape
from webhook.dev.sandbox.store import ObjectStore
from webhook.web.server import BackgroundServer

__all__ = ["DEFAULT_REGION", "FAULTS_PATH", "SANDBOX_APPID", "SANDBOX_ID", "SANDBOX_KEY", "Sandbox", "serve"]

# Fixed, public credentials: the sandbox guards nothing, but it checks signatures like COS.
SANDBOX_ID = "sandbox-secret-id"
SANDBOX_KEY = "sandbox-secret-key"
SANDBOX_APPID = "1250000000"
DEFAULT_REGION = "ap-guangzhou"


class Sandbox:
    """A local COS + CI endpoint in a background thread, for tests, demos and development.

    ``with Sandbox().start() as sandbox:`` runs one on a free port with objects in a temporary
    directory; :meth:`client` returns an SDK client wired to it.
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        secret_id: str = SANDBOX_ID,
        secret_key: str = SANDBOX_KEY,
        appid: str = SANDBOX_APPID,
        job_delay: float = 0.0,
        cmq_visibility_timeout: float = 30.0,
        callback_shape: CallbackShape = CallbackShape.FULL,
        credentials_lifetime: float = 1800.0,
    ) -> None:
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        if root is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="cos-sandbox-")
            root = Path(self._tempdir.name)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.secret_id = secret_id
        self.secret_key = secret_key
        self.appid = appid
        self._store = ObjectStore(self.root)
        self.cmq = CmqService(secret_id, secret_key, visibility_timeout=cmq_visibility_timeout)
        """TDMQ for CMQ: its queues, and its faults (``cmq.add_fault``); see :mod:`webhook.dev.sandbox.cmq`."""
        self._jobs = MediaJobs(self._store, job_delay=job_delay, tdmq=self.cmq.send, callback_shape=callback_shape)
        self.faults = Faults()
        """The fault rules every request is checked against; see :mod:`webhook.dev.sandbox.faults`."""
        self.keys = Keyring(secret_id, secret_key, lifetime=credentials_lifetime)
        """The temporary keys it issues (``keys.lifetime``, ``keys.issued``) and the actions it denies
        (``keys.deny("ci:DescribeMediaJobs")``); see :mod:`webhook.dev.sandbox.keys`."""
        self._app = SandboxApp(
            self._store,
            self._jobs,
            keys=self.keys,
            appid=appid,
            faults=self.faults,
            tdmq=self.cmq,
        )
        self._server: BackgroundServer | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> Sandbox:
        """Listen on ``host``:``port`` (0: any free port) and serve in a background thread."""
        self._server = BackgroundServer(self._app, host, port, name="cos-sandbox", server_class=ResettingServer).start()
        return self

    def stop(self) -> None:
        """Stop serving, finish running jobs, and remove the temporary root if there is one."""
        self.faults.clear()  # ends delays in progress
        self.cmq.close()  # and long polls
        if self._server is not None:
            self._server.stop()
            self._server = None
        self._jobs.close()
        if self._tempdir is not None:
            self._tempdir.cleanup()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._started().port

    @property
    def url(self) -> str:
        return self._started().url

    @property
    def endpoint(self) -> CosEndpoint:
        """What ``webhook.ci.client.make_client`` (and ``WEBHOOK_COS_ENDPOINT``) needs to reach the sandbox."""
        return CosEndpoint("http", self._started().host, self.port)

    @property
    def credentials_url(self) -> str:
        """What ``WEBHOOK_CREDENTIALS_URL`` needs for ``COS_CREDENTIALS_ROLE`` (:attr:`keys`' ``role``)
        to take temporary keys from this sandbox instead of a CVM's metadata service."""
        return self.url + ROLE_PATH

    def finish_workflow(self, url: str, job_ids: list[str], callback_format: str = "xml") -> SentCallback:
        """Send ``url`` the ``WorkflowFinish`` of a workflow run made of the jobs ``job_ids``: CI's
        callback for a workflow, which names each task's job and leaves the rest to DescribeMediaJob."""
        return self._jobs.finish_workflow(url, job_ids, callback_format)

    @property
    def reports_results(self) -> bool:
        """Whether jobs report the objects they wrote (``MediaResult``) and their probe (``MediaInfo``)."""
        return self._jobs.reports_results

    @reports_results.setter
    def reports_results(self, reports: bool) -> None:
        self._jobs.reports_results = reports

    @property
    def output_parts(self) -> int:
        """How many objects a job writes when its ``Output.Object`` holds ``${Number}`` (default 1):
        from 2 on, the output is split into that many WAVs, numbered from 1, and ``MediaResult``
        names each with its MD5 as CI reports a job that wrote several files."""
        return self._jobs.output_parts

    @output_parts.setter
    def output_parts(self, parts: int) -> None:
        if parts < 1:
            raise ValueError("a job writes at least one object")
        self._jobs.output_parts = parts

    @property
    def callback_shape(self) -> CallbackShape:
        """How the callbacks of jobs that finish from now on state their locations."""
        return self._jobs.callback_shape

    @callback_shape.setter
    def callback_shape(self, shape: CallbackShape) -> None:
        self._jobs.callback_shape = shape

    @property
    def callbacks_sent(self) -> list[SentCallback]:
        """Every callback delivered so far, oldest first."""
        return self._jobs.callbacks_sent

    def wait_for_callbacks(self, n: int, timeout: float) -> list[SentCallback]:
        """Block until ``n`` callbacks were sent and return them all; raise TimeoutError after ``timeout`` s."""
        return self._jobs.wait_for_callbacks(n, timeout)

    def object_path(self, bucket: str, key: str) -> Path:
        """Where the bytes of an object are stored."""
        return self._store.object_path(bucket, key)

    def settings(self, bucket: str, region: str = DEFAULT_REGION, **more: Any) -> Settings:
        """Settings whose worker verifies and fetches through this sandbox, for jobs in ``bucket``
        (``more`` adds settings, or replaces these: ``secret_id=""`` for a role's keys instead)."""
        return Settings(
            **{
                "allowed_buckets": frozenset({bucket}),
                "allowed_regions": frozenset({region}),
                "secret_id": self.secret_id,
                "secret_key": self.secret_key,
                "region": region,
                "cos_endpoint": self.endpoint,
            }
            | more
        )

    def client(self, region: str = DEFAULT_REGION) -> CosS3Client:
        """An SDK client with the sandbox's credentials, exactly as the product builds one."""
        return make_client(self.secret_id, self.secret_key, region, self.endpoint)

    def request_target(self, url: str) -> tuple[str, dict[str, str]]:
        """The sandbox URL and headers that send a request for the COS ``url`` here.

        ``url`` is ``https://<bucket>.cos.<region>.myqcloud.com/<key>?...``, for example a presigned
        URL: its host moves into ``Host``, which names the bucket and is covered by the signature::

            target, headers = sandbox.request_target(presigned)
            requests.get(target, headers=headers)
        """
        parts = urlsplit(url)
        return self.url + urlunsplit(("", "", parts.path, parts.query, "")), {"Host": parts.netloc}

    def _started(self) -> BackgroundServer:
        if self._server is None:
            raise RuntimeError("the sandbox is not running: call start() first")
        return self._server


def serve(host: str, port: int, root: Path | None = None, *, reports_results: bool = True) -> None:
    """Run a sandbox in the foreground until Ctrl+C, after printing the settings that reach it."""
    sandbox = Sandbox(root)
    sandbox.reports_results = reports_results
    with sandbox.start(host, port), contextlib.suppress(KeyboardInterrupt):
        print(f"COS/CI sandbox listening on {sandbox.url}, objects under {sandbox.root}")
        print(f"Settings for cos-webhook (any region works, and any bucket named <name>-{sandbox.appid}):")
        print(f"  COS_SECRET_ID={sandbox.secret_id}")
        print(f"  COS_SECRET_KEY={sandbox.secret_key}")
        print(f"  (or, for temporary keys, COS_CREDENTIALS_ROLE={sandbox.keys.role}")
        print(f"   and WEBHOOK_CREDENTIALS_URL={sandbox.credentials_url})")
        print(f"  COS_REGION={DEFAULT_REGION}")
        print(f"  WEBHOOK_COS_ENDPOINT={sandbox.url}")
        print(f"  WEBHOOK_ALLOWED_BUCKETS=examplebucket-{sandbox.appid}")
        print(f"  WEBHOOK_TDMQ_ENDPOINT={sandbox.url}")
        print("  WEBHOOK_TDMQ_REGION=gz")
        print("  WEBHOOK_TDMQ_QUEUE=<any queue name: created on first use>")
        print(f"Inject faults with POST {sandbox.url}{FAULTS_PATH} (see webhook/dev/sandbox/faults.py)")
        print(f"and, for TDMQ, POST {sandbox.url}{CMQ_FAULTS_PATH} (see webhook/dev/sandbox/cmq.py).")
        print("Press Ctrl+C to stop.", flush=True)
        threading.Event().wait()
