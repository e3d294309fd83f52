"""The live page of recent contexts: ``/_polydatum``
==================================================

:class:`DebugPage` serves what a :class:`~polydatum.recorder.Recorder`
kept, as plain HTML (no script at all): ``/_polydatum`` lists the last
contexts (what opened each, its duration and outcome, its DAL calls, SQL
statements, cache hits and misses, blob operations, hook errors), and
``/_polydatum/<id>`` draws one context's timeline as an SVG waterfall.
Every other request goes to the wrapped application::

    from polydatum.debug import DebugPage
    from polydatum.recorder import Recorder

    recorder = Recorder().install(dm)
    app = DebugPage(recorder, PolydatumWSGIMiddleware(app, dm))   # the page outside the contexts

**Only for development.** The page shows service paths, timings, request
ids and error types to whoever can reach it, without authentication; turn
it on behind a flag (the example app's ``serve --debug``) on a loopback
address, never in production.

.. versionadded:: 2.0
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

try:
    from werkzeug.wrappers import Request, Response
except ImportError:  # pragma: no cover - exercised only without the extra
    msg = 'polydatum.debug needs Werkzeug; install it with: pip install "polydatum[werkzeug]"'
    raise ImportError(msg) from None

from polydatum.recorder import CallRecord, ContextRecord, Recorder

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["PREFIX", "DebugPage"]

#: Where the page is served unless told otherwise.
PREFIX = "/_polydatum"

# No script may run on the page, whatever a record holds; only inline styles.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}
NONE = "\u2013"  # an en dash: shown where there is nothing (not counted, no error)
_LIST_CALLS = 6  # calls named per context in the list; the timeline has them all

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2329; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } p.note { color: #5b6670; margin: 0 0 1em; }
table { border-collapse: collapse; width: 100%; } th, td { padding: .35em .6em; vertical-align: top; }
th { text-align: left; border-bottom: 2px solid #ccd3da; font-weight: 600; white-space: nowrap; }
td { border-bottom: 1px solid #e3e8ec; } .num { text-align: right; font-variant-numeric: tabular-nums; }
table#calls { width: auto; }
tr.rollback td.outcome { color: #b3261e; font-weight: 600; } td.outcome { color: #1b7f3b; }
ul.calls { margin: 0; padding: 0; list-style: none; } .ms { color: #5b6670; }
.error { color: #b3261e; } code { font-size: 13px; } a { color: #0b57d0; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dt { color: #5b6670; } dd { margin: 0; }
svg text { font: 12px system-ui, sans-serif; fill: #1d2329; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _ms(seconds: float | None) -> str:
    return "unfinished" if seconds is None else f"{seconds * 1000:.1f} ms"


def _counter(record: ContextRecord, *names: str) -> str:
    counts = record.counts
    if not any(name in counts for name in names):
        return NONE  # not counted for this context (no such integration installed)
    return _e("/".join(str(counts.get(name, 0)) for name in names))


def _blob_ops(record: ContextRecord) -> str:
    # ``blob.<op>`` counts operations; ``blob.<op>.bytes``, where there is one, their bytes.
    counts = record.counts
    ops = []
    for name, n in sorted(counts.items()):
        if name.startswith("blob.") and not name.endswith(".bytes"):
            size = counts.get(name + ".bytes")
            ops.append(f"{name[5:]} {n}" + (f" ({size} B)" if size is not None else ""))
    return ", ".join(ops) if ops else NONE


def _short(request_id: str | None) -> str:
    # The list shows the start of the id (the full one is its title and on the context's page).
    if not request_id:
        return ""
    return request_id if len(request_id) <= 12 else request_id[:12] + "…"


def _page(title: str, body: str, refresh: int | None = None) -> str:
    # A meta refresh is the page's only "live" part: no script is allowed on it.
    reload = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">{reload}'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def _started(record: ContextRecord) -> str:
    stamp = time.strftime("%H:%M:%S", time.gmtime(record.started_at))
    return f"{stamp}.{int(record.started_at * 1000) % 1000:03d}"


def render_list(recorder: Recorder, base: str, refresh: int | None = None) -> str:
    """The list page: the kept contexts, newest first (every value escaped).

    Args:
        recorder: whose contexts to list.
        base: the page's URL path (links go to ``base/<id>``).
        refresh: reload the page every so many seconds (None: never).
    """
    rows = []
    for record in recorder.contexts():
        calls = "".join(
            f'<li><code class="call-name">{_e(call.name)}</code> <span class="ms">{_e(_ms(call.duration))}'
            f"</span>{' <span class=error>' + _e(call.error) + '</span>' if call.error else ''}</li>"
            for call in record.calls[:_LIST_CALLS]
        )
        more = len(record.calls) - _LIST_CALLS + record.calls_dropped
        if more > 0:
            calls += f'<li class="ms">and {more} more</li>'
        rows.append(
            f'<tr class="context {_e(record.outcome)}" data-id="{record.id}">'
            f'<td class="num"><a href="{_e(base)}/{record.id}">#{record.id}</a></td>'
            f"<td>{_started(record)}</td>"
            f'<td class="name"><a href="{_e(base)}/{record.id}">{_e(record.name)}</a></td>'
            f'<td class="num">{_e(_ms(record.duration))}</td>'
            f'<td class="outcome">{_e(record.outcome)}'
            f"{'<br><span class=error>' + _e(record.error) + '</span>' if record.error else ''}</td>"
            f'<td><ul class="calls">{calls}</ul></td>'
            f'<td class="num sql">{_counter(record, "sql")}</td>'
            f'<td class="num cache">{_counter(record, "cache.hit", "cache.miss")}</td>'
            f'<td class="blobs">{_e(_blob_ops(record))}</td>'
            f'<td class="num hook-errors">{record.hook_errors}</td>'
            f'<td><code class="request-id" title="{_e(record.request_id or "")}">'
            f"{_e(_short(record.request_id))}</code></td></tr>"
        )
    table = (
        '<table id="contexts"><thead><tr><th>#</th><th>started (UTC)</th><th>context</th>'
        "<th>duration</th><th>outcome</th><th>DAL calls</th><th>SQL</th><th>cache hit/miss</th>"
        "<th>blobs</th><th>hook errors</th><th>request id</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else '<p id="empty">No context has finished yet: make a request, then reload.</p>'
    )
    reloading = (
        f'Reloads every {int(refresh)} s (<a href="{_e(base)}">stop</a>)'
        if refresh
        else f'Reload to refresh (or <a href="{_e(base)}?refresh=5">every 5 s</a>)'
    )
    body = (
        "<h1>polydatum: recent contexts</h1>"
        f'<p class="note">The last {len(rows)} of at most {recorder.limit} kept, newest first; '
        f'<span id="running">{recorder.running()}</span> running now. {reloading}; '
        "click a context for its timeline.</p>" + table
    )
    return _page("polydatum: recent contexts", body, refresh)


def _waterfall(record: ContextRecord) -> str:
    """One context as an SVG waterfall: a row for the context, then one per DAL call."""
    label_width, bar_width, row = 260, 640, 24
    right = 90  # room for the last bar's duration
    ends = [record.duration, record.ended]
    ends += [call.start + (call.duration or 0.0) for call in record.calls]
    scale = max(max(ends), 1e-9)

    def x(seconds: float) -> float:
        return label_width + seconds / scale * bar_width

    def bar(
        y: int, start: float, length: float | None, fill: str, label: str, title: str, depth: int = 0
    ) -> str:
        width = max((length if length is not None else scale - start) / scale * bar_width, 1.5)
        return (
            f'<g class="row"><title>{_e(title)}</title>'
            f'<text x="{4 + 14 * min(depth, 12)}" y="{y + 16}">{_e(label)}</text>'
            f'<rect x="{x(start):.1f}" y="{y + 4}" width="{width:.1f}" height="{row - 8}" rx="2" '
            f'fill="{fill}"/>'
            f'<text x="{x(start) + width + 4:.1f}" y="{y + 16}">'
            f"{_e(_ms(length))}</text></g>"
        )

    colour = "#1b7f3b" if record.outcome == "commit" else "#b3261e"
    rows = [bar(0, 0.0, record.duration, colour, record.name[:40], f"{record.name}: {record.outcome}")]
    for i, call in enumerate(record.calls, start=1):
        rows.append(
            bar(
                i * row,
                call.start,
                call.duration,
                "#b3261e" if call.error else "#0b57d0",
                call.name[:36],
                f"{call.name}" + (f" raised {call.error}" if call.error else ""),
                call.depth,
            )
        )
    height = (len(record.calls) + 1) * row + 20
    commit, done = x(record.ended), x(record.duration)
    # After the commit (or rollback) line: the on_commit/on_rollback hooks, shaded.
    label = f"{record.outcome}, then hooks" if done - commit >= 1 else record.outcome
    # The label goes left of the line when the line is near the right edge.
    anchor = ("end", commit - 3) if commit > label_width + 0.7 * bar_width else ("start", commit + 3)
    marker = (
        f'<rect class="hooks" x="{commit:.1f}" y="0" width="{max(done - commit, 0):.1f}" '
        f'height="{height - 16}" fill="#5b6670" fill-opacity="0.08"/>'
        f'<line x1="{commit:.1f}" y1="0" x2="{commit:.1f}" y2="{height - 16}" stroke="#5b6670" '
        f'stroke-dasharray="4 3"/><text text-anchor="{anchor[0]}" x="{anchor[1]:.1f}" y="{height - 4}">'
        f"{_e(label)}</text>"
    )
    return (
        f'<svg id="waterfall" xmlns="http://www.w3.org/2000/svg" width="{label_width + bar_width + right}" '
        f'height="{height}" role="img" aria-label="timeline of context #{record.id}">'
        f"{''.join(rows)}{marker}</svg>"
    )


def _call_row(call: CallRecord) -> str:
    return (
        f'<tr class="call"><td><code class="call-name">{"&nbsp;&nbsp;" * call.depth}'
        f"{_e(call.name)}</code></td>"
        f'<td class="num">{call.start * 1000:.1f} ms</td><td class="num">{_e(_ms(call.duration))}</td>'
        f'<td class="error">{_e(call.error or "")}</td></tr>'
    )


def render_detail(recorder: Recorder, record: ContextRecord, base: str) -> str:
    """One context's page: its facts, its waterfall and its calls (every value escaped)."""
    dropped = f" ({record.calls_dropped} more not kept)" if record.calls_dropped else ""
    facts = (
        f'<dl class="facts"><dt>outcome</dt><dd class="outcome">{_e(record.outcome)}</dd>'
        f"<dt>error</dt><dd class='error'>{_e(record.error or NONE)}</dd>"
        f"<dt>started (UTC)</dt><dd>{_started(record)}</dd>"
        f"<dt>commit or rollback after</dt><dd>{_e(_ms(record.ended))}</dd>"
        f"<dt>hooks done after</dt><dd>{_e(_ms(record.duration))}</dd>"
        f"<dt>DAL calls</dt><dd>{len(record.calls)}{dropped}</dd>"
        f"<dt>SQL statements</dt><dd>{_counter(record, 'sql')}</dd>"
        f"<dt>cache hit/miss</dt><dd>{_counter(record, 'cache.hit', 'cache.miss')}</dd>"
        f"<dt>blob operations</dt><dd>{_e(_blob_ops(record))}</dd>"
        f'<dt>hook errors</dt><dd class="hook-errors">{record.hook_errors}</dd>'
        f"<dt>request id</dt><dd><code>{_e(record.request_id or NONE)}</code></dd></dl>"
    )
    calls = "".join(_call_row(call) for call in record.calls)
    body = (
        f'<p><a href="{_e(base)}">← recent contexts</a></p>'
        f'<h1>#{record.id} <span class="name">{_e(record.name)}</span></h1>{facts}'
        f"<h2>Timeline</h2>{_waterfall(record)}"
        '<h2>DAL calls</h2><table id="calls"><thead><tr><th>call</th><th class="num">start</th>'
        '<th class="num">duration</th>'
        f"<th>error</th></tr></thead><tbody>{calls}</tbody></table>"
    )
    return _page(f"polydatum: #{record.id} {record.name}", body)


class DebugPage:
    """A WSGI application serving a recorder's page under ``prefix``, and ``app`` elsewhere.

    Args:
        recorder: the recorder to show.
        app: the application every other request goes to; None answers 404.
        prefix: where the page lives (default ``/_polydatum``).

    Raises:
        ValueError: ``prefix`` does not start with ``/`` or ends with one.

    .. versionadded:: 2.0
    """

    def __init__(self, recorder: Recorder, app: WSGIApplication | None = None, prefix: str = PREFIX) -> None:
        if not prefix.startswith("/") or prefix.endswith("/"):
            msg = f"prefix must start with '/' and not end with one, like '/_polydatum'; got {prefix!r}"
            raise ValueError(msg)
        self.recorder = recorder
        self.app = app
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"<DebugPage {self.prefix} of {self.recorder!r}>"

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        prefix = self.prefix
        if path != prefix and not path.startswith(prefix + "/"):
            if self.app is not None:
                return self.app(environ, start_response)
            return self._text(404, "not found")(environ, start_response)
        return self.respond(Request(environ), path[len(prefix) :].strip("/"))(environ, start_response)

    def respond(self, request: Request, rest: str) -> Response:
        """The page's response for ``rest``, the path after the prefix."""
        if request.method not in ("GET", "HEAD"):
            response = self._text(405, "the page only answers GET")
            response.headers["Allow"] = "GET, HEAD"
            return response
        base = request.script_root + self.prefix
        if not rest:
            refresh = request.args.get("refresh")
            if refresh is None:
                return self._html(render_list(self.recorder, base))
            if not (
                refresh.isascii() and refresh.isdigit() and len(refresh) <= 3 and 1 <= int(refresh) <= 600
            ):
                return self._text(400, "refresh must be a number of seconds from 1 to 600, like ?refresh=5")
            return self._html(render_list(self.recorder, base, int(refresh)))
        # At most 18 digits: an int, never a huge number parsed from a client's path.
        if not (rest.isascii() and rest.isdigit() and len(rest) <= 18):
            return self._text(404, f"no such page; the contexts are at {base}")
        record = self.recorder.get(int(rest))
        if record is None:
            return self._text(
                404, f"context #{rest} is not kept (only the last {self.recorder.limit} are); see {base}"
            )
        return self._html(render_detail(self.recorder, record, base))

    @staticmethod
    def _html(text: str) -> Response:
        return Response(text, mimetype="text/html", headers=_HEADERS)

    @staticmethod
    def _text(status: int, text: str) -> Response:
        return Response(text + "\n", status=status, mimetype="text/plain", headers=_HEADERS)
