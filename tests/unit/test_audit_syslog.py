"""The audit trail's RFC 5424 syslog copy (DICOM PS3.15 A.5 messages), received by a real listener socket."""

from __future__ import annotations

import re
import socket
import threading
from xml.etree import ElementTree as ET

import pytest
from sqlalchemy import select

from tests.conftest import free_port, wait_until
from triage_core import audit
from triage_core.atna import SHAPES, SyslogSink
from triage_core.db import Database
from triage_core.models import AuditEvent, Base, Study
from triage_core.states import AuditAction, AuditOutcome, StudyStatus

HEADER = re.compile(rb"^<85>1 (?P<ts>\S+Z) (?P<host>\S+) cxr-triage (?P<pid>\d+) IHE\+RFC-3881 "
                    rb"\[cxrAudit@32473 seq=\"(?P<seq>\d+)\" hash=\"(?P<hash>[0-9a-f]{64})\" "
                    rb"prev_hash=\"(?P<prev>[0-9a-f]{64})\" action=\"(?P<action>\w+)\"\] \xef\xbb\xbf(?P<xml>.*)$",
                    re.S)


class Listener:
    """A syslog collector: UDP datagrams, or TCP with RFC 6587 octet counting."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.port = free_port()
        self.messages: list[bytes] = []
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.bind(("127.0.0.1", self.port))
        if transport == "tcp":
            self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                if self.transport == "udp":
                    self.messages.append(self.sock.recv(65535))
                else:
                    conn, _ = self.sock.accept()
                    threading.Thread(target=self.read_stream, args=(conn,), daemon=True).start()
            except (socket.timeout, OSError):
                continue

    def read_stream(self, conn: socket.socket) -> None:
        buffer = b""
        conn.settimeout(0.2)
        while not self.stop.is_set():
            try:
                chunk = conn.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                break
            buffer += chunk
            while b" " in buffer:
                length, _, rest = buffer.partition(b" ")
                if len(rest) < int(length):
                    break
                self.messages.append(rest[: int(length)])
                buffer = rest[int(length):]
        conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        self.sock.close()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_committed_events_reach_the_collector_as_dicom_audit_messages(tmp_path, transport):
    listener = Listener(transport)
    sink = SyslogSink(f"{transport}://127.0.0.1:{listener.port}", source_id="CXR_TRIAGE@test-host")
    database = Database(f"sqlite:///{tmp_path / 'syslog.sqlite'}", audit_sink=sink)
    Base.metadata.create_all(database.engine)
    try:
        with database.session() as session:
            study = Study(study_instance_uid="1.2.3.4", status=str(StudyStatus.DONE), patient_id="PID-42",
                          patient_name="Secret^Name")
            session.add(study)
            session.flush()
            audit.record(session, actor="dr.house", action=AuditAction.READ_STUDY, study=study,
                         client_address="10.0.0.7")
            audit.record(session, actor="unauthenticated@10.0.0.9", action=AuditAction.AUTH_REFUSED,
                         outcome=AuditOutcome.MINOR_FAILURE, client_address="10.0.0.9", reason="unknown key")
            audit.record(session, actor="system:dicom_node", action=AuditAction.INSTANCE_RECEIVED, study=study,
                         sop_instance_uid="1.2.3.4.5", calling_ae_title="MODALITY1")
        with pytest.raises(RuntimeError):  # a rolled-back transaction sends nothing
            with database.session() as session:
                audit.record(session, actor="x", action=AuditAction.READ_WORKLIST)
                raise RuntimeError
        sink.flush()
        wait_until(lambda: len(listener.messages) >= 3, 10, interval=0.05, what="three syslog messages")
        with database.session() as session:
            rows = session.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
    finally:
        listener.close()
        database.dispose()
    assert len(listener.messages) == 3
    parsed = [HEADER.match(m) for m in listener.messages]
    assert all(parsed), listener.messages[0][:200]
    assert [(int(p["seq"]), p["hash"].decode(), p["prev"].decode()) for p in parsed] == [
        (r.seq, r.hash, r.prev_hash) for r in rows]
    read, refused, received = (ET.fromstring(p["xml"]) for p in parsed)
    assert b"Secret" not in b"".join(listener.messages)  # the Patient ID identifies; the name never travels

    ident = read.find("EventIdentification")
    assert ident.get("EventActionCode") == "R" and ident.get("EventOutcomeIndicator") == "0"
    assert ident.find("EventID").get("csd-code") == "110103"
    requestor, ours = read.findall("ActiveParticipant")
    assert requestor.get("UserID") == "dr.house" and requestor.get("UserIsRequestor") == "true"
    assert requestor.get("NetworkAccessPointID") == "10.0.0.7" and requestor.get("NetworkAccessPointTypeCode") == "2"
    assert ours.get("UserID") == "CXR_TRIAGE@test-host" and ours.get("UserIsRequestor") == "false"
    assert read.find("AuditSourceIdentification").get("AuditSourceID") == "CXR_TRIAGE@test-host"
    objects = {o.find("ParticipantObjectIDTypeCode").get("csd-code"): o.get("ParticipantObjectID")
               for o in read.findall("ParticipantObjectIdentification")}
    assert objects == {"2": "PID-42", "110180": "1.2.3.4"}

    alert = refused.find("EventIdentification")
    assert alert.find("EventID").get("csd-code") == "110113" and alert.get("EventOutcomeIndicator") == "4"
    assert alert.find("EventTypeCode").get("csd-code") == "110122"
    assert alert.find("EventOutcomeDescription").text == "unknown key"

    transfer = received.find("EventIdentification")
    assert transfer.find("EventID").get("csd-code") == "110104" and transfer.get("EventActionCode") == "C"
    assert received.find("ActiveParticipant").get("AlternativeUserID") == "AETITLES=MODALITY1"
    instance = received.find(".//ParticipantObjectDescription/SOPClass/Instance")
    assert instance.get("UID") == "1.2.3.4.5"


def test_every_action_has_a_dicom_shape():
    assert set(SHAPES) == set(AuditAction)
    assert {s.event_id.code for s in SHAPES.values()} <= {"110100", "110101", "110103", "110104", "110112", "110113"}


def test_an_unreachable_collector_never_fails_the_writer(tmp_path):
    sink = SyslogSink(f"tcp://127.0.0.1:{free_port()}", source_id="X")  # nobody listens
    database = Database(f"sqlite:///{tmp_path / 'x.sqlite'}", audit_sink=sink)
    Base.metadata.create_all(database.engine)
    with database.session() as session:
        audit.record(session, actor="dr.house", action=AuditAction.READ_WORKLIST)
    sink.flush(timeout=10)
    with database.session() as session:
        assert session.scalar(select(AuditEvent.actor)) == "dr.house"
    database.dispose()
