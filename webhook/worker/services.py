"""A process's parts that run beside each other, as named services started and stopped together.

A worker is a list of services (heartbeat, lease renewal, wake-up, reconcile, prune, its metrics
server, the claim loop), a consumer one per queue. Each service is a name and a body that works
until its stop event is set (:class:`Service`); :class:`Services` gives each a thread, starts
them in list order and stops them in reverse, each joined before the next is told to stop. The
claim loop, last to start, is first to stop: the work it has in hand finishes while the
heartbeat and the lease renewal it relies on still run.

One service failing (an exception leaving its body) stops the process loudly, as procrastinate's
worker does with its side tasks: the failure is logged with the service's name, the shutdown
begins, the others stop, and :meth:`Services.run` raises :class:`ServiceFailed`, which the
command turns into a non-zero exit. A service that returns on its own (the claim loop of a
burst, with nothing more due) ends the run too, with nothing in hand to wait for.

:class:`Shutdown` bounds how long stopping may take: no new work at once, then ``budget``
seconds for the work in hand, then every active deadline is expired (the work fails as
abandoned and is given back), and a process still stuck after a short grace stops hard.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Protocol

from webhook.deadline import Deadline

log = logging.getLogger(__name__)

HARD_STOP_GRACE = 3.0  # seconds after abandoning before a process stuck outside any deadline stops hard
_CHECK = 0.05  # seconds: how soon a run notices that a service ended or the shutdown began


class Service(Protocol):
    """A part of a process that works in a thread of its own until told to stop."""

    @property
    def name(self) -> str:
        """Names its thread, and it in the log when it fails."""

    def run(self, stopping: threading.Event) -> None:
        """Work until ``stopping`` is set, then return soon; returning earlier ends the process's run."""


class ServiceFailed(Exception):
    """A service's body raised: the process stopped because of it."""

    def __init__(self, name: str, cause: BaseException) -> None:
        super().__init__(f"{name} failed: {type(cause).__name__}: {cause}")
        self.name = name


class Shutdown:
    """Stopping a process in three steps (see the module's docstring); ``process`` names it in the log.

    ``interrupt`` is called as the shutdown begins, for calls that wait outside any work in hand
    (a consumer's long polls); ``hard_stop`` when the work in hand outlived its budget and the grace.
    """

    def __init__(
        self,
        budget: float,
        process: str,
        hard_stop: Callable[[], None],
        interrupt: Callable[[], None] | None = None,
    ) -> None:
        self.budget = budget
        self.process = process
        self.hard_stop = hard_stop
        self.interrupt = interrupt
        self.abandoned = f"abandoned: {process} shutting down"  # the error of work cut off
        self.stopping = threading.Event()  # no new work
        self.abandoning = threading.Event()  # the work in hand is cut off and given back
        self.stopped = threading.Event()  # every service has ended
        self._begun = False
        self._lock = threading.RLock()  # reentrant: a signal handler may interrupt begin() in the main thread

    def begin(self, why: str) -> None:
        with self._lock:
            if self._begun:
                return
            self._begun = True
        log.info("%s stopping (%s); work in hand has %gs", self.process, why, self.budget)
        self.stopping.set()
        threading.Thread(target=self._watch, name="shutdown", daemon=True).start()
        if self.interrupt is not None:
            self.interrupt()

    def install_signal_handlers(self) -> None:
        """SIGTERM (a PaaS restart) and SIGINT begin the shutdown."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            self.begin(f"signal {signal.Signals(signum).name}")

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _watch(self) -> None:
        if self.stopped.wait(self.budget):
            return
        log.warning("%s: work in hand did not finish within %gs: abandoning it", self.process, self.budget)
        self.abandoning.set()
        Deadline.expire_all(self.abandoned)
        if not self.stopped.wait(HARD_STOP_GRACE):
            self.hard_stop()


class _Running:
    """One service in one run: its stop event, its thread, and how it ended."""

    def __init__(self, service: Service, ended: threading.Event) -> None:
        self.service = service
        self.stopping = threading.Event()
        self.failure: BaseException | None = None
        self._ended = ended
        self.thread = threading.Thread(target=self._body, name=service.name, daemon=True)

    def _body(self) -> None:
        try:
            self.service.run(self.stopping)
        except BaseException as exc:  # whatever it was, the process must hear of it
            self.failure = exc
        finally:
            self._ended.set()


class Services:
    """``services`` run together under ``shutdown``; see the module's docstring."""

    def __init__(self, services: Sequence[Service], shutdown: Shutdown) -> None:
        self.services = tuple(services)
        self.shutdown = shutdown

    def run(self) -> None:
        """Start every service, wait until one ends or the shutdown begins, stop them all.

        Raises :class:`ServiceFailed` for the first service that failed.
        """
        ended = threading.Event()
        running = [_Running(service, ended) for service in self.services]
        self.shutdown.stopped.clear()
        for each in running:
            each.thread.start()
        # Polled, not one long wait: the main thread must stay free to run signal handlers.
        while not self.shutdown.stopping.wait(_CHECK) and not ended.is_set():
            pass
        first = next((each for each in running if each.failure is not None), None)
        if first is not None:
            self._report(first)
            self.shutdown.begin(f"{first.service.name} failed")
        for each in reversed(running):
            each.stopping.set()
            each.thread.join()
        self.shutdown.stopped.set()
        failed = [each for each in running if each.failure is not None]
        for each in failed:
            if each is not first:
                self._report(each)  # failed while stopping
        if failed:
            first = first or failed[0]
            assert first.failure is not None
            raise ServiceFailed(first.service.name, first.failure)

    def _report(self, each: _Running) -> None:
        log.error("service %s failed: the %s stops", each.service.name, self.shutdown.process, exc_info=each.failure)
