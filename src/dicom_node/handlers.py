"""DIMSE handlers. Dependencies arrive as arguments (`evt_handlers` extra args), never globals.

Every failure path logs and answers a specific status; no handler lets an
exception reach pynetdicom.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterator

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom import build_context, events

from triage_core import audit, metrics
from triage_core.models import Study
from triage_core.settings import Destination
from triage_core.states import AuditAction

from .fastpath import SpoolFile
from .ingest import IngestService
from .policy import RefusalLog, source_address
from .query import Catalogue, QueryError, StoredObject, level_of
from .readiness import mark_released
from .statuses import (
    CANNOT_UNDERSTAND,
    FIND_UNABLE_TO_PROCESS,
    GET_UNABLE_TO_PROCESS,
    MOVE_DESTINATION_UNKNOWN,
    MOVE_UNABLE_TO_PROCESS,
    OUT_OF_RESOURCES,
    PENDING,
    SUCCESS,
    is_success,
)

log = logging.getLogger(__name__)
ACTOR = audit.SYSTEM_ACTORS["node"]
#: UIDs of matched studies listed in one DICOM_QUERY audit event at most.
AUDIT_UID_LIMIT = 100
#: What `handle_move` is given to build the TLS arguments of a sub-association.
TLSArgs = Callable[[Destination], tuple]


def handle_echo(event: events.Event) -> int:
    return SUCCESS


def handle_store(event: events.Event, ingest: IngestService) -> int | Dataset:
    """Spool, record, answer: never an unhandled exception. A failure carries
    its reason as Error Comment (no patient data: UIDs and sizes only). Counted
    in the node's metrics (outcome or DIMSE status, and the time it took)."""
    started = time.perf_counter()
    answer = _store(event, ingest)
    code = answer if isinstance(answer, int) else int(answer.Status)
    try:  # a metric never changes the answer
        counters = metrics.node()
        counters.cstore_seconds.observe(time.perf_counter() - started)
        if is_success(code):
            counters.instances_received.labels("duplicate" if getattr(event.assoc, "cxr_duplicate", False)
                                               else "stored").inc()
        else:
            counters.instances_refused.labels(f"0x{code:04X}").inc()
    except Exception:
        log.exception("C-STORE metrics could not be counted")
    return answer


def _store(event: events.Event, ingest: IngestService) -> int | Dataset:
    calling_ae_title = event.assoc.requestor.ae_title.strip()
    request = event.request
    affected = dict(affected_sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
                    affected_sop_class_uid=str(request.AffectedSOPClassUID or ""))
    try:
        transfer_syntax_uid = str(event.context.transfer_syntax)
        try:
            path: Path | None = event.dataset_path  # streamed to the spool directory as it arrived
        except AttributeError:
            path = None
        if path is not None:
            spool = getattr(request, "_dataset_file", None)
            digest = spool.finish() if isinstance(spool, SpoolFile) else None
            outcome = ingest.store_file(Path(path), calling_ae_title=calling_ae_title,
                                        transfer_syntax_uid=transfer_syntax_uid, digest=digest, **affected)
        else:
            try:
                encoded = event.encoded_dataset(include_meta=True)
            except Exception as exc:
                log.warning("C-STORE from %s (affected SOP %s) cannot be decoded: %s",
                            calling_ae_title, request.AffectedSOPInstanceUID, exc)
                return _status(CANNOT_UNDERSTAND, "dataset cannot be decoded")
            outcome = ingest.store(None, encoded, calling_ae_title=calling_ae_title,
                                   transfer_syntax_uid=transfer_syntax_uid, **affected)
    except Exception:
        log.exception("C-STORE from %s (affected SOP %s) failed while recording",
                      calling_ae_title, request.AffectedSOPInstanceUID)
        return _status(OUT_OF_RESOURCES, "storage failed; try again later")
    if is_success(outcome.status):
        if outcome.study_id is not None:
            _studies_sent(event.assoc).add(outcome.study_id)
        event.assoc.cxr_duplicate = outcome.duplicate
        return outcome.status
    return _status(outcome.status, outcome.reason)


def _studies_sent(assoc) -> set[int]:
    """The studies this association stored instances of (kept on the association object)."""
    studies = getattr(assoc, "cxr_studies", None)
    if studies is None:
        studies = assoc.cxr_studies = set()
    return studies


def handle_released(event: events.Event, database) -> None:
    """EVT_RELEASED: the sender released the association after its last instance (an abort does not
    count): the quiet period of the studies it sent ends now (CXR_TRIAGE_READY_ON_RELEASE)."""
    studies = getattr(event.assoc, "cxr_studies", None)
    if not studies:
        return
    try:
        marked = mark_released(database, set(studies))
    except Exception:  # the quiet period still ends in its own time
        log.exception("marking %d studies released failed", len(studies))
        return
    log.info("association from %s released: %d study(ies) ready without waiting for quiet",
             event.assoc.requestor.ae_title.strip(), marked)


def handle_rejected(event: events.Event, refusals: RefusalLog, our_ae_title: str,
                    allowed_calling_aets: list[str]) -> None:
    """EVT_REJECTED: pynetdicom refused an A-ASSOCIATE-RQ; say why, without patient data."""
    assoc = event.assoc
    primitive = assoc.requestor.primitive
    called = str(getattr(primitive, "called_ae_title", "") or "").strip()
    calling = str(getattr(primitive, "calling_ae_title", "") or "").strip()
    if allowed_calling_aets and calling not in allowed_calling_aets:
        kind, reason = "calling-ae-not-allowed", f"calling AE title {calling!r} is not allowed"
    elif called != our_ae_title:
        kind, reason = "called-ae-not-ours", f"called AE title {called!r} is not {our_ae_title!r}"
    else:
        kind, reason = "rejected", "association rejected by the DICOM upper layer"
    if hasattr(assoc, "refusal"):
        assoc.refusal = reason
    refusals.rejected(reason, kind=kind, source=source_address((assoc.requestor.address, 0)),
                      calling_ae_title=calling, called_ae_title=called)


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]  # LO
    return status


# --- Query/Retrieve ------------------------------------------------------------------------------------


def handle_find(event: events.Event, catalogue: Catalogue) -> Iterator[tuple[int, Dataset | None]]:
    """C-FIND (Study Root, STUDY/SERIES/IMAGE) over received images and current results."""
    calling_ae_title = event.assoc.requestor.ae_title.strip()
    try:
        identifier = event.identifier
        level = level_of(identifier)
        responses = list(catalogue.find(identifier, retrieve_ae_title=event.assoc.acceptor.ae_title.strip()))
    except QueryError as exc:
        log.warning("C-FIND from %s refused with 0x%04X: %s", calling_ae_title, exc.status, exc.reason)
        yield _status(exc.status, exc.reason), None
        return
    except Exception as exc:
        log.exception("C-FIND from %s could not be processed", calling_ae_title)
        yield _status(FIND_UNABLE_TO_PROCESS, f"query failed: {type(exc).__name__}"), None
        return
    study_uids = sorted({str(r.StudyInstanceUID) for r in responses})
    _audit_read(catalogue, AuditAction.DICOM_QUERY, None, calling_ae_title=calling_ae_title,
                source=source_address((event.assoc.requestor.address, 0)), level=level.value,
                matches=len(responses), study_instance_uids=study_uids[:AUDIT_UID_LIMIT])
    log.info("C-FIND from %s at %s level: %d match(es)", calling_ae_title, level.value, len(responses))
    for response in responses:
        if event.is_cancelled:
            yield 0xFE00, None
            return
        yield PENDING, response


def handle_get(event: events.Event, catalogue: Catalogue) -> Iterator:
    """C-GET: the selected objects go back as C-STORE sub-operations on the same association."""
    calling_ae_title = event.assoc.requestor.ae_title.strip()
    objects = _select(event, catalogue, calling_ae_title, "C-GET")
    if isinstance(objects, Dataset):
        yield 1
        yield objects, None
        return
    yield len(objects)
    _audit_retrieval(event, catalogue, objects, calling_ae_title, destination=calling_ae_title, how="C-GET")
    accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in event.assoc.accepted_contexts}
    for stored in objects:
        if event.is_cancelled:
            yield 0xFE00, None
            return
        yield PENDING, _sendable(stored, accepted)


def handle_move(event: events.Event, catalogue: Catalogue, destinations: Callable[[], dict[str, Destination]],
                tls_args: TLSArgs, max_pdu_size: int) -> Iterator:
    """C-MOVE to a destination known by AE title (unknown: 0xA801); `destinations` is asked each time."""
    calling_ae_title = event.assoc.requestor.ae_title.strip()
    move_destination = event.move_destination
    name = (move_destination.decode("ascii", "replace") if isinstance(move_destination, bytes)
            else str(move_destination or "")).strip()
    destination = destinations().get(name)
    if destination is None:
        log.warning("C-MOVE from %s to unknown destination %r: 0x%04X", calling_ae_title, name,
                    MOVE_DESTINATION_UNKNOWN)
        yield None, None
        return
    objects = _select(event, catalogue, calling_ae_title, "C-MOVE")
    contexts = []
    if not isinstance(objects, Dataset):
        for sop_class, syntax in sorted({_file_syntax(o) for o in objects}):
            if len(contexts) >= 126:
                break
            contexts.append(build_context(sop_class, syntax))
            if UID(syntax).is_compressed:
                contexts.append(build_context(sop_class, [UID("1.2.840.10008.1.2.1"), UID("1.2.840.10008.1.2")]))
    options: dict = {"contexts": contexts or None, "max_pdu": max_pdu_size}
    if destination.tls:
        options["tls_args"] = tls_args(destination)
    yield destination.host, destination.port, options
    if isinstance(objects, Dataset):
        yield 1
        yield objects, None
        return
    yield len(objects)
    _audit_retrieval(event, catalogue, objects, calling_ae_title, destination=str(destination), how="C-MOVE")
    for stored in objects:
        if event.is_cancelled:
            yield 0xFE00, None
            return
        yield PENDING, _sendable(stored, None)


def _select(event: events.Event, catalogue: Catalogue, calling_ae_title: str,
            what: str) -> list[StoredObject] | Dataset:
    """The objects to send, or the failure status to answer."""
    try:
        objects = catalogue.retrieve(event.identifier)
    except QueryError as exc:
        log.warning("%s from %s refused with 0x%04X: %s", what, calling_ae_title, exc.status, exc.reason)
        return _status(exc.status, exc.reason)
    except Exception as exc:
        log.exception("%s from %s could not be processed", what, calling_ae_title)
        code = GET_UNABLE_TO_PROCESS if what == "C-GET" else MOVE_UNABLE_TO_PROCESS
        return _status(code, f"retrieve failed: {type(exc).__name__}")
    if len(objects) > 65535:
        code = GET_UNABLE_TO_PROCESS if what == "C-GET" else MOVE_UNABLE_TO_PROCESS
        return _status(code, f"{len(objects)} objects selected; at most 65535 per request")
    log.info("%s from %s: %d object(s)", what, calling_ae_title, len(objects))
    return objects


def _file_syntax(stored: StoredObject) -> tuple[str, str]:
    try:
        with stored.local() as path:
            meta = read_file_meta_info(path)
        return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
    except Exception:  # unreadable: its sub-operation will fail and be counted
        return stored.sop_class_uid, "1.2.840.10008.1.2.1"


def _sendable(stored: StoredObject, accepted: set[tuple[str, str]] | None) -> Dataset | Path:
    """The stored object as pynetdicom sends it (a Dataset: its C-GET and C-MOVE take nothing else),
    read when its turn comes so that one object at a time is in memory. For C-GET (`accepted` known)
    a compressed object goes decompressed when the peer took no context with its syntax."""
    try:
        with stored.local() as path:
            ds = dcmread(path)
    except Exception as exc:
        log.error("stored object %s cannot be read: %s", stored.sop_instance_uid, exc)
        return Path(stored.key)  # not a Dataset: pynetdicom counts a failed sub-operation and goes on
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if accepted is not None and syntax and UID(syntax).is_compressed \
            and (str(ds.SOPClassUID), syntax) not in accepted:
        try:
            ds.decompress(generate_instance_uid=False)  # the same instance in another transfer syntax
        except Exception as exc:
            log.warning("object %s cannot be decompressed for a peer that took no %s: %s",
                        stored.sop_instance_uid, UID(syntax).name, exc)
    return ds


def _audit_read(catalogue: Catalogue, action: AuditAction, study: Study | None, **detail) -> None:
    try:
        with catalogue.database.session() as session:
            audit.record(session, actor=ACTOR, action=action, study=study, **detail)
    except Exception:
        log.exception("audit of a DICOM read could not be written")


def _audit_retrieval(event: events.Event, catalogue: Catalogue, objects: list[StoredObject],
                     calling_ae_title: str, *, destination: str, how: str) -> None:
    """One DICOM_RETRIEVE event per study sent, naming who asked and where it went."""
    by_study: dict[int, list[StoredObject]] = {}
    for stored in objects:
        by_study.setdefault(stored.study_id, []).append(stored)
    try:
        with catalogue.database.session() as session:
            for study_id, items in by_study.items():
                audit.record(session, actor=ACTOR, action=AuditAction.DICOM_RETRIEVE, study=session.get(Study, study_id),
                             service=how, calling_ae_title=calling_ae_title, destination=destination,
                             source=source_address((event.assoc.requestor.address, 0)), objects=len(items))
    except Exception:
        log.exception("audit of a DICOM retrieve could not be written")
