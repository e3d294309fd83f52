"""An integration of your own: an HTTP API client as a polydatum resource.

docs/integrations/custom.md walks through this file; tests/examples/test_api_client.py
runs it against a real HTTP server. It has the four parts every integration has:

1. a **resource**: ``ctx.<name>`` is a client for the context, made on first use
   and closed when the context ends;
2. a **context middleware**: the library's errors that leave a context become
   polydatum errors with an HTTP status, which the web middleware answers with;
3. a **health check**: ``ping()`` is True when the API answers, False when not;
4. an **install** that wires both on a DataManager and returns the client.

Tests swap the resource with ``polydatum_overrides.resource(...)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx

from polydatum import DataAccessContext, ServiceError

if TYPE_CHECKING:
    from typing_extensions import Self

    from polydatum import ResourceRegistry


class ApiError(ServiceError):
    """The API answered with an error (HTTP 502 to our own clients)."""

    code = 502
    public_message = "the weather service failed; try again later"


class ApiUnavailable(ServiceError):
    """The API did not answer (HTTP 503 to our own clients)."""

    code = 503
    public_message = "the weather service is unreachable; try again later"


class ApiSession:
    """What a context gets as ``ctx.<name>``: the shared client, with the context's request id."""

    def __init__(self, client: httpx.Client, request_id: str | None) -> None:
        self._client = client
        self._headers = {"X-Request-Id": request_id} if request_id else {}
        self.calls = 0

    def get_json(self, path: str, **params: Any) -> Any:
        """GET ``path`` and return the decoded JSON body.

        Raises:
            httpx.HTTPStatusError: the API answered 4xx or 5xx.
            httpx.TransportError: it did not answer.
        """
        self.calls += 1
        response = self._client.get(path, params=params, headers=self._headers)
        response.raise_for_status()
        return response.json()


class ApiClient:
    """A client of one HTTP API, built once per process from configuration.

    Args:
        base_url: the API's root, e.g. ``"https://weather.example"``.
        timeout: seconds for each request.
        transport: an httpx transport; tests pass ``httpx.MockTransport(handler)``.
    """

    def __init__(
        self, base_url: str, *, timeout: float = 5.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        # One connection pool per process, shared by every context.
        self.client = httpx.Client(base_url=base_url, timeout=timeout, transport=transport)

    def resource(self, ctx: DataAccessContext) -> Iterator[ApiSession]:
        """The resource factory: one :class:`ApiSession` per context, made on first use."""
        yield ApiSession(self.client, ctx.meta.get("request_id"))

    def install(self, dm: ResourceRegistry, name: str = "weather") -> Self:
        """Register the resource ``name`` and the error middleware on ``dm``; return this client."""
        dm.register_resources(**{name: self.resource})
        dm.register_context_middleware(api_errors)
        return self

    def ping(self) -> bool:
        """True when the API answers ``GET /health`` with 200; False when it does not (never raises)."""
        try:
            return self.client.get("/health").status_code == httpx.codes.OK
        except httpx.TransportError:
            return False

    def close(self) -> None:
        """Close the connection pool (at shutdown)."""
        self.client.close()


def api_errors(ctx: DataAccessContext) -> Iterator[None]:
    """Context middleware: httpx errors leaving a context become :class:`ApiError` or :class:`ApiUnavailable`.

    The URL is left out of the message: a query string may hold an API key.
    """
    try:
        yield
    except httpx.HTTPStatusError as exc:
        msg = f"the weather API answered {exc.response.status_code} to {exc.request.url.path}"
        raise ApiError(msg) from exc
    except httpx.TransportError as exc:
        msg = f"the weather API did not answer ({type(exc).__name__})"
        raise ApiUnavailable(msg) from exc
