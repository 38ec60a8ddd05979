"""result objects: superseded_at (a re-analysis retires the objects it no longer makes)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 15:00:00
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("result_objects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("superseded_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("result_objects", schema=None) as batch_op:
        batch_op.drop_column("superseded_at")
