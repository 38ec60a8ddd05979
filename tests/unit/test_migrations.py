"""The Alembic migrations build exactly the schema of triage_core.models, on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from cxr_triage.runtime import alembic_config, upgrade_database
from triage_core.db import make_engine
from triage_core.models import Base
from triage_core.settings import Settings


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'migrated.sqlite'}"
    return request.getfixturevalue("postgres_url")


def test_upgrade_to_head_matches_the_models(database_url, tmp_path):
    upgrade_database(Settings(data_dir=tmp_path / "var", database_url=database_url))
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, Base.metadata)
            head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
            assert context.get_current_revision() == head
    finally:
        engine.dispose()
    assert differences == [], differences


def test_0007_classes_existing_studies_by_finding_urgency_and_marks_settled_history_read(database_url, tmp_path):
    """Studies of an 0006 database get the level their flagged findings' classes give (not their old
    weighted sum), SKIPPED/FAILED count as not analysed, and studies settled more than a day before the
    upgrade are marked read so that the upgraded worklist is not flooded with escalated history."""
    from datetime import datetime, timedelta, timezone

    from alembic import command
    from sqlalchemy import text

    config = alembic_config(database_url)
    command.upgrade(config, "0006_ready_on_release")
    engine = make_engine(database_url)
    now = datetime.now(timezone.utc)
    old, recent = now - timedelta(days=3), now - timedelta(hours=2)
    rows = [  # id, status, reason, received, old priority
        (1, "DONE", "positive: Hernia, Pneumothorax", old, 110.5),
        (2, "DONE", "positive: Nodule", recent, 13.2),
        (3, "SKIPPED", "modality CT is not a radiograph (CR/DX)", recent, 0),
        (4, "DONE", "no finding above its operating threshold", recent, 0),
        (5, "RECEIVING", "", recent, 0),
    ]
    with engine.begin() as connection:
        for study_id, status, reason, received, weight in rows:
            connection.execute(text(
                "INSERT INTO studies (id, study_instance_uid, accession_number, patient_id, patient_name, study_date, "
                "study_description, status, status_reason, priority, received_at, last_instance_at, updated_at, "
                "model_name, model_version, model_demo) VALUES (:id, :uid, '', '', '', '', '', :status, :reason, "
                ":priority, :at, :at, :at, '', '', false)"),
                {"id": study_id, "uid": f"1.2.3.{study_id}", "status": status, "reason": reason, "priority": weight,
                 "at": received if connection.dialect.name != "sqlite" else received.replace(tzinfo=None)})
        for study_id, finding, probability in ((1, "Pneumothorax", 0.91), (1, "Hernia", 0.97), (1, "Edema", 0.2),
                                               (2, "Nodule", 0.66), (4, "Effusion", 0.3)):
            connection.execute(text(
                "INSERT INTO findings (study_id, sop_instance_uid, finding, probability, threshold, present) "
                "VALUES (:study, '1.2.3.9', :finding, :p, 0.5, :present)"),
                {"study": study_id, "finding": finding, "p": probability, "present": probability >= 0.5})
    command.upgrade(config, "head")
    with engine.connect() as connection:
        got = {row[0]: row[1:] for row in connection.execute(text(
            "SELECT id, priority_level, read_by, read_at IS NOT NULL FROM studies ORDER BY id"))}
        urgency = dict(connection.execute(text("SELECT finding, urgency FROM findings")).all())
        waiting = connection.execute(text("SELECT count(*) FROM studies WHERE waiting_since = received_at")).scalar()
    assert got == {1: (5, "migration:0007", True), 2: (2, "", False), 3: (3, "", False), 4: (0, "", False),
                   5: (-1, "", False)}
    assert urgency == {"Pneumothorax": "critical", "Hernia": "minor", "Edema": "urgent", "Nodule": "routine",
                       "Effusion": "urgent"}
    assert waiting == 5
    from triage_core.db import Database
    from triage_core.models import Study

    database = Database(database_url)
    with database.session() as session:
        first = session.get(Study, 1)
        assert first.priority_detail["analysis"] == "flagged"
        assert [f["finding"] for f in first.priority_detail["flagged"]] == ["Pneumothorax", "Hernia"]
        assert session.get(Study, 3).priority_detail["reason"] == "modality CT is not a radiograph (CR/DX)"
    database.dispose()
    command.downgrade(config, "0006_ready_on_release")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT priority FROM studies WHERE id = 1")).scalar() == 50
    engine.dispose()
