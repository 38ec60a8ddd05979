"""One accepted connection, bounded: read timeouts, a PDU cap, a data set cap, event-driven reactors.

pynetdicom reads a PDU with blocking ``recv`` calls and checks its timeouts only
between PDUs, so a peer that sends three bytes of a PDU header holds a thread
forever, and a header that claims 1.5 GB makes it buffer whatever follows.
`BoundedSocket` puts the bounds where the bytes arrive:

- every read waits at most ``read_timeout`` for data, and a PDU must be complete
  within ``read_timeout`` plus its length at `MIN_TRANSFER_RATE`;
- a PDU longer than ``max_pdu_size`` (the Maximum Length we announce) aborts the
  association before its body is read;
- the P-DATA values of one DIMSE message are counted as they arrive: a command
  set over `COMMAND_SET_LIMIT`, a C-STORE data set over ``max_dataset_size``
  (pynetdicom streams it to a spool file, `scp.configure_pynetdicom`) or any
  other data set (a query identifier, held in memory) over `IDENTIFIER_LIMIT`
  aborts the association while it is still arriving.

A violation sends an A-ABORT, closes the connection and is reported through the
``on_violation`` callback (log line and audit event, no patient data).

pynetdicom's DUL and association reactors poll with 1 ms sleeps, which costs
2-3 ms of latency per C-STORE and burns CPU for every idle association.
`EdgeDUL` and `EdgeAssociation` wait instead: on the socket and a wake-up pipe,
and on the DIMSE message queue. They override pynetdicom internals (3.0.x,
pinned in pyproject.toml); tests/unit/test_dicom_edge.py runs them against
dcmtk, pynetdicom and Orthanc peers.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from .fastpath import encode_c_store_rsp

from triage_core.settings import Settings

log = logging.getLogger(__name__)

#: A PDU must arrive at least this fast once its header is in (a slow WAN link does 10x more).
MIN_TRANSFER_RATE = 64 * 1024
#: A DIMSE command set is a few hundred bytes; no legitimate one comes near this.
COMMAND_SET_LIMIT = 64 * 1024
#: Data sets other than C-STORE's (query identifiers) are held in memory by pynetdicom.
IDENTIFIER_LIMIT = 1024 * 1024
#: Longest a reactor sleeps without an event (timers are checked this often).
REACTOR_TICK = 0.1
#: Largest read from the socket at once.
_CHUNK = 1024 * 1024
_C_STORE_RQ = 0x0001
_PDU_TYPES = frozenset(range(1, 8))
_P_DATA_TF = 0x04

#: Called with (kind, reason) when a peer breaks a bound; kind is a short tag for logs and audit.
ViolationCallback = Callable[[str, str], None]


@dataclass(frozen=True)
class Bounds:
    """The limits one accepted connection runs under (README "Configuration")."""

    read_timeout: float
    idle_timeout: float
    max_pdu_size: int
    max_dataset_size: int

    def __post_init__(self) -> None:
        for name in ("read_timeout", "idle_timeout", "max_pdu_size", "max_dataset_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Bounds.{name} must be positive")

    @classmethod
    def from_settings(cls, settings: Settings) -> "Bounds":
        return cls(settings.dicom_read_timeout, settings.dicom_idle_timeout, settings.max_pdu_size,
                   settings.max_dataset_size)

    def pdu_deadline(self, length: int) -> float:
        """Seconds a PDU body of `length` bytes may take once its header is in."""
        return self.read_timeout + length / MIN_TRANSFER_RATE


def abort_pdu(source: int = 0x02, reason: int = 0x00) -> bytes:
    """An encoded A-ABORT PDU (PS3.8 9.3.8): source 0 = service user, 2 = service provider."""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, source, reason)


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    """An encoded A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return struct.pack(">BBLBBBB", 0x03, 0, 4, 0, result, source, reason)


def _command_field(command: bytes) -> int | None:
    """(0000,0100) Command Field of an implicit VR little endian command set, or None."""
    position, end = 0, len(command)
    while position + 8 <= end:
        group, element, length = struct.unpack_from("<HHL", command, position)
        position += 8
        if (group, element) == (0x0000, 0x0100) and length == 2 and position + 2 <= end:
            return struct.unpack_from("<H", command, position)[0]
        if group != 0x0000 or length > end - position:
            return None
        position += length
    return None


class _MessageMeter:
    """Counts the P-DATA values of the DIMSE message in progress; says when one is too large."""

    def __init__(self, max_dataset_size: int) -> None:
        self.max_dataset_size = max_dataset_size
        self._command = bytearray()
        self._command_field: int | None = None
        self._dataset = 0

    def feed(self, body: memoryview) -> str | None:
        """Account for one P-DATA-TF PDU body; returns why the message is refused, or None."""
        position, end = 0, len(body)
        while position + 6 <= end:
            length = int.from_bytes(body[position:position + 4], "big")
            if length < 2 or position + 4 + length > end:
                return None  # malformed: pynetdicom's decoder refuses it (Evt19)
            control = body[position + 5]
            value = body[position + 6:position + 4 + length]
            position += 4 + length
            if control & 0x01:  # command fragment
                if len(self._command) + len(value) > COMMAND_SET_LIMIT:
                    return f"command set larger than {COMMAND_SET_LIMIT} bytes"
                self._command += value
                if control & 0x02:
                    self._command_field = _command_field(bytes(self._command))
                    self._command.clear()
                    self._dataset = 0
            else:
                self._dataset += len(value)
                limit = self.max_dataset_size if self._command_field == _C_STORE_RQ else IDENTIFIER_LIMIT
                if self._dataset > limit:
                    what = "C-STORE data set" if self._command_field == _C_STORE_RQ else "data set"
                    return f"{what} larger than {limit} bytes"
                if control & 0x02:
                    self._dataset = 0
                    self._command_field = None
        return None


class BoundedSocket(AssociationSocket):
    """An accepted connection's socket that enforces `Bounds` on every read."""

    def __init__(self, assoc: Association, client_socket: socket.socket, bounds: Bounds,
                 on_violation: ViolationCallback) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self.bounds = bounds
        self.on_violation = on_violation
        self.violation: str | None = None
        self._expect_header = True
        self._pdu_type = 0
        self._body_deadline = 0.0
        self._meter = _MessageMeter(bounds.max_dataset_size)

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        if sock is None or self.violation:
            return bytearray()
        if self._expect_header:
            data = self._read(sock, nr_bytes, time.monotonic() + self.bounds.read_timeout, "PDU header")
            if len(data) == 6:
                pdu_type, _, length = struct.unpack(">BBL", data)
                if pdu_type in _PDU_TYPES:
                    if length > self.bounds.max_pdu_size:
                        self._violate("pdu-too-large", f"PDU of {length} bytes announced; the limit is "
                                      f"{self.bounds.max_pdu_size}", abort_reason=0x06)
                        return bytearray()
                    self._expect_header = False
                    self._pdu_type = pdu_type
                    self._body_deadline = time.monotonic() + self.bounds.pdu_deadline(length)
            return data
        self._expect_header = True
        data = self._read(sock, nr_bytes, self._body_deadline, "PDU")
        if self._pdu_type == _P_DATA_TF and len(data) == nr_bytes:
            problem = self._meter.feed(memoryview(data))
            if problem:
                self._violate("dataset-too-large", problem, source=0x00)
                return bytearray()
        return data

    def _read(self, sock: socket.socket, nr_bytes: int, deadline: float, what: str) -> bytearray:
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        try:
            while received < nr_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(min(self.bounds.read_timeout, remaining))
                count = sock.recv_into(view[received:], min(_CHUNK, nr_bytes - received))
                if not count:
                    break  # the peer closed: pynetdicom sees a short read (Evt17)
                received += count
        except (TimeoutError, socket.timeout):
            self._violate("read-timeout", f"{what} not received within the read timeout "
                          f"({received} of {nr_bytes} bytes)", send_abort=False)
            return bytearray()
        except (OSError, ValueError):
            pass  # reset or closed: a short read
        finally:
            view.release()
        del buffer[received:]
        return buffer

    def _violate(self, kind: str, message: str, *, source: int = 0x02, abort_reason: int = 0x00,
                 send_abort: bool = True) -> None:
        """Record the violation, A-ABORT (unless it was silence), close the connection, report it."""
        if self.violation:
            return
        self.violation = message
        sock = self.socket
        if sock is not None:
            if send_abort:
                try:
                    sock.settimeout(1.0)
                    sock.sendall(abort_pdu(source, abort_reason))
                except (OSError, ValueError):
                    pass
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except (OSError, ValueError):
                pass
        try:
            self.on_violation(kind, message)
        except Exception:  # reporting must never break the connection handling
            log.exception("reporting a bounds violation failed")


class EdgeDUL(DULServiceProvider):
    """pynetdicom's DUL reactor, waiting on the socket and a wake-up pipe instead of polling."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake, or closed

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self.wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def _wait(self) -> None:
        """Sleep until the socket has data, a primitive is queued, or a tick passes."""
        if self.to_provider_queue.qsize():
            return
        sock = getattr(self.socket, "socket", None)
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        waitables: list[Any] = [self._wake_r]
        if sock is not None and sock.fileno() >= 0:
            waitables.append(sock)
        try:
            ready, _, _ = select.select(waitables, [], [], REACTOR_TICK)
        except (OSError, ValueError):
            time.sleep(REACTOR_TICK / 10)
            return
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except (BlockingIOError, OSError):
                pass

    def run_reactor(self) -> None:
        """`DULServiceProvider.run_reactor` with `_wait` where it sleeps."""
        self._idle_timer.start()
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception:
                    log.exception("DUL failure; aborting the association")
                    abort = A_ABORT_RQ()
                    abort.source = 0x02
                    abort.reason_diagnostic = 0x00
                    try:
                        if self.socket is not None and self.socket.socket is not None:
                            self.socket.socket.sendall(abort.encode())
                    except OSError:
                        pass
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    self._wait()
                    continue
                self.state_machine.do_action(event)
        finally:
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._wake_r = self._wake_w = -1


class EdgeDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with plain C-STORE-RSPs encoded by `fastpath` (same bytes, a
    fraction of the time); every other message goes through pynetdicom."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if (isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None
                and primitive.ErrorComment is None and primitive.OffendingElement is None
                and primitive.Status is not None and primitive.AffectedSOPClassUID
                and primitive.AffectedSOPInstanceUID):
            command = encode_c_store_rsp(
                message_id=int(primitive.MessageIDBeingRespondedTo), sop_class_uid=primitive.AffectedSOPClassUID,
                sop_instance_uid=primitive.AffectedSOPInstanceUID, status=int(primitive.Status))
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
            self.dul.send_pdu(pdata)
            return
        super().send_msg(primitive, context_id)


class _WakingQueue(queue.Queue):
    """The DUL's to-user queue: every primitive for the service user wakes the association reactor."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


#: What the association reactor receives from `_WakingQueue`: "look at the DUL's queue".
_WAKE = (None, None)


class EdgeAssociation(Association):
    """An acceptor association with event-driven reactors and a `BoundedSocket`.

    `prepare` runs first in the association's own thread (the TLS handshake,
    under a watchdog) and `finished` last, whatever happened in between.
    """

    def __init__(self, ae: Any, mode: str, *, prepare: Callable[["EdgeAssociation"], bool],
                 finished: Callable[["EdgeAssociation"], None]) -> None:
        super().__init__(ae, mode)
        self.dimse = EdgeDIMSE(self)
        self.dul = EdgeDUL(self)
        self.dul.to_user_queue = _WakingQueue(lambda: self.dimse.msg_queue.put(_WAKE))
        # pynetdicom's timeout setters configure the DUL's timers: apply them to the new DUL.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout
        self._prepare = prepare
        self._finished = finished
        #: Set by the EVT_REJECTED handler so that `finished` knows what happened.
        self.refusal: str | None = None

    def run_reactor(self) -> None:
        try:
            if self._prepare(self):
                super().run_reactor()
        finally:
            self._finished(self)

    def _run_reactor(self) -> None:
        """`Association._run_reactor` blocking on the DIMSE queue instead of sleeping 1 ms a turn."""
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=REACTOR_TICK)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, context_id)
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                log.warning("association with %s idle for %s s: aborting", self.requestor.address,
                            self.network_timeout)
                self.abort()
                self.kill()
                return


def discard_spooled_message(assoc: Association) -> None:
    """Delete the spool file of a C-STORE data set that never completed (an abort, a closed connection)."""
    message = getattr(assoc.dimse, "message", None)
    handle = getattr(message, "_data_set_file", None)
    if handle is None:
        return
    try:
        handle.close()
    except OSError:
        pass
    try:
        Path(handle.name).unlink(missing_ok=True)
    except OSError:
        pass


__all__ = [
    "Bounds",
    "BoundedSocket",
    "EdgeAssociation",
    "EdgeDUL",
    "IDENTIFIER_LIMIT",
    "COMMAND_SET_LIMIT",
    "MIN_TRANSFER_RATE",
    "abort_pdu",
    "discard_spooled_message",
    "reject_pdu",
]
