"""Wiring of the DICOM edge: which classes and syntaxes we accept, the handlers, the bounds, the listeners.

`start_scp` runs everything in the calling process (tests, one receiving
process); `processes.start_node` spreads the associations over receiving
processes. Behaviour lives in handlers.py, ingest.py, query.py; bounds in
transport.py and policy.py; TLS in tls.py.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.filewriter import write_file_meta_info as _pydicom_write_file_meta_info
from pynetdicom import AE, AllStoragePresentationContexts, _config, dimse_messages, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from triage_core.db import Database
from triage_core.settings import Destination, Settings

from . import fastpath
from .handlers import (
    handle_echo,
    handle_find,
    handle_get,
    handle_move,
    handle_rejected,
    handle_released,
    handle_store,
)
from .ingest import IngestService
from .policy import Admission, RefusalLog
from .query import Catalogue
from .server import Endpoint, Listener, Receiver
from .tls import client_context, server_context
from .transport import Bounds

log = logging.getLogger(__name__)

#: Kept as sent and decoded by pylibjpeg/GDCM. Deflate (a decompression bomb risk)
#: and the retired big endian syntax are deliberately not offered.
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]
QUERY_RETRIEVE_CLASSES = [
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
]

_configured = threading.Lock()


def configure_pynetdicom() -> None:
    """pynetdicom's process-wide switches, set once by every DICOM edge of the process.

    - C-STORE data sets are streamed to a spool file as they arrive (never whole
      in memory), in the spool directory of the receiving edge (same file system
      as the instances: the file is renamed into place, not copied), hashed as
      they are written, with File Meta Information encoded by `fastpath`;
    - identifiers (patient names) are never logged, and pynetdicom's own per-PDU
      and per-message log handlers are not bound (they format every PDU, even
      when nothing is logged: a third of the time a C-STORE took).
    """
    with _configured:
        _config.LOG_HANDLER_LEVEL = "none"
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_REQUEST_IDENTIFIERS = False
        if getattr(dimse_messages.NamedTemporaryFile, "__name__", "") != "_spool_file":
            dimse_messages.NamedTemporaryFile = _spool_file
            dimse_messages.create_file_meta = fastpath.create_file_meta
            dimse_messages.write_file_meta_info = _write_file_meta_info


def _spool_file(*args: Any, **kwargs: Any):
    """Where pynetdicom streams a C-STORE data set: a `fastpath.SpoolFile` in the spool directory of
    the edge association whose DUL thread is writing; pynetdicom's own temporary file otherwise."""
    spool = getattr(threading.current_thread(), "spool_dir", None)
    if spool is not None:
        return fastpath.SpoolFile(spool)
    return tempfile.NamedTemporaryFile(*args, **kwargs)


def _write_file_meta_info(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    if isinstance(file_meta, fastpath.FileMeta):
        fp.write(fastpath.encode_file_meta(file_meta))
    else:
        _pydicom_write_file_meta_info(fp, file_meta, enforce_standard)


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    # Every storage class: a misrouted CT is stored and shown SKIPPED, never refused silently. Both
    # roles, so that a C-GET requestor can take our objects back on its own association.
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for sop_class in QUERY_RETRIEVE_CLASSES:
        ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    if settings.allowed_calling_aets:
        ae.require_calling_aet = list(settings.allowed_calling_aets)
    ae.require_called_aet = settings.strict_called_ae_title
    ae.maximum_pdu_size = settings.max_pdu_size
    # Admission (policy.Admission) enforces the limits; pynetdicom's own count must never refuse first.
    ae.maximum_associations = settings.max_associations + 16
    ae.acse_timeout = settings.dicom_read_timeout
    ae.network_timeout = settings.dicom_idle_timeout
    ae.dimse_timeout = settings.dicom_idle_timeout
    ae.connection_timeout = settings.dicom_read_timeout
    return ae


def event_handlers(settings: Settings, ingest: IngestService, database: Database,
                   refusals: RefusalLog) -> list[tuple]:
    """(event, handler, extra args) for every service the edge offers."""
    catalogue = Catalogue(settings, database)

    def tls_args(destination: Destination) -> tuple:
        return client_context(settings, destination)

    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ingest]),
        (evt.EVT_C_FIND, handle_find, [catalogue]),
        (evt.EVT_C_GET, handle_get, [catalogue]),
        (evt.EVT_C_MOVE, handle_move, [catalogue, lambda: settings.known_move_destinations, tls_args,
                                       settings.max_pdu_size]),
        (evt.EVT_REJECTED, handle_rejected, [refusals, settings.ae_title, list(settings.allowed_calling_aets)]),
    ] + ([(evt.EVT_RELEASED, handle_released, [database])] if settings.ready_on_release else [])


def endpoints(settings: Settings) -> list[Endpoint]:
    found = []
    if not settings.dicom_tls_only:
        found.append(Endpoint(settings.dicom_host, settings.dicom_port, tls=False))
    if settings.dicom_tls_port is not None:
        found.append(Endpoint(settings.dicom_host, settings.dicom_tls_port, tls=True))
    return found


def admission(settings: Settings) -> Admission:
    return Admission(networks=settings.allowed_network_objects, max_total=settings.max_associations,
                     max_per_source=settings.max_associations_per_source)


def build_receiver(settings: Settings, ingest: IngestService, database: Database, refusals: RefusalLog) -> Receiver:
    configure_pynetdicom()
    settings.ensure_dirs()
    tls = server_context(settings) if settings.dicom_tls_port is not None else None
    return Receiver(build_ae(settings), event_handlers(settings, ingest, database, refusals),
                    Bounds.from_settings(settings), refusals, spool_dir=settings.spool_dir, tls_context=tls)


@dataclass
class DicomEdge:
    """A running DICOM edge; `shutdown()` stops listening and ends what is running."""

    listener: Listener
    refusals: RefusalLog
    stops: list[Callable[[], None]] = field(default_factory=list)

    @property
    def port(self) -> int:
        """The first listening port (the plain one unless TLS only)."""
        return self.listener.addresses[0][1]

    def shutdown(self) -> None:
        self.listener.shutdown()
        for stop in self.stops:
            try:
                stop()
            except Exception:
                log.exception("stopping the DICOM edge")
        self.refusals.close()


def clear_spool(settings: Settings) -> None:
    """Delete what a previous run left in the spool directory (data sets that never completed)."""
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    for path in settings.spool_dir.glob("*"):
        if path.is_file():
            path.unlink(missing_ok=True)


def start_scp(settings: Settings, ingest: IngestService) -> DicomEdge:
    """Listen and receive in this process, in background threads; the caller owns `shutdown()`."""
    refusals = RefusalLog(ingest.database)
    receiver = build_receiver(settings, ingest, ingest.database, refusals)
    listener = Listener(endpoints(settings), admission(settings), refusals, receiver.handle,
                        tls_context=receiver.tls_context, read_timeout=settings.dicom_read_timeout).start()
    for host, port, tls in listener.addresses:
        log.info("DICOM SCP %s listening on %s:%s%s", settings.ae_title, host, port, " (TLS)" if tls else "")
    return DicomEdge(listener, refusals, [receiver.shutdown, ingest.close])
