"""heartbeats: each model worker and DICOM node reports in, with its model's state (readiness)

Revision ID: 0005_operability
Revises: 0004_work_leases
Create Date: 2026-11-28 10:00:00
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005_operability"
down_revision: Union[str, None] = "0004_work_leases"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "heartbeats",
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("service", sa.String(length=16), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("model_runtime", sa.String(length=32), nullable=False),
        sa.Column("model_device", sa.String(length=32), nullable=False),
        sa.Column("model_loaded", sa.Boolean(), nullable=False),
        sa.Column("model_error", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("holder"),
    )
    with op.batch_alter_table("heartbeats", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_heartbeats_seen_at"), ["seen_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("heartbeats", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_heartbeats_seen_at"))
    op.drop_table("heartbeats")
