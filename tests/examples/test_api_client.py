"""examples/api_client.py, the integration of docs/integrations/custom.md, against a real HTTP server."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from werkzeug.wrappers import Request, Response

from polydatum import DataManager, Service
from polydatum.testing import Overrides
from tests.examples.conftest import serving

_PATH = Path(__file__).resolve().parents[2] / "examples" / "api_client.py"
_SPEC = importlib.util.spec_from_file_location("api_client", _PATH)
assert _SPEC is not None
assert _SPEC.loader is not None
api_client = importlib.util.module_from_spec(_SPEC)
sys.modules["api_client"] = api_client
_SPEC.loader.exec_module(api_client)
ApiClient = api_client.ApiClient
ApiError = api_client.ApiError
ApiUnavailable = api_client.ApiUnavailable


class Forecasts(Service):
    """The service the docs' example calls the API from."""

    def tomorrow(self, city: str) -> str:
        """Tomorrow's forecast for ``city``."""
        return str(self._ctx.weather.get_json("/forecast", city=city)["tomorrow"])


class WeatherApi:
    """A tiny weather API served by Werkzeug; it records the request ids it was sent."""

    def __init__(self) -> None:
        self.request_ids: list[str | None] = []

    @Request.application  # type: ignore[arg-type]
    def __call__(self, request: Request) -> Response:
        self.request_ids.append(request.headers.get("X-Request-Id"))
        if request.path == "/health":
            return Response("ok")
        if request.path == "/forecast" and request.args.get("city") == "oslo":
            return Response(json.dumps({"tomorrow": "snow"}), content_type="application/json")
        return Response("no such city", status=500)


@pytest.fixture(name="served", scope="module")
def fixture_served() -> Iterator[tuple[WeatherApi, str]]:
    """One server for the module (stopping one takes half a second)."""
    api = WeatherApi()
    with serving(api) as url:
        yield api, url


@pytest.fixture(name="api")
def fixture_api(served: tuple[WeatherApi, str]) -> WeatherApi:
    served[0].request_ids.clear()
    return served[0]


@pytest.fixture(name="base_url")
def fixture_base_url(api: WeatherApi, served: tuple[WeatherApi, str]) -> str:
    return served[1]


@pytest.fixture(name="client")
def fixture_client(base_url: str) -> Iterator[Any]:
    client = ApiClient(base_url, timeout=5)
    yield client
    client.close()


def wired(client: Any) -> DataManager:
    dm = DataManager()
    assert client.install(dm) is client
    dm.register_services(forecasts=Forecasts())
    return dm


def closed_port_url() -> str:
    with socket.socket() as sock:  # bound, never listening: connections are refused at once
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


class TestResource:
    def test_a_service_calls_the_api_through_the_resource(self, client: Any, api: WeatherApi) -> None:
        """ctx.weather reaches the real server and sends the context's request id."""
        dm = wired(client)
        with dm.dal(meta={"request_id": "req-1"}) as dal:
            assert dal.forecasts.tomorrow("oslo") == "snow"
        assert api.request_ids == ["req-1"]

    def test_each_context_gets_its_own_session(self, client: Any) -> None:
        """Two contexts get two sessions, each counting only its own calls."""
        dm = wired(client)
        sessions = []
        for _ in range(2):
            with dm.context() as ctx:
                ctx.dal.forecasts.tomorrow("oslo")
                sessions.append(ctx.weather)
        assert sessions[0] is not sessions[1]
        assert [s.calls for s in sessions] == [1, 1]


class TestErrorMiddleware:
    def test_an_api_error_becomes_a_502_service_error(self, client: Any) -> None:
        """A 500 from the API leaves the context as ApiError (code 502), naming the path, not the query."""
        dm = wired(client)
        with pytest.raises(ApiError, match=r"answered 500 to /forecast$") as info, dm.dal() as dal:
            dal.forecasts.tomorrow("atlantis?key=secret")
        assert info.value.code == 502
        assert "secret" not in str(info.value)
        assert isinstance(info.value.__cause__, httpx.HTTPStatusError)

    def test_an_api_that_is_down_becomes_a_503(self) -> None:
        """An API that refuses connections leaves the context as ApiUnavailable (code 503)."""
        client = ApiClient(closed_port_url(), timeout=2)
        dm = wired(client)
        with pytest.raises(ApiUnavailable, match="did not answer") as info, dm.dal() as dal:
            dal.forecasts.tomorrow("oslo")
        assert info.value.code == 503
        client.close()


class TestHealth:
    def test_ping_is_true_when_the_api_answers(self, client: Any) -> None:
        """ping() is True against the running server."""
        assert client.ping() is True

    def test_ping_is_false_when_the_api_is_down(self) -> None:
        """ping() is False, not an exception, when nothing listens."""
        client = ApiClient(closed_port_url(), timeout=2)
        assert client.ping() is False
        client.close()


@pytest.fixture(name="polydatum_data_manager")
def fixture_polydatum_data_manager(client: Any) -> DataManager:
    """The DataManager polydatum's pytest fixtures use in this module."""
    return wired(client)


def test_a_test_swaps_the_api_for_a_fake(
    polydatum_overrides: Overrides, polydatum_dal: Any, api: WeatherApi
) -> None:
    """polydatum_overrides.resource() serves ctx.weather from a fake transport: the real API is not called."""

    def fake_api(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"tomorrow": "sun"})

    fake = ApiClient("http://weather.test", transport=httpx.MockTransport(fake_api))
    polydatum_overrides.resource("weather", fake.resource)
    assert polydatum_dal.forecasts.tomorrow("oslo") == "sun"
    assert api.request_ids == []
