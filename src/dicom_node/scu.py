"""C-STORE SCU: send result objects to a destination (PACS), over DICOM TLS when it says ``?tls``.

Each object is offered as it is stored (the heatmaps JPEG baseline) and, for every SOP class,
uncompressed too; an object whose compressed syntax the destination refuses is decompressed and
sent uncompressed, so a PACS that takes only uncompressed data still gets everything.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Sequence

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from triage_core.settings import Destination, Settings

from .tls import TLSConfigurationError, client_context

log = logging.getLogger(__name__)
_UNCOMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})


def _no_delay(event) -> None:
    """TCP_NODELAY on the association's socket: a C-STORE request is a command PDU and a data set
    PDU written one after the other, and with Nagle's algorithm the second waits for the peer's
    delayed acknowledgement of the first (about 40 ms on Linux) on every object."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:  # a socket type without the option: slower, not wrong
        log.debug("TCP_NODELAY not set on the export socket: %s", exc)


def _uncompressed(ds, destination: Destination):
    """`ds` decompressed to explicit VR little endian (colour as RGB); it stays marked lossy."""
    try:
        ds.decompress(generate_instance_uid=False)  # the same instance in another transfer syntax
    except Exception as exc:  # a missing decoder: say so rather than send what was refused
        raise ExportError(f"{destination} refuses {ds.file_meta.TransferSyntaxUID.name} for SOP {ds.SOPInstanceUID} "
                          f"and it could not be decompressed: {exc}") from exc
    log.info("%s takes SOP %s uncompressed only: sent decompressed", destination, ds.SOPInstanceUID)
    return ds


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
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}):
        if syntax not in _UNCOMPRESSED:  # a context of its own, so that refusing it refuses nothing else
            ae.add_requested_context(sop_class, [syntax])
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)])
    if not assoc.is_established:
        how = " over TLS (handshake, certificate or name check failed?)" if destination.tls else ""
        raise ExportError(f"association with {destination} was not established{how} "
                          "(rejected, aborted or unreachable)")
    stored = 0
    try:
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        for ds in datasets:
            syntax = str(ds.file_meta.TransferSyntaxUID)
            if syntax not in _UNCOMPRESSED and (str(ds.SOPClassUID), syntax) not in accepted:
                ds = _uncompressed(ds, destination)
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
