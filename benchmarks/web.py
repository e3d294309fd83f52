"""Web middleware overhead: requests/s of a one-query app, with polydatum and written by hand.

Run: python benchmarks/web.py [--quick]     (DATABASE_URL overrides the server)

Each app answers ``GET /item`` with the name of one row read by primary key
from PostgreSQL, and commits:

  WSGI (werkzeug.serving, threaded)
    polydatum   PolydatumWSGIMiddleware around a werkzeug app calling ``dal.items.get(1)``
                (session resource, transaction middleware, Store)
    by hand     the same werkzeug app opening a SQLAlchemy Session per request:
                ``session.get(Item, 1); session.commit(); session.close()``
  ASGI (uvicorn)
    polydatum   PolydatumASGIMiddleware around a bare ASGI app awaiting
                ``dal.items.get(1)`` (AsyncDatabase, AsyncStore)
    by hand     the same ASGI app with an AsyncSession per request

A third app of each kind opens the context itself, ``with dm.dal() as dal:``
in the view, without the middleware: "middleware alone" is polydatum's
req/s over that one's, the cost of the web middleware apart from the
context, the session resource and the Store it shares with it.

Every server runs in a process of its own, all at once; one Python load
client (threads, raw sockets, keep-alive where the server allows it: the
werkzeug development server closes every connection) drives one server at a
time. Rounds are short and interleaved, the order flipping every round; the
ratio is the median over rounds of polydatum's req/s over the hand-written
app's in the same round, which keeps the machine's drift out of it. The
server process's CPU time per request (from /proc) is printed too: on a
shared machine it is steadier than req/s, which also measures whoever
else is using the cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import String, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

URL = os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
QUICK = "--quick" in sys.argv
ROUNDS = 4 if QUICK else 10
SECONDS = 1.0 if QUICK else 2.0
CONCURRENCY = 16
# Children inherit it, so every process uses the same table of this run's own.
TABLE = os.environ.setdefault("POLYDATUM_BENCH_WEB_TABLE", f"bench_web_{os.getpid()}")
POOL = {"pool_size": CONCURRENCY + 4, "max_overflow": 0}


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


# -- the four apps (each built in its server process) ------------------------------


def sync_data_manager() -> Any:
    from polydatum import DataManager
    from polydatum.sqlalchemy import Database, Store

    class Items(Store[Item]):
        pass

    dm = DataManager()
    Database(URL, **POOL).install(dm)
    dm.register_services(items=Items())
    return dm


def wsgi_polydatum() -> Any:
    from werkzeug.wrappers import Request, Response

    from polydatum.werkzeug import PolydatumWSGIMiddleware

    dm = sync_data_manager()
    dal = dm.get_dal()

    @Request.application  # type: ignore[arg-type]
    def app(request: Request) -> Response:
        return Response(dal.items.get(1).name)

    return PolydatumWSGIMiddleware(app, dm)


def wsgi_dal_in_view() -> Any:
    from werkzeug.wrappers import Request, Response

    dm = sync_data_manager()

    @Request.application  # type: ignore[arg-type]
    def app(request: Request) -> Response:
        with dm.dal() as dal:
            name = dal.items.get(1).name
        return Response(name)

    return app


def wsgi_by_hand() -> Any:
    from sqlalchemy.orm import sessionmaker
    from werkzeug.wrappers import Request, Response

    Session = sessionmaker(create_engine(URL, pool_pre_ping=True, **POOL), expire_on_commit=False)

    @Request.application  # type: ignore[arg-type]
    def app(request: Request) -> Response:
        session = Session()
        try:
            name = session.get(Item, 1).name  # type: ignore[union-attr]
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()
        return Response(name)

    return app


Send = Callable[[dict[str, Any]], Any]


async def _answer(send: Send, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Any, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def async_data_manager() -> Any:
    from polydatum import DataManager
    from polydatum.sqlalchemy import AsyncDatabase, AsyncStore

    class Items(AsyncStore[Item]):
        pass

    dm = DataManager()
    AsyncDatabase(URL, **POOL).install(dm)
    dm.register_services(items=Items())
    return dm


def asgi_dal_in_view() -> Any:
    dm = async_data_manager()

    async def app(scope: Any, receive: Any, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        async with dm.dal() as dal:
            item = await dal.items.get(1)
        await _answer(send, item.name.encode())

    return app


def asgi_polydatum() -> Any:
    from polydatum.asgi import PolydatumASGIMiddleware

    dm = async_data_manager()
    dal = dm.get_dal()

    async def app(scope: Any, receive: Any, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        item = await dal.items.get(1)
        await _answer(send, item.name.encode())

    return PolydatumASGIMiddleware(app, dm)


def asgi_by_hand() -> Any:
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    Session = async_sessionmaker(create_async_engine(URL, pool_pre_ping=True, **POOL), expire_on_commit=False)

    async def app(scope: Any, receive: Any, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        session = Session()
        try:
            item = await session.get(Item, 1)
            await session.commit()
        except BaseException:
            await session.rollback()
            raise
        finally:
            await session.close()
        await _answer(send, item.name.encode())  # type: ignore[union-attr]

    return app


APPS: dict[str, Callable[[], Any]] = {
    "wsgi-polydatum": wsgi_polydatum,
    "wsgi-dal-in-view": wsgi_dal_in_view,
    "wsgi-by-hand": wsgi_by_hand,
    "asgi-polydatum": asgi_polydatum,
    "asgi-dal-in-view": asgi_dal_in_view,
    "asgi-by-hand": asgi_by_hand,
}
VARIANTS = ("polydatum", "dal-in-view", "by-hand")


def serve(kind: str, port: int) -> None:
    """Run one app's server in this process (``--serve KIND PORT``)."""
    app = APPS[kind]()
    if kind.startswith("wsgi"):
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        make_server("127.0.0.1", port, app, threaded=True, request_handler=Quiet).serve_forever()
    else:
        import uvicorn

        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, backlog=1024)


# -- the load client -------------------------------------------------------------------

REQUEST = b"GET /item HTTP/1.1\r\nHost: bench\r\n\r\n"


def one_request(sock: socket.socket) -> bool:
    """Send a request and read the response; True if the server keeps the connection."""
    sock.sendall(REQUEST)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection before answering")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    if not lines[0].startswith(b"http/1.1 200"):
        raise RuntimeError(f"unexpected answer: {head!r}")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection mid-body")
        body += chunk
    return b"connection: close" not in lines


def load(port: int, seconds: float) -> tuple[float, int]:
    """Requests/s and requests done by ``CONCURRENCY`` client threads hammering ``port``."""
    counts = [0] * CONCURRENCY
    errors: list[BaseException] = []
    start = threading.Barrier(CONCURRENCY + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        start.wait()
        sock: socket.socket | None = None
        try:
            while time.monotonic() < stop_at[0]:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", port))
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if not one_request(sock):
                    sock.close()
                    sock = None
                counts[i] += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            if sock is not None:
                sock.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    began = time.monotonic()
    stop_at[0] = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    if errors:
        raise errors[0]
    return sum(counts) / elapsed, sum(counts)


# -- the run ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server on port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                one_request(sock)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the server on port {port} did not answer within 30 s")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def compare(kind: str, ports: dict[str, int], pids: dict[str, int]) -> dict[str, float]:
    for variant in VARIANTS:
        load(ports[f"{kind}-{variant}"], 0.5)  # warm-up: pools filled, code paths hot
    rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    cpu: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    vs_hand, vs_in_view = [], []
    for round_ in range(ROUNDS):
        # Rotate the order, so no variant always runs first or last.
        order = VARIANTS[round_ % 3 :] + VARIANTS[: round_ % 3]
        got = {}
        for variant in order:
            name = f"{kind}-{variant}"
            before = cpu_seconds(pids[name])
            got[variant], done = load(ports[name], SECONDS)
            cpu[variant].append((cpu_seconds(pids[name]) - before) / done * 1e6)
        for variant, rate in got.items():
            rates[variant].append(rate)
        vs_hand.append(got["polydatum"] / got["by-hand"])
        vs_in_view.append(got["polydatum"] / got["dal-in-view"])
    result = {variant: median(values) for variant, values in rates.items()}
    result.update({f"cpu-{variant}": median(values) for variant, values in cpu.items()})
    result.update(ratio=median(vs_hand), middleware_ratio=median(vs_in_view))
    return result


def main() -> None:
    engine = create_engine(URL)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO \"{TABLE}\" (id, name) VALUES (1, 'one')"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = {kind: free_port() for kind in APPS}
        for kind, port in ports.items():
            procs.append(subprocess.Popen([sys.executable, __file__, "--serve", kind, str(port)]))
        for proc, port in zip(procs, ports.values(), strict=True):
            wait_ready(port, proc)
        pids = {kind: proc.pid for kind, proc in zip(ports, procs, strict=True)}
        print(
            f"{ROUNDS} interleaved rounds of {SECONDS:.0f} s each, {CONCURRENCY} client threads, "
            f"one PostgreSQL primary-key read per request; medians"
        )
        print(
            f"{'':<30} {'polydatum':>10} {'dm.dal() in view':>17} {'by hand':>10} "
            f"{'polydatum/by hand':>18} {'middleware alone':>17}"
        )
        results = {}
        for kind, label in (("wsgi", "WSGI (werkzeug.serving)"), ("asgi", "ASGI (uvicorn)")):
            r = results[kind] = compare(kind, ports, pids)
            print(
                f"{label + ' req/s':<30} {r['polydatum']:>10.0f} {r['dal-in-view']:>17.0f} "
                f"{r['by-hand']:>10.0f} {r['ratio']:>18.1%} {r['middleware_ratio']:>17.1%}"
            )
            ours, in_view, hand = r["cpu-polydatum"], r["cpu-dal-in-view"], r["cpu-by-hand"]
            print(
                f"{'  server CPU µs/request':<30} {ours:>10.0f} {in_view:>17.0f} {hand:>10.0f} "
                f"{hand / ours:>18.1%} {in_view / ours:>17.1%}"
            )
        if "--json" in sys.argv:
            print(json.dumps(results))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        Base.metadata.drop_all(engine)
        engine.dispose()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        main()
