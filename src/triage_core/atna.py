"""Audit events shaped after DICOM PS3.15 A.5 (IHE ATNA), and their RFC 5424 syslog copy.

Each ``AuditAction`` maps to a DICOM audit message: EventID (CID 400), EventActionCode,
EventTypeCode for security alerts (CID 403), the outcome (PS3.15 A.5.1), the active
participants (who asked; our process), the audit source, and the participant objects (the
patient by Patient ID, the study by Study Instance UID, the query). ``message_xml`` renders
one event as the PS3.15 A.5.1 ``AuditMessage``; ``SyslogSink`` sends it as an RFC 5424
message (MSGID ``IHE+RFC-3881``, facility authpriv, severity notice; our chain's ``seq``,
``hash`` and ``prev_hash`` in the structured data element ``cxrAudit@32473``) over UDP
(RFC 5426), TCP or TLS (RFC 5425 octet counting), from a background thread with a bounded
queue so that a slow collector never holds up a C-STORE or a request. The database rows
remain the record of truth; the collector holds a copy (and, with it, the hashes that
anchor the chain outside this database).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import ssl
import threading
from dataclasses import dataclass
from datetime import timezone
from typing import Any, Sequence
from xml.etree import ElementTree as ET

from .states import AuditAction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Code:
    code: str
    scheme: str
    meaning: str


DCM = "DCM"
# CID 400 Audit Event ID
APPLICATION_ACTIVITY = Code("110100", DCM, "Application Activity")
AUDIT_LOG_USED = Code("110101", DCM, "Audit Log Used")
INSTANCES_ACCESSED = Code("110103", DCM, "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", DCM, "DICOM Instances Transferred")
QUERY = Code("110112", DCM, "Query")
SECURITY_ALERT = Code("110113", DCM, "Security Alert")
# CID 403 Security Alert Type
LOGIN = Code("110122", DCM, "Login")
NODE_AUTHENTICATION = Code("110126", DCM, "Node Authentication")
SECURITY_CONFIGURATION = Code("110129", DCM, "Security Configuration")
RESTRICTED_FUNCTION = Code("110132", DCM, "Use of Restricted Function")
# CID 402 Audit Active Participant Role ID
SOURCE = Code("110153", DCM, "Source Role ID")
DESTINATION = Code("110152", DCM, "Destination Role ID")
APPLICATION = Code("110150", DCM, "Application")


@dataclass(frozen=True)
class Shape:
    """How one of our actions reads as a DICOM audit message."""

    event_id: Code
    action_code: str  # C create, R read, U update, D delete, E execute
    type_code: Code | None = None
    #: Whether the actor is the data's source (instances sent to us) rather than its destination.
    actor_is_source: bool = False


SHAPES: dict[AuditAction, Shape] = {
    AuditAction.INSTANCE_RECEIVED: Shape(INSTANCES_TRANSFERRED, "C", actor_is_source=True),
    AuditAction.INSTANCE_DUPLICATE: Shape(INSTANCES_TRANSFERRED, "C", actor_is_source=True),
    AuditAction.INSTANCE_REJECTED: Shape(INSTANCES_TRANSFERRED, "C", actor_is_source=True),
    AuditAction.STATUS_CHANGED: Shape(INSTANCES_ACCESSED, "U"),
    AuditAction.JOB_ENQUEUED: Shape(INSTANCES_ACCESSED, "E"),
    AuditAction.RESULT_STORED: Shape(INSTANCES_ACCESSED, "C"),
    AuditAction.RESULT_SUPERSEDED: Shape(INSTANCES_ACCESSED, "U"),
    AuditAction.EXPORT_STATUS: Shape(INSTANCES_TRANSFERRED, "R"),
    # An operator re-drives the transfer of a study's results to PACS.
    AuditAction.EXPORT_RETRY_REQUESTED: Shape(INSTANCES_TRANSFERRED, "E"),
    AuditAction.READ_WORKLIST: Shape(QUERY, "E"),
    AuditAction.QUERY: Shape(QUERY, "E"),
    AuditAction.READ_STUDY: Shape(INSTANCES_ACCESSED, "R"),
    AuditAction.READ_METADATA: Shape(INSTANCES_ACCESSED, "R"),
    AuditAction.READ_SR: Shape(INSTANCES_TRANSFERRED, "R"),
    # A radiologist records that a study has been read (its worklist state, not its images, changes).
    AuditAction.MARKED_READ: Shape(INSTANCES_ACCESSED, "U"),
    AuditAction.MARKED_UNREAD: Shape(INSTANCES_ACCESSED, "U"),
    AuditAction.READ_HEATMAPS: Shape(INSTANCES_TRANSFERRED, "R"),
    AuditAction.READ_PARAMETRIC_MAPS: Shape(INSTANCES_TRANSFERRED, "R"),
    AuditAction.READ_INSTANCES: Shape(INSTANCES_TRANSFERRED, "R"),
    AuditAction.READ_RENDERED: Shape(INSTANCES_TRANSFERRED, "R"),
    AuditAction.READ_AUDIT: Shape(AUDIT_LOG_USED, "R"),
    AuditAction.VERIFY_AUDIT: Shape(AUDIT_LOG_USED, "R"),
    AuditAction.AUTH_REFUSED: Shape(SECURITY_ALERT, "E", LOGIN),
    AuditAction.ACCESS_DENIED: Shape(SECURITY_ALERT, "E", RESTRICTED_FUNCTION),
    AuditAction.ASSOCIATION_REJECTED: Shape(SECURITY_ALERT, "E", NODE_AUTHENTICATION),
    # A peer that broke the edge's bounds (timeouts, sizes) and was cut off.
    AuditAction.ASSOCIATION_ABORTED: Shape(SECURITY_ALERT, "E", NODE_AUTHENTICATION),
    AuditAction.DICOM_QUERY: Shape(QUERY, "E"),
    AuditAction.DICOM_RETRIEVE: Shape(INSTANCES_TRANSFERRED, "R"),
    AuditAction.USER_CREATED: Shape(SECURITY_ALERT, "E", SECURITY_CONFIGURATION),
    AuditAction.USER_REVOKED: Shape(SECURITY_ALERT, "E", SECURITY_CONFIGURATION),
}
# Every action has a shape: a new action without one fails here, at import.
assert set(SHAPES) == set(AuditAction), sorted(set(AuditAction) - set(SHAPES))


def _coded(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.scheme, "originalText": code.meaning})


def _is_ip(text: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
        return True
    except OSError:
        return False


def message_xml(event: Any, *, source_id: str) -> bytes:
    """One audit event as a DICOM PS3.15 A.5.1 ``AuditMessage`` (UTF-8 XML)."""
    shape = SHAPES[AuditAction(event.action)]
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": shape.action_code,
        "EventDateTime": event.at.astimezone(timezone.utc).isoformat(timespec="milliseconds"),
        "EventOutcomeIndicator": str(event.outcome),
    })
    _coded(ident, "EventID", shape.event_id)
    if shape.type_code is not None:
        _coded(ident, "EventTypeCode", shape.type_code)
    detail = event.detail or {}
    reason = detail.get("reason") or detail.get("error")
    if event.outcome and reason:
        ET.SubElement(ident, "EventOutcomeDescription").text = str(reason)[:256]

    requestor = {"UserID": event.actor, "UserIsRequestor": "true"}
    calling = detail.get("calling_ae_title")
    if calling:
        requestor["AlternativeUserID"] = f"AETITLES={calling}"
    if event.client_address:
        requestor["NetworkAccessPointID"] = event.client_address
        requestor["NetworkAccessPointTypeCode"] = "2" if _is_ip(event.client_address) else "1"
    actor = ET.SubElement(root, "ActiveParticipant", requestor)
    if not event.actor.startswith("system:"):
        _coded(actor, "RoleIDCode", SOURCE if shape.actor_is_source else DESTINATION)
    us = ET.SubElement(root, "ActiveParticipant", {"UserID": source_id, "UserIsRequestor": "false"})
    _coded(us, "RoleIDCode", APPLICATION)

    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4", "codeSystemName": "DCM",
                                                  "originalText": "Application Server"})
    if event.patient_id:
        patient = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": event.patient_id, "ParticipantObjectTypeCode": "1",
            "ParticipantObjectTypeCodeRole": "1"})
        ET.SubElement(patient, "ParticipantObjectIDTypeCode", {"csd-code": "2", "codeSystemName": "RFC-3881",
                                                               "originalText": "Patient Number"})
    studies = [event.study_instance_uid] if event.study_instance_uid else list(detail.get("study_instance_uids") or [])
    for uid in studies[:100]:
        study = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": uid, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3"})
        ET.SubElement(study, "ParticipantObjectIDTypeCode", {"csd-code": "110180", "codeSystemName": "DCM",
                                                             "originalText": "Study Instance UID"})
        sops = detail.get("sop_instance_uids") or ([detail["sop_instance_uid"]] if detail.get("sop_instance_uid") else [])
        if sops:
            description = ET.SubElement(study, "ParticipantObjectDescription")
            sop_class = ET.SubElement(description, "SOPClass", {"NumberOfInstances": str(len(sops))})
            for sop in sops[:100]:
                ET.SubElement(sop_class, "Instance", {"UID": sop})
    if shape.event_id == QUERY:
        query = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": "QIDO-RS" if event.action == AuditAction.QUERY else "worklist",
            "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "24"})
        ET.SubElement(query, "ParticipantObjectIDTypeCode", {"csd-code": "110181", "codeSystemName": "DCM",
                                                             "originalText": "SOP Class UID"})
        import base64
        import json

        filters = {k: v for k, v in detail.items() if k not in {"study_instance_uids"}}
        ET.SubElement(query, "ParticipantObjectQuery").text = base64.b64encode(
            json.dumps(filters, sort_keys=True).encode()).decode()
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _sd_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_message(event: Any, *, source_id: str, hostname: str, app_name: str = "cxr-triage") -> bytes:
    """An RFC 5424 message: ``<85>1 TIMESTAMP HOST APP PROCID IHE+RFC-3881 [SD] BOM XML``."""
    pri = 10 * 8 + 5  # facility authpriv (10), severity notice (5)
    timestamp = event.at.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    sd = (f'[cxrAudit@32473 seq="{event.seq}" hash="{event.hash}" prev_hash="{event.prev_hash}" '
          f'action="{_sd_value(event.action)}"]')
    header = f"<{pri}>1 {timestamp} {hostname[:255] or '-'} {app_name} {os.getpid()} IHE+RFC-3881 {sd} "
    return header.encode("ascii", "replace") + b"\xef\xbb\xbf" + message_xml(event, source_id=source_id)


class SyslogSink:
    """Sends committed audit events to a syslog collector from a background thread (per process)."""

    def __init__(self, url: str, *, source_id: str, ca_file: str | None = None, max_queue: int = 10000) -> None:
        scheme, _, rest = url.partition("://")
        host, _, port = rest.rpartition(":")
        self.scheme, self.host, self.port = scheme, host, int(port)
        self.source_id = source_id
        self.hostname = socket.gethostname()
        self.ca_file = ca_file
        self.max_queue = max_queue
        self._queue: queue.Queue | None = None
        self._pid = None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    @classmethod
    def from_settings(cls, settings) -> "SyslogSink":
        return cls(settings.audit_syslog, source_id=f"{settings.ae_title}@{socket.gethostname()}",
                   ca_file=str(settings.audit_syslog_ca_file) if settings.audit_syslog_ca_file else None)

    def __call__(self, events: Sequence[Any]) -> None:
        messages = [syslog_message(e, source_id=self.source_id, hostname=self.hostname) for e in events]
        q = self._started()
        for message in messages:
            try:
                q.put_nowait(message)
            except queue.Full:
                log.warning("audit syslog queue full: audit event copy dropped (the database keeps the event)")

    def _started(self) -> queue.Queue:
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child: a thread of its own
                self._pid = os.getpid()
                self._queue = queue.Queue(self.max_queue)
                self._sock = None
                threading.Thread(target=self._run, args=(self._queue,), name="audit-syslog", daemon=True).start()
            return self._queue

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until the queue is sent (tests, shutdown)."""
        import time

        deadline = time.monotonic() + timeout
        while self._queue is not None and self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _connect(self) -> socket.socket:
        if self.scheme == "udp":
            sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect((self.host, self.port))
            return sock
        sock = socket.create_connection((self.host, self.port), timeout=10)
        if self.scheme == "tls":
            context = ssl.create_default_context(cafile=self.ca_file)
            sock = context.wrap_socket(sock, server_hostname=self.host)
        return sock

    def _send(self, message: bytes) -> None:
        if self._sock is None:
            self._sock = self._connect()
        if self.scheme == "udp":
            self._sock.send(message)
        else:
            self._sock.sendall(f"{len(message)} ".encode() + message)  # RFC 5425/6587 octet counting

    def _run(self, q: queue.Queue) -> None:
        import time

        while True:
            message = q.get()
            try:
                for attempt in range(3):
                    try:
                        self._send(message)
                        break
                    except OSError as exc:
                        if self._sock is not None:
                            self._sock.close()
                        self._sock = None
                        if attempt == 2:
                            log.warning("audit syslog to %s://%s:%s failed: %s (event copy dropped; the database "
                                        "keeps the event)", self.scheme, self.host, self.port, exc)
                        else:
                            time.sleep(0.2 * (attempt + 1))
            finally:
                q.task_done()
