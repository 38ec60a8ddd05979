"""Who is asking: API keys and OpenID Connect bearer tokens, roles, and the refusals (401, 403).

Both credentials arrive as ``Authorization: Bearer <credential>``: a credential that starts
``cxrk_`` is an API key (``cxr-triage user add``; looked up by its SHA-256), anything else
is a JWT checked against the OpenID Connect issuer (PyJWT: signature by a key of the
issuer's JWKS, the algorithm pinned by CXR_TRIAGE_OIDC_ALGORITHMS, exp/nbf/iss/aud
checked, exp/iss/aud/sub required). Refused credentials and refused roles are security
alerts in the audit trail, written in a transaction of their own (the request's own
transaction rolls back with the error).

With no authentication configured (no OIDC issuer, no API user ever created), the API
answers local clients as an administrator; ``startup_check`` allows that only while it is
bound to loopback, and a request that came through a proxy (``Forwarded`` or
``X-Forwarded-For``) is refused even then.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from dataclasses import dataclass
from typing import Annotated, Any

import jwt
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from triage_core import audit, users
from triage_core.db import Database
from triage_core.settings import Settings, is_loopback
from triage_core.states import ROLE_PERMISSIONS, AuditAction, AuditOutcome, Permission, Role

log = logging.getLogger(__name__)

LOCAL_ACTOR_PREFIX = "local:"
OIDC_ACTOR_PREFIX = "oidc:"

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An API key (`cxr-triage user add NAME --role ROLE`) or an OpenID Connect access token "
    "from the hospital's identity provider.",
)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the audit actor, its roles, how it proved itself, where it called from."""

    name: str
    roles: frozenset[Role]
    method: str  # "api-key" | "oidc" | "local"
    client_address: str = ""

    def may(self, permission: Permission) -> bool:
        return any(permission in ROLE_PERMISSIONS[role] for role in self.roles)


class AuthConfigError(RuntimeError):
    """The API must not start as configured (the message says what to change)."""


class OidcUnavailable(RuntimeError):
    """The identity provider's discovery document or keys cannot be fetched."""


class OidcVerifier:
    """Checks OpenID Connect bearer tokens against one issuer (PyJWT does the cryptography)."""

    def __init__(self, settings: Settings) -> None:
        self.issuer = settings.oidc_issuer
        self.audience = settings.oidc_audience
        self.algorithms = list(settings.oidc_algorithms)
        self.leeway = settings.oidc_leeway_seconds
        self.role_claim = settings.oidc_role_claim
        self.role_map = {value: Role(role) for value, role in settings.oidc_role_map.items()}
        self.user_claim = settings.oidc_user_claim
        self._keyset: jwt.PyJWKSet | None = None
        self._client: jwt.PyJWKClient | None = None
        self._lock = threading.Lock()
        if settings.oidc_jwks_file is not None:
            try:
                self._keyset = jwt.PyJWKSet.from_json(settings.oidc_jwks_file.read_text())
            except (OSError, jwt.PyJWKSetError, ValueError) as exc:
                raise AuthConfigError(f"CXR_TRIAGE_OIDC_JWKS_FILE {settings.oidc_jwks_file}: {exc}") from None

    def _jwks_client(self) -> jwt.PyJWKClient:
        with self._lock:
            if self._client is None:
                url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        discovery = json.load(response)
                except (OSError, ValueError) as exc:
                    raise OidcUnavailable(f"discovery document {url}: {exc}") from None
                if discovery.get("issuer") != self.issuer:
                    raise OidcUnavailable(f"discovery document names issuer {discovery.get('issuer')!r}, "
                                          f"not {self.issuer!r}")
                jwks_uri = discovery.get("jwks_uri")
                if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
                    raise OidcUnavailable("discovery document has no jwks_uri")
                self._client = jwt.PyJWKClient(jwks_uri, cache_keys=True, lifespan=300, timeout=5)
            return self._client

    def _signing_key(self, token: str, header: dict[str, Any]) -> jwt.PyJWK:
        if self._keyset is not None:
            kid = header.get("kid")
            keys = [k for k in self._keyset.keys if kid is None or k.key_id == kid]
            if len(keys) != 1:
                raise jwt.InvalidTokenError("no key of the configured JWKS matches the token's kid")
            return keys[0]
        try:
            return self._jwks_client().get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError as exc:
            raise OidcUnavailable(f"JWKS: {exc}") from None
        except jwt.PyJWKClientError as exc:
            raise jwt.InvalidTokenError(str(exc)) from None

    def verify(self, token: str) -> tuple[str, frozenset[Role]]:
        """The token's user and roles; raises ``jwt.InvalidTokenError`` (401) or ``OidcUnavailable`` (503)."""
        header = jwt.get_unverified_header(token)
        if header.get("alg") not in self.algorithms:
            raise jwt.InvalidAlgorithmError(f"algorithm {header.get('alg')!r} is not accepted")
        key = self._signing_key(token, header)
        claims = jwt.decode(
            token, key, algorithms=self.algorithms, audience=self.audience, issuer=self.issuer, leeway=self.leeway,
            options={"require": ["exp", "iss", "aud", "sub"], "verify_signature": True, "verify_exp": True,
                     "verify_nbf": True, "verify_iss": True, "verify_aud": True},
        )
        name = claims.get(self.user_claim) or claims["sub"]
        if not isinstance(name, str) or not name.strip() or not name.isprintable():
            raise jwt.InvalidTokenError(f"claim {self.user_claim!r}/sub does not name a user")
        return OIDC_ACTOR_PREFIX + name.strip()[:120], self.roles(claims)

    def roles(self, claims: dict[str, Any]) -> frozenset[Role]:
        value: Any = claims
        for part in self.role_claim.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        values = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)] if isinstance(
            value, list) else []
        if self.role_map:
            return frozenset(self.role_map[v] for v in values if v in self.role_map)
        return frozenset(Role(v) for v in values if v in {r.value for r in Role})


class Authenticator:
    """Turns a request's credentials into a ``Principal`` or a refusal."""

    def __init__(self, settings: Settings, database: Database) -> None:
        self.settings = settings
        self.database = database
        self.oidc = OidcVerifier(settings) if settings.oidc_enabled else None
        #: Once API keys are in use they stay required: revoking every key never opens the API.
        self._keys_in_use = False

    def keys_in_use(self) -> bool:
        if not self._keys_in_use:
            with self.database.session() as session:
                self._keys_in_use = users.any_user_exists(session)
        return self._keys_in_use

    def open_locally(self) -> bool:
        """No authentication configured: local clients are served as an administrator."""
        return self.oidc is None and not self.keys_in_use()

    def authenticate(self, request: Request, credentials: HTTPAuthorizationCredentials | None) -> Principal:
        client = request.client.host if request.client is not None else ""
        if credentials is None or not credentials.credentials.strip():
            if self.open_locally():
                if "forwarded" in request.headers or "x-forwarded-for" in request.headers:
                    raise _unauthorized("a proxied request needs credentials (Authorization: Bearer ...)")
                return Principal(f"{LOCAL_ACTOR_PREFIX}anonymous@{client or 'unknown'}", frozenset({Role.ADMIN}),
                                 "local", client)
            raise _unauthorized("credentials required: send Authorization: Bearer <API key or OIDC token>")
        token = credentials.credentials.strip()
        if users.looks_like_key(token):
            with self.database.session() as session:
                user = users.user_for_key(session, token)
                found = (user.name, user.role) if user is not None else None
            if found is None:
                self._refused(request, "api-key", "unknown or revoked API key", token[:11])
                raise _unauthorized("unknown or revoked API key")
            return Principal(found[0], frozenset({Role(found[1])}), "api-key", client)
        if self.oidc is None:
            self._refused(request, "bearer", "not an API key, and OpenID Connect is not configured", "")
            raise _unauthorized("not an API key, and OpenID Connect is not configured")
        try:
            name, roles = self.oidc.verify(token)
        except OidcUnavailable as exc:
            log.warning("OIDC token could not be checked: %s", exc)
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                "the identity provider's keys are unavailable; try again later") from None
        except jwt.InvalidTokenError as exc:
            reason = f"{type(exc).__name__}: {exc}"[:200]
            self._refused(request, "oidc", reason, "")
            raise _unauthorized(f"invalid token ({reason})") from None
        return Principal(name, roles, "oidc", client)

    def _refused(self, request: Request, method: str, reason: str, credential_hint: str) -> None:
        """A security alert for presented-but-refused credentials (never the credential itself)."""
        client = request.client.host if request.client is not None else ""
        log.warning("refused %s credentials from %s on %s %s: %s", method, client or "?", request.method,
                    request.url.path, reason)
        record_alert(self.database, actor=f"unauthenticated@{client or 'unknown'}", action=AuditAction.AUTH_REFUSED,
                     client_address=client, method=method, reason=reason, key_prefix=credential_hint,
                     request=f"{request.method} {request.url.path}")


def record_alert(database: Database, *, actor: str, action: AuditAction, client_address: str, **detail: Any) -> None:
    try:
        with database.session() as session:
            audit.record(session, actor=actor, action=action, outcome=AuditOutcome.MINOR_FAILURE,
                         client_address=client_address, **detail)
    except Exception:  # the refusal stands even when its audit event cannot be written
        log.exception("security alert could not be written to the audit trail")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": 'Bearer realm="cxr-triage"'})


def get_authenticator(request: Request) -> Authenticator:
    return request.app.state.authenticator


def authenticate(
    request: Request,
    authenticator: Annotated[Authenticator, Depends(get_authenticator)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    return authenticator.authenticate(request, credentials)


def require(permission: Permission):
    """A dependency that admits principals whose roles grant ``permission`` (403 and a security alert otherwise)."""

    def dependency(
        request: Request,
        principal: Annotated[Principal, Depends(authenticate)],
        authenticator: Annotated[Authenticator, Depends(get_authenticator)],
    ) -> Principal:
        if not principal.may(permission):
            roles = ",".join(sorted(principal.roles)) or "none"
            log.warning("%s (roles %s) may not %s %s", principal.name, roles, request.method, request.url.path)
            record_alert(authenticator.database, actor=principal.name, action=AuditAction.ACCESS_DENIED,
                         client_address=principal.client_address, roles=sorted(principal.roles),
                         needs=str(permission), request=f"{request.method} {request.url.path}")
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"role {roles} may not do this (it needs {permission.value})")
        return principal

    dependency.__name__ = f"require_{permission.value}"
    return dependency


read_studies = require(Permission.READ_STUDIES)
read_audit = require(Permission.READ_AUDIT)
operate = require(Permission.OPERATE)

ReaderDep = Annotated[Principal, Depends(read_studies)]
AuditorDep = Annotated[Principal, Depends(read_audit)]
AdminDep = Annotated[Principal, Depends(operate)]


def startup_check(settings: Settings, database: Database) -> Authenticator:
    """Refuse to serve beyond loopback without authentication; warn when serving locally without it."""
    authenticator = Authenticator(settings, database)
    if authenticator.open_locally():
        if not is_loopback(settings.api_host):
            raise AuthConfigError(
                f"refusing to start: the API would listen on {settings.api_host} with no authentication configured. "
                "Create a user (cxr-triage user add NAME --role admin) or set CXR_TRIAGE_OIDC_ISSUER and "
                "CXR_TRIAGE_OIDC_AUDIENCE, or bind CXR_TRIAGE_API_HOST=127.0.0.1")
        log.warning("no authentication configured: the API answers local clients on %s as an administrator "
                    "until a user is created (cxr-triage user add) or OIDC is configured", settings.api_host)
    return authenticator
