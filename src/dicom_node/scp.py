"""Wiring of the storage SCP: which classes and syntaxes we accept, and the handlers."""

from __future__ import annotations

import logging

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
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from triage_core.settings import Settings

from .handlers import handle_echo, handle_rejected, handle_store
from .ingest import IngestService

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


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    # Every storage class: a misrouted CT is stored and shown SKIPPED, never refused silently.
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    if settings.allowed_calling_aets:
        ae.require_calling_aet = list(settings.allowed_calling_aets)
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.network_timeout = 60
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    return ae


def start_scp(settings: Settings, ingest: IngestService) -> ThreadedAssociationServer:
    """Start listening in background threads; the caller owns `shutdown()`."""
    ae = build_ae(settings)
    handlers = [(evt.EVT_C_ECHO, handle_echo), (evt.EVT_C_STORE, handle_store, [ingest]),
                (evt.EVT_REJECTED, handle_rejected, [ingest])]
    server = ae.start_server((settings.dicom_host, settings.dicom_port), block=False, evt_handlers=handlers)
    log.info("DICOM SCP %s listening on %s:%s", settings.ae_title, settings.dicom_host, settings.dicom_port)
    return server
