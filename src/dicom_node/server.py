"""Listening, admitting and running associations: the DICOM edge's own server.

pynetdicom's `AssociationServer` accepts in one thread, performs the TLS
handshake in that same thread (one silent TLS peer stops every other sender)
and counts only whole associations. Here:

- `Listener` accepts on the plain and TLS ports and asks `policy.Admission`
  before reading a byte. A source outside the allowed networks is closed; a
  connection over the limits is answered A-ASSOCIATE-RJ (transient, local
  limit exceeded) by `Rejector`, a few bounded threads, so that a real sender
  learns to retry later; beyond those it is closed.
- `Receiver` runs each admitted connection as an `transport.EdgeAssociation`
  in its own thread: TLS handshake under a watchdog, then pynetdicom's ACSE and
  DIMSE with our handlers over a `transport.BoundedSocket`.

A `Listener` hands connections to a `Receiver` in the same process, or to
receiving processes (`processes.ReceiverPool`) when one process's GIL is the
limit; admission stays in one place either way.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Protocol

from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.transport import AddressInformation

from .policy import Admission, Refusal, RefusalLog, source_address
from .statuses import REJECT_LOCAL_LIMIT_EXCEEDED
from .tls import peer_summary
from .transport import BoundedSocket, Bounds, EdgeAssociation, discard_spooled_message, reject_pdu

log = logging.getLogger(__name__)

#: Connections being answered A-ASSOCIATE-RJ at once; more are closed unanswered.
REJECTORS = 8
#: Longest a rejected peer is given to send its A-ASSOCIATE-RQ.
REJECT_READ_TIMEOUT = 5.0
#: Largest A-ASSOCIATE-RQ a rejected peer may send (a few hundred contexts).
REJECT_RQ_LIMIT = 256 * 1024

OnClose = Callable[[], None]


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool


class Dispatch(Protocol):
    def __call__(self, sock: socket.socket, client_address: Any, *, tls: bool, on_close: OnClose) -> None: ...


def _once(callback: OnClose) -> OnClose:
    lock = threading.Lock()
    done = False

    def run() -> None:
        nonlocal done
        with lock:
            if done:
                return
            done = True
        callback()

    return run


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass
    try:
        sock.close()
    except OSError:
        pass


def _handshake(sock: socket.socket, context: ssl.SSLContext, timeout: float) -> ssl.SSLSocket:
    """Server-side TLS handshake that takes at most `timeout` seconds in all (a watchdog closes it)."""
    tls_sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    watchdog = threading.Timer(timeout, lambda: _close(tls_sock))
    watchdog.daemon = True
    watchdog.start()
    try:
        tls_sock.settimeout(timeout)
        tls_sock.do_handshake()
    finally:
        watchdog.cancel()
    return tls_sock


class Receiver:
    """Runs admitted connections as associations of `ae` with `handlers`, under `bounds`."""

    def __init__(self, ae: Any, handlers: list[tuple], bounds: Bounds, refusals: RefusalLog, *,
                 spool_dir: Path, tls_context: ssl.SSLContext | None = None) -> None:
        self.ae = ae
        self.handlers = handlers
        self.bounds = bounds
        self.refusals = refusals
        self.spool_dir = spool_dir
        self.tls_context = tls_context
        self._contexts = ae.supported_contexts
        self._active: set[EdgeAssociation] = set()
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._active)

    @property
    def established(self) -> int:
        """Associations past negotiation (what a graceful stop waits for; the others are cut)."""
        with self._lock:
            return sum(1 for assoc in self._active if assoc.is_established)

    def handle(self, sock: socket.socket, client_address: Any, *, tls: bool, on_close: OnClose,
               local_address: Any = None) -> None:
        """Start the association of an accepted connection; `on_close` runs once when it ends."""
        on_close = _once(on_close)
        source = source_address(client_address)
        state: dict[str, Any] = {"sock": sock}

        def prepare(assoc: EdgeAssociation) -> bool:
            raw = state["sock"]
            try:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            if tls:
                if self.tls_context is None:
                    return False
                try:
                    raw = _handshake(raw, self.tls_context, self.bounds.read_timeout)
                except (OSError, ssl.SSLError, ValueError) as exc:
                    self.refusals.rejected(f"TLS handshake failed: {type(exc).__name__}: {exc}", kind="tls",
                                           source=source)
                    return False
                state["sock"] = raw
                state["tls"] = peer_summary(raw)
            raw.settimeout(self.bounds.read_timeout)
            bounded = BoundedSocket(assoc, raw, self.bounds, lambda kind, reason: self.refusals.aborted(
                reason, kind=kind, source=source, calling_ae_title=assoc.requestor.ae_title.strip()
                if assoc.requestor.primitive is not None else "", **state.get("tls", {})))
            state["bounded"] = bounded
            assoc.set_socket(bounded)
            return True

        def finished(assoc: EdgeAssociation) -> None:
            try:
                discard_spooled_message(assoc)
                bounded = state.get("bounded")
                if (bounded is not None and not bounded.violation and assoc.requestor.primitive is None
                        and not assoc.is_rejected and not assoc.is_aborted):
                    self.refusals.aborted(f"no A-ASSOCIATE-RQ within {self.bounds.read_timeout:g} s",
                                          kind="silent", source=source)
                _close(state["sock"])
            finally:
                with self._lock:
                    self._active.discard(assoc)
                on_close()

        try:
            assoc = EdgeAssociation(self.ae, MODE_ACCEPTOR, prepare=prepare, finished=finished)
            assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
            assoc.dul.spool_dir = self.spool_dir
            assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
            assoc.acceptor.ae_title = self.ae.ae_title
            local = local_address or sock.getsockname()
            assoc.acceptor.address_info = AddressInformation.from_tuple(tuple(local[:2]))
            assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
            assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
            # Shared, not copied: acceptor negotiation only reads them (pynetdicom's own server deep-copies
            # ~130 contexts per association, tens of milliseconds for each short association).
            assoc.acceptor.supported_contexts = self._contexts
            assoc.requestor.address_info = AddressInformation.from_tuple(tuple(client_address[:2]))
            for handler in self.handlers:
                assoc.bind(*handler)
            with self._lock:
                self._active.add(assoc)
            assoc.start()
        except Exception:
            log.exception("connection from %s could not be started", source)
            _close(sock)
            on_close()

    def drain(self, timeout: float) -> None:
        """Wait (at most `timeout` s) for established associations to end by themselves."""
        deadline = time.monotonic() + timeout
        while self.established and time.monotonic() < deadline:
            time.sleep(0.1)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is still running and wait for it to end."""
        with self._lock:
            running = list(self._active)
        for assoc in running:
            try:
                if assoc.is_established:
                    assoc.abort()
                else:
                    # Still waiting for an A-ASSOCIATE-RQ: close the connection and wake the reactor,
                    # which would otherwise wait out the read timeout.
                    bounded = assoc.dul.socket
                    if bounded is not None and bounded.socket is not None:
                        _close(bounded.socket)
                    assoc.dul.to_user_queue.put(None)
            except Exception:
                pass
        deadline = time.monotonic() + timeout
        for assoc in running:
            assoc.join(max(0.1, deadline - time.monotonic()))


class Rejector:
    """Answers over-limit connections with A-ASSOCIATE-RJ from a few bounded threads."""

    def __init__(self, refusals: RefusalLog, tls_context: ssl.SSLContext | None, read_timeout: float) -> None:
        self.refusals = refusals
        self.tls_context = tls_context
        self.read_timeout = min(read_timeout, REJECT_READ_TIMEOUT)
        self._slots = threading.BoundedSemaphore(REJECTORS)

    def reject(self, sock: socket.socket, source: str, refusal: Refusal, *, tls: bool) -> None:
        if not self._slots.acquire(blocking=False):
            _close(sock)
            self.refusals.rejected(refusal.reason + "; closed unanswered (too many refusals at once)",
                                   kind=str(refusal.kind), source=source)
            return
        threading.Thread(target=self._run, args=(sock, source, refusal, tls), name="reject", daemon=True).start()

    def _run(self, sock: socket.socket, source: str, refusal: Refusal, tls: bool) -> None:
        calling = called = ""
        try:
            if tls and self.tls_context is not None:
                sock = _handshake(sock, self.tls_context, self.read_timeout)
            deadline = time.monotonic() + self.read_timeout
            header = self._read(sock, 6, deadline)
            if len(header) == 6:
                pdu_type, _, length = struct.unpack(">BBL", header)
                if pdu_type == 0x01 and 68 <= length <= REJECT_RQ_LIMIT:
                    body = self._read(sock, length, deadline)
                    if len(body) >= 36:
                        called = body[4:20].decode("ascii", "replace").strip()
                        calling = body[20:36].decode("ascii", "replace").strip()
                    sock.sendall(reject_pdu(*REJECT_LOCAL_LIMIT_EXCEEDED))
                    try:
                        sock.shutdown(socket.SHUT_WR)
                        sock.settimeout(1.0)
                        sock.recv(4096)  # let the peer read the RJ before the connection goes
                    except (OSError, ValueError):
                        pass
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            _close(sock)
            self._slots.release()
            self.refusals.rejected(refusal.reason, kind=str(refusal.kind), source=source,
                                   calling_ae_title=calling, called_ae_title=called)

    @staticmethod
    def _read(sock: socket.socket, count: int, deadline: float) -> bytes:
        data = bytearray()
        while len(data) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            chunk = sock.recv(min(65536, count - len(data)))
            if not chunk:
                break
            data += chunk
        return bytes(data)


class Listener:
    """Accepts on each endpoint, admits or refuses, and dispatches admitted connections."""

    def __init__(self, endpoints: list[Endpoint], admission: Admission, refusals: RefusalLog, dispatch: Dispatch,
                 *, tls_context: ssl.SSLContext | None, read_timeout: float, backlog: int = 128) -> None:
        self.endpoints = endpoints
        self.admission = admission
        self.refusals = refusals
        self.dispatch = dispatch
        self.rejector = Rejector(refusals, tls_context, read_timeout)
        self.backlog = backlog
        self._sockets: list[tuple[socket.socket, Endpoint]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def bind(self) -> "Listener":
        for endpoint in self.endpoints:
            family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
            sock = socket.create_server((endpoint.host, endpoint.port), family=family, backlog=self.backlog)
            sock.setblocking(False)
            self._sockets.append((sock, endpoint))
        return self

    @property
    def addresses(self) -> list[tuple[str, int, bool]]:
        return [(s.getsockname()[0], s.getsockname()[1], e.tls) for s, e in self._sockets]

    def start(self) -> "Listener":
        if not self._sockets:
            self.bind()
        self._thread = threading.Thread(target=self._run, name="dicom-accept", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        for sock, endpoint in self._sockets:
            selector.register(sock, selectors.EVENT_READ, endpoint)
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.5):
                    self._accept_all(key.fileobj, key.data)  # type: ignore[arg-type]
        finally:
            selector.close()

    def _accept_all(self, listening: socket.socket, endpoint: Endpoint) -> None:
        while True:
            try:
                conn, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if not self._stop.is_set():
                    log.warning("accept on port %s failed: %s", endpoint.port, exc)
                    time.sleep(0.05)  # out of file descriptors: do not spin
                return
            conn.setblocking(True)
            source = source_address(address)
            refusal = self.admission.admit(source)
            if refusal is not None:
                if refusal.answers_with_reject:
                    self.rejector.reject(conn, source, refusal, tls=endpoint.tls)
                else:
                    _close(conn)
                    self.refusals.rejected(refusal.reason, kind=str(refusal.kind), source=source)
                continue
            release = _once(lambda source=source: self.admission.release(source))
            try:
                self.dispatch(conn, address, tls=endpoint.tls, on_close=release)
            except Exception:
                log.exception("connection from %s could not be dispatched", source)
                _close(conn)
                release()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for sock, _ in self._sockets:
            try:
                sock.close()
            except OSError:
                pass
        self._sockets = []


__all__ = ["Endpoint", "Listener", "Receiver", "Rejector"]
