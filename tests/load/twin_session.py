"""A scripted session of requests, run against the notes example and its hand-written twin alike.

:func:`run_session` drives a WSGI app in-process (Werkzeug's test client),
or a served app through an ``httpx.Client``,
through ``REQUESTS`` requests chosen by a seeded random generator from the
answers so far: sign-ups (one with a taken name), notebooks, notes
created, read (cache misses and hits), edited (some at a stale version),
attached to, fetched and deleted (some at a stale version), and the error
paths around them (no token, a bad token, someone else's note, a bad body,
a bad version). It returns the transcript: method, path, status and body
of each request.
"""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
from werkzeug.test import Client

REQUESTS = 200
SEED = 1717


class Session:
    """The client side of the script: its users, their notes and attachments, and the transcript."""

    def __init__(self, app: Any) -> None:
        # A WSGI app in-process, or an httpx.Client of a served (ASGI) app.
        self.client = app if isinstance(app, httpx.Client) else Client(app)
        self.transcript: list[tuple[str, str, int, Any]] = []
        self.tokens: list[str] = []
        self.notebooks: list[int] = []
        self.notes: list[dict[int, int]] = []  # per user: note id -> version last seen
        self.attachments: list[list[int]] = []

    def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        payload: Any = None,
        data: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        body = data if data is not None else (None if payload is None else json.dumps(payload).encode())
        if isinstance(self.client, httpx.Client):
            sent = {**headers, "Content-Type": content_type} if body else headers
            answer = self.client.request(method, path, content=body, headers=sent)
            status, raw = answer.status_code, answer.content
            kind = answer.headers.get("content-type", "").partition(";")[0].strip()
        else:
            response = self.client.open(
                path, method=method, data=body, headers=headers, content_type=content_type if body else None
            )
            status, raw, kind = response.status_code, response.get_data(), response.mimetype
        parsed: Any = json.loads(raw) if kind == "application/json" and raw else raw
        self.transcript.append((method, path, status, parsed))
        return status, parsed

    def sign_up(self, name: str) -> None:
        status, body = self.call("POST", "/users", payload={"name": name})
        if status == 201:
            self.tokens.append(body["token"])
            _, notebook = self.call("POST", "/notebooks", token=body["token"], payload={"name": f"{name}'s"})
            self.notebooks.append(notebook["id"])
            self.notes.append({})
            self.attachments.append([])


def run_session(app: Any, requests: int = REQUESTS, seed: int = SEED) -> list[tuple[str, str, int, Any]]:
    """Drive ``app`` (a WSGI app, or an httpx.Client) through the script.

    Returns:
        the transcript: (method, path, status, body) of each request.
    """
    s = Session(app)
    rng = random.Random(seed)
    s.sign_up("ada")
    s.sign_up("grace")
    s.sign_up("ada")  # taken: 409
    s.call("POST", "/notebooks", payload={"name": "nobody's"})  # no token: 401
    s.call("POST", "/notebooks", token="1.forged", payload={"name": "x"})  # bad token: 401
    s.call("POST", "/notebooks", token=s.tokens[0], data=b"{not json")  # 400
    ops = ["create", "read", "read", "update", "attach", "fetch", "delete", "error"]
    weights = [4, 4, 2, 4, 2, 2, 2, 1]
    while len(s.transcript) < requests:
        user = rng.randrange(len(s.tokens))
        token, notes, attachments = s.tokens[user], s.notes[user], s.attachments[user]
        op = rng.choices(ops, weights)[0]
        if op != "create" and not notes:
            op = "create"
        note = rng.choice(sorted(notes)) if notes else 0
        if op == "create":
            words = " ".join(
                rng.choice(("alpha", "bravo", "delta", "echo")) for _ in range(rng.randint(0, 6))
            )
            status, body = s.call(
                "POST",
                f"/notebooks/{s.notebooks[user]}/notes",
                token=token,
                payload={"title": f"note {len(s.transcript)}", "text": words},
            )
            if status == 201:
                notes[body["id"]] = body["version"]
        elif op == "read":
            s.call("GET", f"/notes/{note}", token=token)
        elif op == "update":
            version = notes[note] - (1 if rng.random() < 0.25 else 0)
            payload: dict[str, Any] = {"version": version, "text": f"edited {rng.randint(0, 999)}"}
            if rng.random() < 0.3:
                payload["title"] = f"title {rng.randint(0, 99)}"
            status, body = s.call("PUT", f"/notes/{note}", token=token, payload=payload)
            if status == 200:
                notes[note] = body["version"]
        elif op == "attach":
            size = rng.randint(0, 3000)
            status, body = s.call(
                "POST",
                f"/notes/{note}/attachments?name=file-{len(s.transcript)}.bin",
                token=token,
                data=rng.randbytes(size),
                content_type=rng.choice(("application/octet-stream", "image/png")),
            )
            if status == 201:
                attachments.append(body["id"])
        elif op == "fetch" and attachments:
            s.call("GET", f"/attachments/{rng.choice(attachments)}", token=token)
        elif op == "delete":
            version = notes[note] - (1 if rng.random() < 0.3 else 0)
            status, _ = s.call("DELETE", f"/notes/{note}?version={version}", token=token)
            if status == 204:
                del notes[note]
        else:
            other = s.notes[1 - user] if len(s.tokens) > 1 else {}
            choice = rng.randrange(7)
            if choice == 0 and other:
                s.call("GET", f"/notes/{sorted(other)[0]}", token=token)  # someone else's: 404
            elif choice == 1:
                s.call("PUT", f"/notes/{note}", token=token, payload={"version": "1", "text": "x"})  # 400
            elif choice == 2:
                s.call("DELETE", f"/notes/{note}?version=abc", token=token)  # 400
            elif choice == 3:
                s.call("GET", f"/notes/{note}")  # no token: 401
            elif choice == 4:
                s.call("POST", f"/notes/{note}/attachments", token=token, data=b"x")  # no name: 400
            elif choice == 5:
                status, body = s.call(
                    "PUT", f"/notes/{note}", token=token, payload={"version": notes[note], "text": ""}
                )
                if status == 200:
                    notes[note] = body["version"]
            else:
                s.call("GET", "/notes/999999", token=token)  # missing: 404
    return s.transcript
