"""What the dashboard changes: logging in and out, and replays (each confirmed on a page of its own)."""

from __future__ import annotations

import logging
import math

from flask import current_app, flash, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from webhook.ledger import LedgerError
from webhook.models import JobStatus, TaskKind
from webhook.web.common import runtime
from webhook.web.dashboard.auth import client_address, keys, log_in, log_out, login_wait, password_matches
from webhook.web.dashboard.blueprint import bp, local_target
from webhook.worker.replay import replay_job, replay_letter

log = logging.getLogger(__name__)

MAX_ITEMS = 1000  # replays asked for in one form


@bp.route("/login", methods=["GET", "POST"])
def login() -> BaseResponse | tuple[str, int, dict[str, str]]:
    target = local_target(request.values.get("next"), url_for("dashboard.overview"))
    if request.method == "GET":
        return render_template("login.html", target=target, failed=False, wait=0), 200, {}
    ledger = runtime(current_app).ledger
    if wait := math.ceil(login_wait(ledger)):
        # Before the password is looked at: a right one waits its turn too, or waiting would not slow guessing.
        log.warning("dashboard login refused from %s: too many wrong passwords, %d s to wait", client_address(), wait)
        return render_template("login.html", target=target, failed=False, wait=wait), 429, {"Retry-After": str(wait)}
    # Counted before the slow check, so that guesses sent in parallel see each other at once.
    attempts = ledger.sessions.login_attempt(client_address())
    if not password_matches(request.form.get("password", ""), keys(current_app).password):
        log.warning("dashboard login failed from %s (%d wrong in a row)", client_address(), attempts.count)
        # Nothing about why: not whether the password was close, long enough, or anything else.
        return render_template("login.html", target=target, failed=True, wait=0), 401, {}
    log_in(ledger)
    log.info("dashboard login from %s", client_address())
    return redirect(target, 303)


@bp.post("/logout")
def logout() -> BaseResponse:
    log_out(runtime(current_app).ledger)
    flash("Logged out.")
    return redirect(url_for("dashboard.login"), 303)


@bp.post("/replay")
def replay() -> BaseResponse | str:
    """Replays asked for by a form: ``job``/``sink`` pairs, shown for confirmation, then scheduled.

    ``mode=dead``: dead letters, each replayed like ``replay --dead`` does, if it is still dead
    by then. ``mode=job``: a job again to one sink, or (empty sink) as ``replay JOB_ID`` does.
    """
    mode = "dead" if request.form.get("mode") == "dead" else "job"
    items = list(zip(request.form.getlist("job"), request.form.getlist("sink"), strict=False))[:MAX_ITEMS]
    back = local_target(request.form.get("back"), url_for("dashboard.dead"))
    if request.form.get("confirm") != "yes":
        planned = [(job_id, sink, _what_happens(job_id, sink)) for job_id, sink in items]
        return render_template(
            "confirm.html", page="dead" if mode == "dead" else "jobs", mode=mode, items=planned, back=back
        )
    if mode == "dead":
        _replay_dead(set(items))
    else:
        _replay_jobs(items)
    return redirect(back, 303)


def _replay_dead(wanted: set[tuple[str, str]]) -> None:
    ledger = runtime(current_app).ledger
    letters = [d for d in ledger.views.dead_letters() if (d.job_id, d.sink or "") in wanted]
    failed: list[str] = []
    for letter in letters:
        try:
            replay_letter(ledger, letter, _asker())
        except LedgerError as exc:
            failed.append(str(exc))
    done = len(letters) - len(failed)
    log.info("dashboard replay: %d dead letters scheduled again by %s", done, request.remote_addr)
    message = f"{done} dead letter{'s' if done != 1 else ''} scheduled again."
    if gone := len(wanted) - len(letters):
        message += f" {gone} no longer dead, left alone."
    flash(message)
    for problem in failed:
        flash(problem, "error")


def _replay_jobs(items: list[tuple[str, str]]) -> None:
    rt = runtime(current_app)
    specs = {spec.name: spec for spec in rt.settings.sink_specs()}
    for job_id, sink in items:
        if sink and sink not in specs:
            flash(f"{job_id}: unknown sink {sink!r}; configured: {', '.join(specs) or 'none'}", "error")
            continue
        try:
            replayed = replay_job(rt.ledger, specs, job_id, [sink] if sink else (), _asker())
        except LedgerError as exc:
            flash(str(exc), "error")
            continue
        log.info("dashboard replay: job=%s sinks=%s by %s", job_id, ",".join(replayed.sinks), request.remote_addr)
        if replayed.verify:
            flash(f"{job_id} will be verified again: delivered if CI now confirms it, else rejected again.")
        else:
            flash(f"Replay of {job_id} scheduled for: {', '.join(replayed.sinks) or 'no sink'}.")


def _asker() -> str:
    """Who asked for a replay, as the job's timeline names it."""
    return f"dashboard {request.remote_addr}"


def _what_happens(job_id: str, sink: str) -> str:
    """What a replay of the job (to ``sink``, or as ``replay JOB_ID`` does) will really do, said before it is done."""
    rt = runtime(current_app)
    try:
        view = rt.ledger.views.show_job(job_id)
    except LedgerError as exc:
        return str(exc)
    delivering = [t for t in view.tasks if t.kind == TaskKind.DELIVER]
    if view.status == JobStatus.REJECTED or (view.status == JobStatus.DEAD and not delivering):
        against = f" ({view.reason})" if view.reason else ""
        return f"verified again against CI: delivered if CI now confirms it, else rejected again{against}"
    if sink:
        return f"delivered again to {sink}"
    if view.status in (JobStatus.RECEIVED, JobStatus.IGNORED):
        return f"nothing: the job is {view.status}"
    takers = [s.name for s in rt.settings.sink_specs() if view.job is not None and s.accepts(view.job)]
    return f"delivered again to {', '.join(takers)}" if takers else "nothing: no configured sink takes this job"
