"""Several HTTP processes in front of one model process: `python -m app.cli serve --front-workers N`.

One Python process parses HTTP on one core; a GPU serves far more than that. With front workers, `serve` starts
one **model host** (this machine's models, micro-batchers, device decode and style workers, as `serve` starts them)
and N uvicorn worker processes on the same port. Each front worker runs the whole API (the gate, validation,
problem details, readiness, the style API on the shared job store) with classification, text and faces replaced by
their remote twins (app/remote.py), whose calls cross a Unix socket to the host. Batches form in the host, across
the requests of every front worker, so the GPU sees one queue per model.

The protocol is private to one machine and one user: length-prefixed pickle frames, several calls in flight per
connection (one connection per front worker), the socket file readable only by its owner (pickle runs code on
load, so nothing else may connect). If the model host exits, `serve` stops the front workers and exits non-zero
(let the supervisor restart it); a front worker that loses its connection answers 503 until it is back. Each
front worker hands its own metrics to the host every REPORT_INTERVAL_S, so a scrape of any worker shows them all
(labelled `worker`) with the host's batchers (`replica="model-host"`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from app.apps import BUILTIN
from app.errors import ProblemError
from app.metrics import Metrics
from app.remote import REMOTE, ServiceHost, remote_twin
from app.settings import Settings

log = logging.getLogger("app.model_host")

_HEADER = struct.Struct("!Q")
MAX_SOCKET_PATH = 100  # Unix socket paths are limited to 107 bytes on Linux (less elsewhere)
CONNECT_PATIENCE_S = 900.0  # how long a front worker waits for the host's socket at start (model loading)
REPORT_INTERVAL_S = 2.0  # how often each front worker hands its own metrics to the host (for the others' scrapes)
REPORT_STALE_S = 30.0  # a front worker's metrics older than this are left out (it is gone)
_client_ids = itertools.count()


class HostUnavailable(ProblemError):
    """The model host does not answer (it is restarting, or gone)."""

    status = 503
    title = "Service unavailable"
    slug = "model-host-unavailable"


class HostError(RuntimeError):
    """The model host raised something other than a problem (a 500 there, so a 500 here)."""


def socket_path(settings: Settings) -> str:
    """Where the model host listens (CNN_MODEL_HOST_SOCKET, else in the data directory)."""
    path = settings.model_host_socket or str(Path(settings.data_dir) / "model-host.sock")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"the model host's socket path is {len(os.fsencode(path))} bytes, more than Unix sockets "
                         f"allow ({MAX_SOCKET_PATH}): set CNN_MODEL_HOST_SOCKET to a shorter path ({path})")
    return path


def _frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(size))  # only the socket's owner can connect


# -- the model host --------------------------------------------------------------------------------------------


class ModelHost:
    """Every application started as `serve` starts them, answering the front workers over a Unix socket."""

    def __init__(self, settings: Settings, path: str, host: ServiceHost | None = None) -> None:
        self.path = path
        self.host = host or ServiceHost(settings, BUILTIN)  # another host: the transport benchmark's stand-in
        self.reports: dict[str, tuple[float, str]] = {}  # front worker -> (when, its own metrics exposition)

    async def run(self, stop: asyncio.Event) -> None:
        """Listen (at once, so front workers can connect and report 'loading'), start the applications, serve
        until `stop`, then stop the applications and remove the socket."""
        await _claim(self.path)
        old_umask = os.umask(0o177)  # the socket is created owner-only: no window with wider permissions
        try:
            server = await asyncio.start_unix_server(self._connection, path=self.path, limit=2**20)
        finally:
            os.umask(old_umask)
        log.info("model host listening on %s", self.path)
        starting = asyncio.create_task(self.host.start())
        try:
            await stop.wait()
        finally:
            server.close()
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await self.host.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                req_id, op, args = await _read_frame(reader)
                task = asyncio.create_task(self._answer(writer, req_id, op, args))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the front worker went away
        finally:
            for task in tasks:
                task.cancel()
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, req_id: int, op: str, args: tuple[Any, ...]) -> None:
        try:
            if op == "call":
                value = await self.host.call(*args)
            elif op == "describe":
                value = self.host.describe(*args)
            elif op == "models":
                value = self.host.models()
            elif op == "metrics":
                value = self._metrics(*args)
            elif op == "report":
                worker, text = args
                self.reports[worker] = (time.monotonic(), text)
                value = None
            else:
                raise ValueError(f"unknown operation {op!r}")
            data = _frame((req_id, True, value))
        except Exception as exc:
            log.exception("model host: %s failed", op)
            data = _frame((req_id, False, f"{type(exc).__name__}: {exc}"))
        if not writer.is_closing():
            writer.write(data)
            await writer.drain()


    def _metrics(self, asking: str) -> list[tuple[dict[str, str], str]]:
        """The host's exposition and the last one each other live front worker reported (the asking worker renders
        its own), each with the label that tells them apart."""
        now = time.monotonic()
        for worker in [w for w, (at, _) in self.reports.items() if now - at > REPORT_STALE_S]:
            del self.reports[worker]
        return [({"replica": "model-host"}, self.host.metrics()),
                *(({"worker": w}, text) for w, (_, text) in sorted(self.reports.items()) if w != asking)]


async def _claim(path: str) -> None:
    """Remove a socket file a dead host left behind; refuse to start beside a live one."""
    if not os.path.exists(path):
        return
    try:
        _, writer = await asyncio.open_unix_connection(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    writer.close()
    raise RuntimeError(f"another model host is listening on {path}")


def run_model_host(settings: Settings, path: str, *, parent_pipe: bool = False) -> None:
    """The model host's main (`python -m app.cli model-host`): until SIGTERM/SIGINT, or until its parent's pipe on
    standard input closes (the `serve` that started it died)."""

    async def main() -> None:
        import signal

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if parent_pipe:
            def watch() -> None:
                sys.stdin.buffer.read()  # returns at end of file: the parent is gone
                loop.call_soon_threadsafe(stop.set)

            threading.Thread(target=watch, name="parent-watch", daemon=True).start()
        await ModelHost(settings, path).run(stop)

    asyncio.run(main())


# -- the front workers' side ------------------------------------------------------------------------------------


class HostClient:
    """One front worker's connection to the model host: calls multiplexed by id, a reader task delivering the
    answers; a lost connection fails the calls in flight (503) and the next call connects again."""

    def __init__(self, path: str, *, patience: float = CONNECT_PATIENCE_S) -> None:
        self.path = path
        self.patience = patience
        self.worker = f"{os.getpid()}.{next(_client_ids)}"  # this front worker, as the others' scrapes label it
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[tuple[bool, Any]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._lock: asyncio.Lock | None = None
        self._reader: asyncio.Task[None] | None = None  # the task delivering answers (the loop holds tasks weakly)
        self._connected_once = False

    async def _connect(self) -> asyncio.StreamWriter:
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            # at start-up wait for the host to listen; later fail at once (503) and let the caller retry
            until = time.monotonic() + (0.0 if self._connected_once else self.patience)
            while True:
                try:
                    reader, writer = await asyncio.open_unix_connection(self.path, limit=2**20)
                    break
                except (FileNotFoundError, ConnectionRefusedError) as exc:
                    if time.monotonic() >= until:
                        raise HostUnavailable(f"the model host does not answer on {self.path} ({exc.strerror})",
                                              headers={"Retry-After": "5"}) from None
                    await asyncio.sleep(0.1)
            self._connected_once = True
            self._writer = writer
            self._reader = asyncio.get_running_loop().create_task(self._read(reader, writer))  # keep a reference
            return writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                req_id, ok, value = await _read_frame(reader)
                future = self._pending.pop(req_id, None)
                if future is not None and not future.done():
                    future.set_result((ok, value))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            lost, self._pending = self._pending, {}
            for future in lost.values():
                if not future.done():
                    future.set_exception(HostUnavailable("the model host closed the connection during the call",
                                                         headers={"Retry-After": "5"}))

    async def request(self, op: str, *args: Any) -> Any:
        """Send one operation and await its answer."""
        writer = await self._connect()
        req_id = next(self._ids)
        future: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = future
        try:
            writer.write(_frame((req_id, op, args)))
            await writer.drain()
            ok, value = await future
        except ConnectionError as exc:
            raise HostUnavailable(f"the model host's connection failed: {exc}", headers={"Retry-After": "5"}) from None
        finally:
            self._pending.pop(req_id, None)
        if not ok:
            raise HostError(value)
        return value


class HostHandle:
    """One application on the model host, as its twin's ServiceHandle (app/remote.py)."""

    def __init__(self, client: HostClient, application: str, *, reports: bool,
                 report_interval: float = REPORT_INTERVAL_S) -> None:
        self.client = client
        self.application = application
        self.reports = reports  # the host's metrics and model listing: brought by one handle of the front only
        self.report_interval = report_interval

    async def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = await self.client.request("describe", self.application)
        return info

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        return await self.client.request("call", self.application, method, args, kwargs, timeout)

    async def models(self) -> dict[str, Any]:
        listing: dict[str, Any] = await self.client.request("models")
        return listing

    async def metrics(self) -> list[tuple[dict[str, str], str]]:
        parts: list[tuple[dict[str, str], str]] = await self.client.request("metrics", self.client.worker)
        return parts

    async def attach(self, metrics: Metrics) -> Callable[[], Awaitable[None]] | None:
        """The reporting handle hands this worker's own metrics to the host every report_interval, so a scrape of
        any worker shows every worker's requests (each labelled `worker`), not one worker's share."""
        if not self.reports:
            return None
        metrics.process_labels = {"worker": self.client.worker}

        async def report() -> None:
            while True:
                try:
                    await self.client.request("report", self.client.worker, metrics.render().decode())
                except (HostUnavailable, HostError) as exc:
                    log.debug("metrics report to the model host failed: %s", exc)
                await asyncio.sleep(self.report_interval)

        task = asyncio.get_running_loop().create_task(report())

        async def stop() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        return stop


def build_front_app(settings: Settings, client: HostClient, *, report_interval: float = REPORT_INTERVAL_S) -> Any:
    """One front worker's app: the shipped applications, classification, text and faces as twins of the model
    host's; the style API here on the shared job store, its workers in the host."""
    from app.main import create_app

    apps = [remote_twin(a, HostHandle(client, a.name, reports=a.name == REMOTE[0], report_interval=report_interval))
            if a.name in REMOTE else a for a in BUILTIN]
    # the device is the host's: a front worker holds no model and must not open a CUDA context of its own
    return create_app(settings.model_copy(update={"style_workers": 0, "device": "cpu"}), applications=apps)


def front_app() -> Any:
    """uvicorn's factory in each front worker process. The worker stops itself when `serve` is gone (SIGKILL
    leaves uvicorn's workers running otherwise, holding the port)."""
    settings = Settings()
    _exit_with_parent()
    return build_front_app(settings, HostClient(socket_path(settings)))


def _exit_with_parent() -> None:
    import signal

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
