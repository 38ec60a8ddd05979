"""authentication and a tamper-evident audit trail: API users, the audit hash chain, append-only triggers

Existing audit events are chained in id order (their patient_id filled from their study),
then the head row and the triggers that refuse UPDATE/DELETE are installed.

Revision ID: 0003_auth_audit
Revises: 0002
Create Date: 2026-11-28 10:00:00
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from triage_core import audit_chain

revision: str = "0003_auth_audit"
down_revision: Union[str, None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "api_users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("key_prefix", sa.String(length=16), nullable=False),
        sa.Column("key_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_sha256"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("outcome", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("client_address", sa.String(length=64), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("patient_id", sa.String(length=64), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("hash", sa.String(length=64), nullable=True))

    connection = op.get_bind()
    _chain_existing_events(connection)

    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.alter_column("outcome", server_default=None)
        batch_op.alter_column("client_address", server_default=None)
        batch_op.alter_column("patient_id", server_default=None)
        batch_op.alter_column("seq", existing_type=sa.BigInteger(), nullable=False)
        batch_op.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_unique_constraint(batch_op.f("uq_audit_events_seq"), ["seq"])
        batch_op.create_unique_constraint(batch_op.f("uq_audit_events_hash"), ["hash"])

    head = connection.execute(sa.text("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")).first()
    audit_chain.install(connection, *(head if head else (0, audit_chain.GENESIS_HASH)))


def _chain_existing_events(connection) -> None:
    from types import SimpleNamespace

    from triage_core.models import AuditEvent

    table = AuditEvent.__table__
    rows = connection.execute(
        sa.select(table.c.id, table.c.at, table.c.actor, table.c.action, table.c.study_id,
                  table.c.study_instance_uid, table.c.detail, sa.text("studies.patient_id"))
        .select_from(table.outerjoin(sa.table("studies", sa.column("id"), sa.column("patient_id")),
                                     sa.text("studies.id = audit_events.study_id")))
        .order_by(table.c.id)
    ).all()
    prev_hash = audit_chain.GENESIS_HASH
    for seq, row in enumerate(rows, start=1):
        event = SimpleNamespace(prev_hash=prev_hash, at=row.at, actor=row.actor, action=row.action, outcome=0,
                                study_id=row.study_id, study_instance_uid=row.study_instance_uid,
                                patient_id=row.patient_id or "", client_address="",
                                detail=audit_chain.json_safe(row.detail or {}))
        digest = audit_chain.event_hash(event)
        connection.execute(
            sa.text("UPDATE audit_events SET seq = :seq, prev_hash = :prev, hash = :hash, patient_id = :pid "
                    "WHERE id = :id"),
            {"seq": seq, "prev": prev_hash, "hash": digest, "pid": event.patient_id, "id": row.id},
        )
        prev_hash = digest


def downgrade() -> None:
    connection = op.get_bind()
    audit_chain.uninstall(connection)
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_audit_events_hash"), type_="unique")
        batch_op.drop_constraint(batch_op.f("uq_audit_events_seq"), type_="unique")
        batch_op.drop_column("hash")
        batch_op.drop_column("prev_hash")
        batch_op.drop_column("seq")
        batch_op.drop_column("patient_id")
        batch_op.drop_column("client_address")
        batch_op.drop_column("outcome")
    op.drop_table("audit_chain_head")
    op.drop_table("api_users")
