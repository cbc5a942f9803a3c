"""The ceiling ``ingest.py`` compares the callback endpoint with: Flask under gunicorn doing nothing else.

It reads the body, as any receiver must, and answers 200 with a small JSON document; it stores,
parses and logs nothing. Served by ``gunicorn bare_flask:app`` from this directory.
"""

from __future__ import annotations

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

app = Flask(__name__)


@app.post("/callback/<token>")
def callback(token: str) -> ResponseReturnValue:
    body = request.get_data(cache=False)
    return jsonify(received=len(body)), 200


@app.get("/healthz")
def healthz() -> ResponseReturnValue:
    return jsonify(status="ok"), 200
