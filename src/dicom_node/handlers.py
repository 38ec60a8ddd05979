"""DIMSE handlers. Dependencies arrive as arguments (`evt_handlers` extra args), never globals."""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pynetdicom import events

from .ingest import IngestService
from .statuses import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, is_success

log = logging.getLogger(__name__)


def handle_echo(event: events.Event) -> int:
    return SUCCESS


def handle_rejected(event: events.Event, ingest: IngestService) -> None:
    """An association we refused (calling AE title not allowed, too many associations): a security alert."""
    requestor = event.assoc.requestor
    calling = (requestor.ae_title or "").strip()
    allowed = [a.strip() for a in event.assoc.ae.require_calling_aet]
    reason = "calling AE title not allowed" if allowed and calling not in allowed else "association refused"
    ingest.association_rejected(calling_ae_title=calling, address=str(requestor.address or ""), reason=reason)


def handle_store(event: events.Event, ingest: IngestService) -> int | Dataset:
    """Spool, record, answer: never an unhandled exception. A failure carries
    its reason as Error Comment (no patient data: UIDs and sizes only)."""
    calling_ae_title = event.assoc.requestor.ae_title.strip()
    request = event.request
    try:
        encoded = event.encoded_dataset(include_meta=True)
        dataset = event.dataset
        transfer_syntax_uid = str(event.context.transfer_syntax)
    except Exception as exc:
        log.warning("C-STORE from %s (affected SOP %s) cannot be decoded: %s",
                    calling_ae_title, request.AffectedSOPInstanceUID, exc)
        return _status(CANNOT_UNDERSTAND, "dataset cannot be decoded")
    try:
        outcome = ingest.store(
            dataset,
            encoded,
            calling_ae_title=calling_ae_title,
            transfer_syntax_uid=transfer_syntax_uid,
            affected_sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
            affected_sop_class_uid=str(request.AffectedSOPClassUID or ""),
        )
    except Exception:
        log.exception("C-STORE from %s (affected SOP %s) failed while recording",
                      calling_ae_title, request.AffectedSOPInstanceUID)
        return _status(OUT_OF_RESOURCES, "storage failed; try again later")
    if is_success(outcome.status):
        return outcome.status
    return _status(outcome.status, outcome.reason)


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]  # LO
    return status
