"""`cxr-triage export retry`: re-drive exports by hand, audited, published on the real (embedded) broker."""

from __future__ import annotations

import getpass
import socket
import sqlite3
from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from cxr_triage import cli
from cxr_triage.runtime import upgrade_database
from triage_core.db import Database
from triage_core.models import AuditEvent, Export, Study
from triage_core.settings import Settings


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_TRIAGE_DATA_DIR", str(tmp_path / "var"))
    settings = Settings()
    upgrade_database(settings)
    database = Database(settings.database_url)
    now = datetime.now(timezone.utc)
    with database.session() as session:
        study = Study(study_instance_uid="1.2.826.0.1.3680043.10.1", status="DONE", received_at=now,
                      last_instance_at=now)
        session.add(study)
        session.flush()
        session.add(Export(study_id=study.id, destination="PACS@pacs.example:104", status="EXPORT_FAILED",
                           attempts=140, last_error="association rejected"))
    yield settings, database
    database.dispose()


def test_failed_exports_are_pending_again_published_and_audited(data_dir, capsys):
    settings, database = data_dir
    assert cli.main(["export", "retry", "--failed"]) == 0
    assert "study 1.2.826.0.1.3680043.10.1 to PACS@pacs.example:104: pending, due now" in capsys.readouterr().out
    with database.session() as session:
        export = session.scalar(select(Export))
        assert export.status == "EXPORT_PENDING" and export.enqueued_at is not None
        event = session.scalar(select(AuditEvent).where(AuditEvent.action == "EXPORT_RETRY_REQUESTED"))
        assert event.actor == f"cli:{getpass.getuser()}@{socket.gethostname()}"
        assert event.detail["previous"] == "EXPORT_FAILED"
    broker = sqlite3.connect(settings.data_dir / "broker.sqlite")
    (messages,) = broker.execute("SELECT count(*) FROM kombu_message").fetchone()
    broker.close()
    assert messages == 1
    assert cli.main(["export", "retry", "--failed"]) == 1  # nothing failed any more


def test_retry_of_one_study_and_of_an_unknown_one(data_dir, capsys):
    assert cli.main(["export", "retry", "--study", "1.2.826.0.1.3680043.10.1"]) == 0
    assert cli.main(["export", "retry", "--study", "1.2.3.4"]) == 1
    assert "no export matched for study 1.2.3.4" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["export", "retry"])  # one of --study or --failed
