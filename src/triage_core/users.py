"""API users and their keys: made here (``cxr-triage user add``), checked by the API.

A key is ``cxrk_`` + 43 URL-safe characters (256 random bits from ``secrets``). It is
shown once; the database keeps its SHA-256 (a fast hash suffices for 256-bit random
secrets, which cannot be guessed or looked up in a dictionary) and its first characters
so that listings can tell keys apart.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import audit
from .models import ApiUser
from .states import AuditAction, Role

KEY_PREFIX = "cxrk_"
_KEY = re.compile(r"^cxrk_[A-Za-z0-9_-]{43}$")
#: User names: what the audit trail shows as the actor.
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class UserError(ValueError):
    """A user command that cannot be carried out (the message says why)."""


@dataclass(frozen=True)
class NewKey:
    user: ApiUser
    key: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def looks_like_key(token: str) -> bool:
    return bool(_KEY.match(token))


def create_user(session: Session, *, name: str, role: Role | str, actor: str) -> NewKey:
    """Add a user with a fresh key; the key is in the result and nowhere else."""
    if not USER_NAME.match(name or ""):
        raise UserError(f"user name {name!r}: 1-64 letters, digits and . _ @ -, starting with a letter or digit")
    try:
        role = Role(role)
    except ValueError:
        raise UserError(f"role {role!r}: one of {', '.join(r.value for r in Role)}") from None
    if session.scalar(select(ApiUser.id).where(ApiUser.name == name)) is not None:
        raise UserError(f"user {name!r} exists (revoked users keep their name in the audit trail)")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    user = ApiUser(name=name, role=str(role), key_prefix=key[: len(KEY_PREFIX) + 6], key_sha256=hash_key(key),
                   created_at=datetime.now(timezone.utc))
    session.add(user)
    try:
        session.flush()
    except IntegrityError:
        raise UserError(f"user {name!r} exists") from None
    audit.record(session, actor=actor, action=AuditAction.USER_CREATED, user=name, role=str(role),
                 key_prefix=user.key_prefix)
    return NewKey(user, key)


def list_users(session: Session) -> list[ApiUser]:
    return list(session.scalars(select(ApiUser).order_by(ApiUser.name)))


def revoke_user(session: Session, *, name: str, actor: str) -> ApiUser:
    user = session.scalar(select(ApiUser).where(ApiUser.name == name))
    if user is None:
        raise UserError(f"no user {name!r}")
    if user.revoked_at is None:
        user.revoked_at = datetime.now(timezone.utc)
        audit.record(session, actor=actor, action=AuditAction.USER_REVOKED, user=name, role=user.role)
    return user


def user_for_key(session: Session, key: str) -> ApiUser | None:
    """The active user whose key this is, else None."""
    if not looks_like_key(key):
        return None
    user = session.scalar(select(ApiUser).where(ApiUser.key_sha256 == hash_key(key)))
    if user is None or user.revoked_at is not None:
        return None
    return user


def any_user_exists(session: Session) -> bool:
    """Whether API keys are in use (revoked ones count: authentication never switches itself off)."""
    return session.scalar(select(ApiUser.id).limit(1)) is not None
