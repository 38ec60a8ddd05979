"""studies.released_at: the sending association was released after the study's last instance

Revision ID: 0006_ready_on_release
Revises: 0005_operability
Create Date: 2026-11-27 18:00:00
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0006_ready_on_release"
down_revision: Union[str, None] = "0005_operability"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("released_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # A plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35): batch mode would copy and drop `studies`,
    # which the foreign keys from instances, results and audit_events forbid once rows exist.
    op.drop_column("studies", "released_at")
