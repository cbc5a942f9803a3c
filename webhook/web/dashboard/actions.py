"""What the dashboard changes: logging in and out, and replays (each confirmed on a page of its own)."""

from __future__ import annotations

import logging

from flask import current_app, flash, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from webhook.ledger import LedgerError
from webhook.web.common import runtime
from webhook.web.dashboard.auth import log_in, log_out, password_matches
from webhook.web.dashboard.blueprint import bp, local_target
from webhook.worker.replay import replay_job, replay_letter

log = logging.getLogger(__name__)

MAX_ITEMS = 1000  # replays asked for in one form


@bp.route("/login", methods=["GET", "POST"])
def login() -> BaseResponse | tuple[str, int]:
    target = local_target(request.values.get("next"), url_for("dashboard.overview"))
    if request.method == "GET":
        return render_template("login.html", target=target, failed=False), 200
    password = runtime(current_app).settings.dashboard_password
    if not password_matches(request.form.get("password", ""), password):
        log.warning("dashboard login failed from %s", request.remote_addr)
        # Nothing about why: not whether the password was close, long enough, or anything else.
        return render_template("login.html", target=target, failed=True), 401
    log_in()
    log.info("dashboard login from %s", request.remote_addr)
    return redirect(target, 303)


@bp.post("/logout")
def logout() -> BaseResponse:
    log_out()
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
        return render_template(
            "confirm.html", page="dead" if mode == "dead" else "jobs", mode=mode, items=items, back=back
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
            flash(f"{job_id} will be verified again, then delivered to every sink that takes it.")
        else:
            flash(f"Replay of {job_id} scheduled for: {', '.join(replayed.sinks) or 'no sink'}.")


def _asker() -> str:
    """Who asked for a replay, as the job's timeline names it."""
    return f"dashboard {request.remote_addr}"
