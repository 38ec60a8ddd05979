"""Receiving processes: associations spread over N processes, admission and commits kept in one.

One Python process receives on one core at a time (the GIL): PDU decoding,
header parsing and hashing of concurrent associations queue behind each other.
`start_node` keeps the listeners and `policy.Admission` in the calling process
(exact limits in all and per source, one place for refusals), receives there
too, and passes each admitted connection to the receiving process with the
fewest associations in progress (this one first: a lone sender pays no
hand-over), other processes getting the connection's file descriptor over a
Unix socket pair (SCM_RIGHTS). A receiving
process receives and checks each instance, then hands it (`RemoteCommitter`)
to the listening process's group committer, so that the instances of all
receiving processes share renames, fsyncs and one database transaction, and
the database has one writer (no lock waits between processes). It says when
a connection has ended so that the counts stay exact. A receiving process that
dies is replaced; its connections are counted as ended.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from triage_core.db import Database
from triage_core.settings import Settings

from concurrent.futures import Future
from dataclasses import asdict

from .ingest import IngestService, Received, StoreOutcome
from .statuses import OUT_OF_RESOURCES
from .policy import RefusalLog
from .scp import DicomEdge, admission, build_receiver, clear_spool, endpoints
from .server import Listener, OnClose, Receiver

log = logging.getLogger(__name__)

#: Receiving processes when CXR_TRIAGE_DICOM_RECEIVERS is unset: one per core, at most this many.
MAX_AUTO_RECEIVERS = 4
_MESSAGE = 256 * 1024
#: How much busier the other receiving processes must be before the listening process (which also
#: commits for all of them) takes one more connection itself.
LOCAL_WEIGHT = 3


def _send(channel: socket.socket, lock: threading.Lock, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    with lock:
        if fds:
            socket.send_fds(channel, [data], fds)
        else:
            channel.send(data)


class RemoteCommitter:
    """A receiving process's committer: the listening process commits, this one waits for the answer."""

    def __init__(self, send, timeout: float) -> None:
        self._send = send
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()

    def submit(self, item: Received) -> StoreOutcome:
        request_id = next(self._ids)
        future: Future = Future()
        with self._lock:
            self._pending[request_id] = future
        try:
            self._send({"type": "commit", "id": request_id, "item": item.as_message()})
            return future.result(self._timeout)
        except Exception as exc:  # the listening process is gone or too slow: the sender retries later
            log.error("commit of SOP %s through the listening process failed: %s", item.sop_instance_uid,
                      type(exc).__name__)
            return StoreOutcome(OUT_OF_RESOURCES, reason="storage did not answer; try again later")
        finally:
            with self._lock:
                self._pending.pop(request_id, None)

    def resolve(self, request_id: int, outcome: dict) -> None:
        with self._lock:
            future = self._pending.get(request_id)
        if future is not None and not future.done():
            future.set_result(StoreOutcome(**outcome))

    def close(self) -> None:
        with self._lock:
            pending = list(self._pending.values())
        for future in pending:
            if not future.done():
                future.set_exception(ConnectionError("the listening process is gone"))


def receiver_processes(settings: Settings, cores: int | None = None) -> int:
    if settings.dicom_receivers:
        return settings.dicom_receivers
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_AUTO_RECEIVERS))


@dataclass
class _Child:
    index: int
    process: Any
    channel: socket.socket
    pending: dict[int, OnClose] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    alive: bool = True
    ready: threading.Event = field(default_factory=threading.Event)


class ReceiverPool:
    """The receiving processes, seen from the listening process."""

    def __init__(self, settings: Settings, processes: int, ingest: IngestService,
                 initializer: Callable[[], None] | None = None, local: Receiver | None = None) -> None:
        self.settings = settings
        self.processes = processes
        self.ingest = ingest
        self.initializer = initializer
        #: The listening process's own receiver, when it receives too.
        self.local = local
        self._children: list[_Child] = []
        self._ids = itertools.count(1)
        self._stopping = False
        self._lock = threading.Lock()
        self._context = multiprocessing.get_context("spawn")

    def start(self, timeout: float = 120.0) -> "ReceiverPool":
        """Start the processes and wait until each can take connections."""
        for index in range(self.processes):
            self._children.append(self._spawn(index))
        deadline = time.monotonic() + timeout
        for child in self._children:
            if not child.ready.wait(max(0.1, deadline - time.monotonic())):
                self.shutdown(timeout=5)
                raise RuntimeError(f"receiving process {child.index} did not start (exit code "
                                   f"{child.process.exitcode}); see its log lines above")
        return self

    def _spawn(self, index: int) -> _Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        process = self._context.Process(target=receiver_main, name=f"dicom-receiver-{index}",
                                        args=(self.settings, theirs, index, self.initializer))
        process.start()
        theirs.close()
        child = _Child(index, process, ours)
        threading.Thread(target=self._watch, args=(child,), name=f"receiver-{index}-watch", daemon=True).start()
        log.info("receiving process %d started (pid %s)", index, process.pid)
        return child

    def dispatch(self, sock: socket.socket, client_address: Any, *, tls: bool, on_close: OnClose) -> None:
        with self._lock:
            candidates = [c for c in self._children if c.alive]
            # The listening process also commits for everyone: a lone sender is received here (no
            # hand-over), more go elsewhere until the others have LOCAL_WEIGHT times as many.
            if self.local is not None and (not candidates or self.local.active * LOCAL_WEIGHT
                                           <= min(len(c.pending) for c in candidates)):
                child = None
            elif not candidates:
                raise RuntimeError("no receiving process is running")
            else:
                child = min(candidates, key=lambda c: len(c.pending))
        if child is None:
            self.local.handle(sock, client_address, tls=tls, on_close=on_close)  # type: ignore[union-attr]
            return
        with self._lock:
            conn_id = next(self._ids)
            with child.lock:
                child.pending[conn_id] = on_close
        message = {"type": "connection", "id": conn_id, "address": list(client_address[:2]), "tls": tls,
                   "local": list(sock.getsockname()[:2])}
        try:
            _send(child.channel, child.send_lock, message, [sock.fileno()])
        except OSError:
            with child.lock:
                child.pending.pop(conn_id, None)
            raise
        finally:
            sock.close()

    def _watch(self, child: _Child) -> None:
        while True:
            try:
                message = child.channel.recv(_MESSAGE)
            except OSError:
                message = b""
            if not message:
                break
            try:
                decoded = json.loads(message)
            except ValueError:
                log.error("receiving process %d sent an unreadable message", child.index)
                continue
            kind = decoded.get("type")
            if kind == "commit":
                self._commit(child, decoded)
            elif kind == "ready":
                child.ready.set()
            elif kind == "closed":
                with child.lock:
                    on_close = child.pending.pop(int(decoded["id"]), None)
                if on_close is not None:
                    on_close()
        child.alive = False
        with child.lock:
            lost = list(child.pending.values())
            child.pending.clear()
        for on_close in lost:
            on_close()
        child.process.join(timeout=5)
        if not self._stopping:
            log.error("receiving process %d exited (code %s) with %d connection(s); starting another",
                      child.index, child.process.exitcode, len(lost))
            time.sleep(1.0)
            replacement = self._spawn(child.index)
            with self._lock:
                self._children = [replacement if c is child else c for c in self._children]

    def _commit(self, child: _Child, request: dict) -> None:
        """Commit a receiving process's instance with everyone else's; answer it when done."""
        request_id = request["id"]

        def answer(future: Future) -> None:
            try:
                outcome = future.result()
            except Exception:
                outcome = StoreOutcome(OUT_OF_RESOURCES, reason="storage failed; try again later")
            try:
                _send(child.channel, child.send_lock, {"type": "committed", "id": request_id,
                                                       "outcome": asdict(outcome)})
            except OSError:
                pass  # that process is gone; its sender sees the connection close

        try:
            future = self.ingest.committer.submit_async(Received.from_message(request["item"]))
        except Exception:
            log.exception("commit request of receiving process %d could not be taken", child.index)
            future = Future()
            future.set_exception(RuntimeError("bad commit request"))
        future.add_done_callback(answer)

    def shutdown(self, timeout: float = 20.0) -> None:
        self._stopping = True
        for child in self._children:
            try:
                child.channel.shutdown(socket.SHUT_WR)  # the child stops taking connections and drains
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for child in self._children:
            child.process.join(max(0.1, deadline - time.monotonic()))
            if child.process.is_alive():
                log.warning("receiving process %d did not stop in time; terminating it", child.index)
                child.process.terminate()
                child.process.join(5)
            child.channel.close()


def receiver_main(settings: Settings, channel: socket.socket, index: int,
                  initializer: Callable[[], None] | None) -> None:
    """A receiving process: run the associations whose connections arrive on `channel`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the listening process decides when to stop
    stop = threading.Event()

    def terminate(*_) -> None:
        # SIGTERM reaches every process of the group at once (systemd, serve): stop taking connections
        # now. Shutting the channel down wakes the blocking receive below (which Python otherwise
        # resumes after the handler), so the drain and the shutdown start at once.
        stop.set()
        try:
            channel.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    signal.signal(signal.SIGTERM, terminate)
    if initializer is not None:
        initializer()
    database = Database(settings.database_url)
    send_lock = threading.Lock()

    def send(message: dict) -> None:
        _send(channel, send_lock, message)

    committer = RemoteCommitter(send, timeout=settings.dicom_idle_timeout)
    ingest = IngestService(settings, database, committer=committer)
    refusals = RefusalLog(database)
    receiver = build_receiver(settings, ingest, database, refusals)

    def closed(conn_id: int) -> None:
        try:
            send({"type": "closed", "id": conn_id})
        except OSError:
            pass

    send({"type": "ready"})
    try:
        while not stop.is_set():
            try:
                message, fds, _, _ = socket.recv_fds(channel, _MESSAGE, 1)
            except OSError:
                break
            if not message:
                for fd in fds:
                    os.close(fd)
                break
            meta = json.loads(message)
            if meta.get("type") == "committed":
                committer.resolve(int(meta["id"]), meta["outcome"])
                continue
            if not fds:
                closed(meta["id"])
                continue
            sock = socket.socket(fileno=fds[0])
            receiver.handle(sock, tuple(meta["address"]), tls=bool(meta["tls"]),
                            on_close=lambda conn_id=meta["id"]: closed(conn_id),
                            local_address=tuple(meta["local"]))
        # Drain: let established associations finish (each is bounded by the idle timeout); connections
        # that never negotiated one are cut by the shutdown below.
        deadline = time.monotonic() + settings.dicom_idle_timeout
        while receiver.established and time.monotonic() < deadline and not stop.is_set():
            time.sleep(0.1)
    finally:
        receiver.shutdown(timeout=5)
        committer.close()
        ingest.close()
        refusals.close()
        database.dispose()
        log.info("receiving process %d stopped", index)


def start_node(settings: Settings, database: Database, processes: int,
               initializer: Callable[[], None] | None = None) -> DicomEdge:
    """The DICOM edge of `cxr-triage node`: listeners and admission here, associations in
    `processes` receiving processes (in this process when 1). The caller owns `shutdown()`."""
    from .scp import start_scp  # the one-process edge

    settings.ensure_dirs()
    clear_spool(settings)
    if processes <= 1:
        return start_scp(settings, IngestService(settings, database))
    refusals = RefusalLog(database)
    ingest = IngestService(settings, database)  # the group committer every receiving process uses
    local = build_receiver(settings, ingest, database, refusals)
    pool = ReceiverPool(settings, processes - 1, ingest, initializer, local=local).start()
    listener = Listener(endpoints(settings), admission(settings), refusals, pool.dispatch,
                        tls_context=local.tls_context, read_timeout=settings.dicom_read_timeout).start()
    for host, port, tls in listener.addresses:
        log.info("DICOM SCP %s listening on %s:%s%s with %d receiving processes", settings.ae_title, host, port,
                 " (TLS)" if tls else "", processes)
    return DicomEdge(listener, refusals, [lambda: local.drain(10), pool.shutdown, local.shutdown, ingest.close])
