"""worklist policy: per-finding urgency levels instead of a weighted sum, waiting time, read state

studies.priority (a sum of weight x probability) gives way to priority_level (the base level of
triage_core.priority, which only ever rises), priority_detail (what set it), waiting_since and
read_at/read_by; findings get the urgency class of the card that scored them. Existing rows are
classed with the ChestX-ray14 defaults of this revision (a snapshot: later changes to the defaults
do not rewrite history). Studies settled and received more than a day before the upgrade are marked
read by "migration:0007", so that an upgraded worklist is not flooded with escalated history.

Revision ID: 0007_worklist_policy
Revises: 0006_ready_on_release
Create Date: 2026-11-27 20:00:00
"""
import json
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0007_worklist_policy"
down_revision: Union[str, None] = "0006_ready_on_release"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

#: cxr_model.labels.DEFAULT_URGENCY as of this revision; unknown labels count as urgent.
URGENCY = {
    "Pneumothorax": "critical", "Pneumonia": "urgent", "Consolidation": "urgent", "Edema": "urgent",
    "Effusion": "urgent", "Mass": "routine", "Nodule": "routine", "Cardiomegaly": "routine", "Atelectasis": "routine",
    "Infiltration": "routine", "Emphysema": "minor", "Fibrosis": "minor", "Pleural_Thickening": "minor",
    "Hernia": "minor",
}
LEVELS = {"critical": 5, "urgent": 4, "routine": 2, "minor": 1}
READ_BY = "migration:0007"


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def upgrade() -> None:
    # Columns that must not be null arrive with a constant server default (SQLite cannot add them
    # otherwise); on PostgreSQL the defaults are dropped again once the rows are filled.
    op.add_column("studies", sa.Column("priority_level", sa.Integer(), nullable=False, server_default="-1"))
    op.add_column("studies", sa.Column("priority_detail", sa.JSON(), nullable=False, server_default="{}"))
    op.add_column("studies", sa.Column("waiting_since", sa.DateTime(timezone=True), nullable=False,
                                       server_default="1970-01-01 00:00:00"))
    op.add_column("studies", sa.Column("read_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("studies", sa.Column("read_by", sa.String(length=128), nullable=False, server_default=""))
    op.add_column("findings", sa.Column("urgency", sa.String(length=16), nullable=False, server_default=""))
    _fill()
    op.drop_index("ix_studies_priority", table_name="studies")
    if _sqlite():
        op.execute("ALTER TABLE studies DROP COLUMN priority")  # SQLite >= 3.35, no table rebuild
    else:
        op.drop_column("studies", "priority")
        for table, column in (("studies", "priority_level"), ("studies", "priority_detail"),
                              ("studies", "waiting_since"), ("studies", "read_by"), ("findings", "urgency")):
            op.alter_column(table, column, server_default=None)
    op.create_index("ix_studies_received_at", "studies", ["received_at"], unique=False)
    op.create_index("ix_studies_waiting", "studies", ["priority_level", "waiting_since", "id"], unique=False,
                    sqlite_where=sa.text("read_at IS NULL"), postgresql_where=sa.text("read_at IS NULL"))
    op.create_index("ix_studies_read", "studies", ["read_at", "id"], unique=False,
                    sqlite_where=sa.text("read_at IS NOT NULL"), postgresql_where=sa.text("read_at IS NOT NULL"))
    op.create_index("ix_studies_status_waiting", "studies", ["status", "priority_level", "waiting_since", "id"],
                    unique=False, sqlite_where=sa.text("read_at IS NULL"), postgresql_where=sa.text("read_at IS NULL"))
    op.create_index("ix_studies_status_read", "studies", ["status", "read_at", "id"], unique=False,
                    sqlite_where=sa.text("read_at IS NOT NULL"), postgresql_where=sa.text("read_at IS NOT NULL"))
    op.create_index("ix_findings_flagged", "findings", ["finding", "urgency", "study_id"], unique=False,
                    sqlite_where=sa.text("present"), postgresql_where=sa.text("present"))


def _fill() -> None:
    connection = op.get_bind()
    cases = " ".join(f"WHEN '{name}' THEN '{urgency}'" for name, urgency in URGENCY.items())
    connection.execute(sa.text(f"UPDATE findings SET urgency = CASE finding {cases} ELSE 'urgent' END"))
    connection.execute(sa.text("UPDATE studies SET waiting_since = received_at"))
    flagged: dict[int, dict[str, dict]] = defaultdict(dict)
    for study_id, finding, probability, threshold, urgency in connection.execute(sa.text(
            "SELECT study_id, finding, probability, threshold, urgency FROM findings WHERE present "
            "ORDER BY study_id, probability DESC")):
        if finding not in flagged[study_id]:
            flagged[study_id][finding] = {"finding": finding, "urgency": urgency, "probability": round(probability, 4),
                                          "threshold": round(threshold, 4)}
    now = datetime.now(timezone.utc)
    updates = []
    for study_id, status, reason, received_at in connection.execute(sa.text(
            "SELECT id, status, status_reason, received_at FROM studies")):
        if status == "DONE":
            found = sorted(flagged.get(study_id, {}).values(),
                           key=lambda f: (-LEVELS[f["urgency"]], -f["probability"], f["finding"]))
            level = LEVELS[found[0]["urgency"]] if found else 0
            detail = {"analysis": "flagged" if found else "nothing_flagged", "flagged": found}
        elif status in ("SKIPPED", "FAILED"):
            level, detail = 3, {"analysis": "not_analysed", "status": status, "reason": (reason or "")[:500],
                                "flagged": []}
        else:
            level, detail = -1, {}
        if detail:
            detail["at"] = now.isoformat()
            detail["migrated"] = True
        if isinstance(received_at, str):  # SQLite hands back text
            received_at = datetime.fromisoformat(received_at)
        if received_at.tzinfo is None:
            received_at = received_at.replace(tzinfo=timezone.utc)
        settled_long_ago = status in ("DONE", "SKIPPED", "FAILED") and received_at < now - timedelta(days=1)
        updates.append({"id": study_id, "level": level, "detail": json.dumps(detail),
                        "read_at": (now if not _sqlite() else now.replace(tzinfo=None)) if settled_long_ago else None,
                        "read_by": READ_BY if settled_long_ago else ""})
    if updates:
        connection.execute(sa.text("UPDATE studies SET priority_level = :level, priority_detail = :detail, "
                                   "read_at = :read_at, read_by = :read_by WHERE id = :id"), updates)


def downgrade() -> None:
    op.drop_index("ix_findings_flagged", table_name="findings")
    op.drop_index("ix_studies_status_read", table_name="studies")
    op.drop_index("ix_studies_status_waiting", table_name="studies")
    op.drop_index("ix_studies_read", table_name="studies")
    op.drop_index("ix_studies_waiting", table_name="studies")
    op.drop_index("ix_studies_received_at", table_name="studies")
    op.add_column("studies", sa.Column("priority", sa.Float(), nullable=False, server_default="0"))
    # The old order, approximately: the level stands in for the weighted sum.
    op.execute("UPDATE studies SET priority = CASE WHEN priority_level > 0 THEN priority_level * 10 ELSE 0 END")
    op.create_index("ix_studies_priority", "studies", ["priority"], unique=False)
    for table, column in (("findings", "urgency"), ("studies", "read_by"), ("studies", "read_at"),
                          ("studies", "waiting_since"), ("studies", "priority_detail"), ("studies", "priority_level")):
        if _sqlite():
            op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        else:
            op.drop_column(table, column)
