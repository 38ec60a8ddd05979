"""C-STORE SCU: send result objects to a destination (PACS), over DICOM TLS when it says ``?tls``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from triage_core.settings import Destination, Settings

from .tls import TLSConfigurationError, client_context

log = logging.getLogger(__name__)


class ExportError(Exception):
    """A destination could not take every object; the message says why."""


def send_files(destination: Destination, paths: Sequence[Path], *, calling_ae_title: str,
               timeout: float = 30.0, settings: Settings | None = None) -> int:
    """C-STORE every file on one association. Returns how many were stored; raises ExportError otherwise.

    A TLS destination is reached with `tls.client_context` (its ``ca=`` or
    CXR_TRIAGE_TLS_CA_FILE, our certificate when configured): `settings` is
    needed for it.
    """
    tls_args = None
    if destination.tls:
        if settings is None:
            raise ExportError(f"{destination} asks for TLS but no settings were given to build the TLS context")
        try:
            tls_args = client_context(settings, destination)
        except TLSConfigurationError as exc:
            raise ExportError(str(exc)) from exc
    datasets = [dcmread(path) for path in paths]
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        how = " over TLS (handshake, certificate or name check failed?)" if destination.tls else ""
        raise ExportError(f"association with {destination} was not established{how} "
                          "(rejected, aborted or unreachable)")
    stored = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise ExportError(f"no C-STORE response from {destination} for SOP {ds.SOPInstanceUID}")
            if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                raise ExportError(f"{destination} answered 0x{code:04X} for SOP {ds.SOPInstanceUID}")
            stored += 1
    finally:
        assoc.release()
    log.info("exported %d object(s) to %s", stored, destination)
    return stored
