"""The sandbox's own control endpoint, :data:`FAULTS_PATH` on any host: a JSON API to list, add and
clear the :class:`~webhook.dev.sandbox.faults.Fault` rules of a running sandbox. It is answered before
routing and the signature check, and no fault applies to it (so an object of that name is out of reach).
"""

from __future__ import annotations

import json

from werkzeug.wrappers import Request, Response

from webhook.dev.sandbox.faults import Fault, Faults
from webhook.dev.sandbox.responses import json_response

FAULTS_PATH = "/_sandbox/faults"
_MAX_REQUEST = 64 * 1024


def faults_endpoint(faults: Faults, request: Request) -> Response:
    """GET lists the faults, POST adds one (or a JSON list), DELETE clears."""
    if request.method == "POST":
        try:
            data = json.loads(request.stream.read(_MAX_REQUEST))
            added = [Fault.from_dict(item) for item in (data if isinstance(data, list) else [data])]
        except ValueError as exc:  # FaultError and JSONDecodeError both are
            return json_response({"error": str(exc)}, 400)
        for fault in added:
            faults.add(fault)
    elif request.method == "DELETE":
        faults.clear()
    elif request.method != "GET":
        response = json_response({"error": f"{request.method} is not allowed here"}, 405)
        response.headers["Allow"] = "GET, POST, DELETE"
        return response
    return json_response({"faults": [active.to_dict() for active in faults.active]})
