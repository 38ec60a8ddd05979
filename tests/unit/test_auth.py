"""Who may see what: API keys and OpenID Connect tokens, roles, refusals and their security alerts.

The identity provider is a real HTTP server on 127.0.0.1 serving an OpenID discovery
document and a JWKS; tokens are signed with real RSA/EC keys (PyJWT + cryptography).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient
from sqlalchemy import select

from dashboard_api.app import create_app
from tests.conftest import free_port
from tests.unit.test_api import HIGH, USERS, make_users, seed
from triage_core.db import Database
from triage_core.models import AuditEvent, Base
from triage_core.settings import Settings
from triage_core.states import AuditAction, Role

AUDIENCE = "cxr-triage-api"


class IdentityProvider:
    """An OpenID provider on loopback: discovery, JWKS, and the authorization code flow with PKCE.

    ``/auth`` shows a sign-in form (a user picked by name) and redirects back with a one-time code
    bound to the client, the redirect URI and the PKCE challenge; ``/token`` trades the code for an
    access token only against the verifier whose SHA-256 is that challenge (RFC 7636, S256 only).
    Browsers reach it cross-origin, so it answers with CORS headers as real providers do.
    """

    CLIENT_ID = "cxr-triage-page"
    #: Users who can sign in, with the groups their tokens carry.
    USERS = {"dr.grey": ["CXR-Radiologists"], "ann.audit": ["CXR-Audit"]}

    def __init__(self) -> None:
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}/realms/hospital"
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.requests: list[str] = []
        self.redirect_uris: set[str] = set()
        self.codes: dict[str, dict] = {}
        self.token_requests: list[dict[str, str]] = []
        provider = self
        base = "/realms/hospital"

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                if self.headers.get("Origin"):
                    self.send_header("Access-Control-Allow-Origin", self.headers["Origin"])
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, body: dict) -> None:
                self._send(status, json.dumps(body).encode(), "application/json")

            def do_GET(self):  # noqa: N802 - http.server's name
                provider.requests.append(self.path)
                path, _, query = self.path.partition("?")
                if path == f"{base}/.well-known/openid-configuration":
                    self._json(200, provider.discovery())
                elif path == f"{base}/certs":
                    self._json(200, provider.jwks())
                elif path == f"{base}/auth":
                    status, page = provider.authorize_page(dict(urllib.parse.parse_qsl(query)))
                    self._send(status, page.encode(), "text/html; charset=utf-8")
                else:
                    self.send_error(404)

            def do_POST(self):  # noqa: N802
                provider.requests.append(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                path = self.path.partition("?")[0]
                if path == f"{base}/auth":
                    status, where = provider.sign_in(form)
                    if status == 302:
                        self._send(302, b"", "text/plain", {"Location": where})
                    else:
                        self._send(status, where.encode(), "text/plain")
                elif path == f"{base}/token":
                    self._json(*provider.exchange(form))
                else:
                    self.send_error(404)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def discovery(self) -> dict:
        return {"issuer": self.issuer, "jwks_uri": f"{self.issuer}/certs",
                "authorization_endpoint": f"{self.issuer}/auth", "token_endpoint": f"{self.issuer}/token",
                "response_types_supported": ["code"], "code_challenge_methods_supported": ["S256"],
                "grant_types_supported": ["authorization_code"]}

    def _check_client(self, params: dict[str, str]) -> str:
        if params.get("client_id") != self.CLIENT_ID:
            return "unknown client_id"
        if params.get("redirect_uri") not in self.redirect_uris:
            return f"redirect_uri {params.get('redirect_uri')!r} is not registered"
        return ""

    def authorize_page(self, params: dict[str, str]) -> tuple[int, str]:
        problem = self._check_client(params)
        if not problem and params.get("response_type") != "code":
            problem = "response_type must be code"
        if not problem and (params.get("code_challenge_method") != "S256" or len(params.get("code_challenge", "")) < 43):
            problem = "PKCE with S256 is required"
        if problem:
            return 400, f"<p>{html.escape(problem)}</p>"
        hidden = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                         for k, v in params.items())
        options = "".join(f'<option value="{u}">{u}</option>' for u in self.USERS)
        return 200, (f'<!DOCTYPE html><html lang="en"><title>Hospital sign-in</title><form method="post">{hidden}'
                     f'<label for="username">User</label><select id="username" name="username">{options}</select>'
                     '<button type="submit" id="idp-sign-in">Sign in</button>'
                     '<button type="submit" name="deny" value="1" id="idp-deny">Cancel</button></form></html>')

    def sign_in(self, form: dict[str, str]) -> tuple[int, str]:
        problem = self._check_client(form)
        if problem:
            return 400, problem
        back = form["redirect_uri"]
        if form.get("deny"):
            return 302, back + "?" + urllib.parse.urlencode(
                {"error": "access_denied", "error_description": "the user cancelled", "state": form.get("state", "")})
        code = secrets.token_urlsafe(24)
        self.codes[code] = {"client_id": form["client_id"], "redirect_uri": back, "user": form["username"],
                            "challenge": form["code_challenge"], "nonce": form.get("nonce", "")}
        return 302, back + "?" + urllib.parse.urlencode({"code": code, "state": form.get("state", "")})

    def exchange(self, form: dict[str, str]) -> tuple[int, dict]:
        self.token_requests.append(form)
        if form.get("grant_type") != "authorization_code":
            return 400, {"error": "unsupported_grant_type"}
        grant = self.codes.pop(form.get("code", ""), None)  # one use only
        if grant is None:
            return 400, {"error": "invalid_grant", "error_description": "unknown or used code"}
        if form.get("client_id") != grant["client_id"] or form.get("redirect_uri") != grant["redirect_uri"]:
            return 400, {"error": "invalid_grant", "error_description": "client or redirect_uri differs"}
        digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != grant["challenge"]:
            return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        user = grant["user"]
        access = self.token(preferred_username=user, realm_access={"roles": self.USERS[user]})
        return 200, {"access_token": access, "token_type": "Bearer", "expires_in": 300,
                     "id_token": self.token(aud=self.CLIENT_ID, preferred_username=user, nonce=grant["nonce"])}

    def jwks(self) -> dict:
        keys = []
        for kid, key, alg in (("rsa-1", self.rsa, "RS256"), ("ec-1", self.ec, "ES256")):
            jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
        return {"keys": keys}

    def token(self, *, alg: str = "RS256", kid: str | None = None, key=None, **overrides) -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": AUDIENCE, "sub": "f3a1-77", "preferred_username": "dr.grey",
                  "iat": now, "nbf": now - 5, "exp": now + 300, "realm_access": {"roles": ["CXR-Radiologists"]}}
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        signing = key if key is not None else (self.ec if alg.startswith("ES") else self.rsa)
        headers = {"kid": kid or ("ec-1" if alg.startswith("ES") else "rsa-1")}
        return jwt.encode(claims, signing, algorithm=alg, headers=headers)

    def __enter__(self) -> "IdentityProvider":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def idp():
    with IdentityProvider() as provider:
        yield provider


def oidc_settings(tmp_path, idp: IdentityProvider, **extra) -> Settings:
    return Settings(data_dir=tmp_path / "var", database_url=f"sqlite:///{tmp_path / 'auth.sqlite'}",
                    oidc_issuer=idp.issuer, oidc_audience=AUDIENCE, oidc_algorithms="RS256,ES256",
                    oidc_role_claim="realm_access.roles",
                    oidc_role_map="CXR-Radiologists=radiologist,CXR-Audit=auditor,CXR-Admins=admin", **extra)


@pytest.fixture
def oidc_client(tmp_path, idp):
    settings = oidc_settings(tmp_path, idp)
    settings.ensure_dirs()
    database = Database(settings.database_url)
    Base.metadata.create_all(database.engine)
    seed(database, settings.results_dir)
    with TestClient(create_app(settings, database)) as client:
        yield client, database
    database.dispose()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def alerts(database: Database) -> list[AuditEvent]:
    with database.session() as session:
        return list(session.scalars(select(AuditEvent).where(
            AuditEvent.action.in_([AuditAction.AUTH_REFUSED, AuditAction.ACCESS_DENIED])).order_by(AuditEvent.seq)))


# --- OpenID Connect -----------------------------------------------------------------------------


def test_oidc_token_from_the_issuers_jwks_reads_the_worklist_as_its_user(oidc_client, idp):
    client, database = oidc_client
    response = client.get(f"/studies/{HIGH}", headers=bearer(idp.token()))
    assert response.status_code == 200, response.text
    assert client.get("/worklist", headers=bearer(idp.token(alg="ES256"))).status_code == 200
    with database.session() as session:
        actors = session.scalars(select(AuditEvent.actor).where(AuditEvent.action == "READ_STUDY")).all()
    assert actors == ["oidc:dr.grey"]
    assert "/realms/hospital/.well-known/openid-configuration" in idp.requests  # discovery, then the keys
    assert idp.requests.count("/realms/hospital/certs") == 1  # cached


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        # exp and nbf as seconds from now, made when the test runs (not at collection: a long run outlives 600 s)
        ({"exp": -120}, "ExpiredSignatureError"),
        ({"nbf": 600}, "ImmatureSignatureError"),
        ({"aud": "another-app"}, "InvalidAudienceError"),
        ({"iss": "http://127.0.0.1:1/realms/other"}, "InvalidIssuerError"),
        ({"exp": None}, "MissingRequiredClaimError"),
        ({"sub": None}, "MissingRequiredClaimError"),
    ],
)
def test_oidc_claims_are_checked(oidc_client, idp, overrides, fragment):
    client, database = oidc_client
    now = int(time.time())
    overrides = {k: now + v if k in ("exp", "nbf") and isinstance(v, int) else v for k, v in overrides.items()}
    response = client.get("/worklist", headers=bearer(idp.token(**overrides)))
    assert response.status_code == 401 and fragment in response.json()["detail"], response.json()
    assert response.headers["www-authenticate"].startswith("Bearer")
    [alert] = alerts(database)
    assert alert.action == "AUTH_REFUSED" and alert.outcome == 4 and fragment in alert.detail["reason"]
    assert alert.actor == "unauthenticated@testclient"


def test_oidc_signature_key_and_algorithm_are_pinned(oidc_client, idp):
    client, _ = oidc_client
    forged = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert client.get("/worklist", headers=bearer(idp.token(key=forged))).status_code == 401
    unsigned = jwt.encode({"iss": idp.issuer, "aud": AUDIENCE, "sub": "x", "exp": time.time() + 60}, None,
                          algorithm="none")
    assert client.get("/worklist", headers=bearer(unsigned)).status_code == 401
    # HS256 keyed with the public key's bytes (the classic confusion attack), made by hand since PyJWT refuses
    # to sign it: refused by the algorithm pin before any key is used.
    import hmac

    from cryptography.hazmat.primitives import serialization

    public_pem = idp.rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = (b64(json.dumps({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}).encode()) + "." + b64(json.dumps(
        {"iss": idp.issuer, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60}).encode()))
    confused = signing_input + "." + b64(hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest())
    response = client.get("/worklist", headers=bearer(confused))
    assert response.status_code == 401 and "not accepted" in response.json()["detail"]
    assert client.get("/worklist", headers=bearer(idp.token(kid="unknown-kid"))).status_code == 401
    assert client.get("/worklist", headers=bearer("not.a.jwt")).status_code == 401


def test_oidc_roles_come_from_the_mapped_claim(oidc_client, idp):
    client, database = oidc_client
    auditor = idp.token(realm_access={"roles": ["CXR-Audit"]}, preferred_username="ann.audit")
    assert client.get("/audit", headers=bearer(auditor)).status_code == 200
    assert client.get("/worklist", headers=bearer(auditor)).status_code == 403
    nobody = idp.token(realm_access={"roles": ["Nurses"]})
    response = client.get("/worklist", headers=bearer(nobody))
    assert response.status_code == 403 and "role none may not" in response.json()["detail"]
    admin = idp.token(realm_access={"roles": ["CXR-Admins", "Nurses"]})
    assert client.get("/users", headers=bearer(admin)).status_code == 200
    denied = [a for a in alerts(database) if a.action == "ACCESS_DENIED"]
    assert [(a.actor, a.detail["needs"]) for a in denied] == [("oidc:ann.audit", "read_studies"),
                                                              ("oidc:dr.grey", "read_studies")]


def test_jwks_from_a_file_needs_no_issuer_connection(tmp_path, idp):
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(idp.jwks()))
    settings = oidc_settings(tmp_path, idp, oidc_jwks_file=jwks_file)
    database = Database(settings.database_url)
    Base.metadata.create_all(database.engine)
    idp.server.shutdown()  # the issuer is unreachable now
    with TestClient(create_app(settings, database)) as client:
        assert client.get("/worklist", headers=bearer(idp.token())).status_code == 200
        assert client.get("/worklist", headers=bearer(idp.token(kid="nope"))).status_code == 401
    database.dispose()


def test_unreachable_issuer_is_503_not_a_pass(tmp_path, idp):
    settings = oidc_settings(tmp_path, idp)
    database = Database(settings.database_url)
    Base.metadata.create_all(database.engine)
    token = idp.token()
    idp.server.shutdown()
    idp.server.server_close()
    with TestClient(create_app(settings, database)) as client:
        response = client.get("/worklist", headers=bearer(token))
    assert response.status_code == 503 and "identity provider" in response.json()["detail"]
    database.dispose()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"oidc_issuer": "https://idp.hospital.example/realms/x"}, "CXR_TRIAGE_OIDC_AUDIENCE must be set"),
        ({"oidc_issuer": "http://idp.hospital.example/x", "oidc_audience": "a"}, "https://"),
        ({"oidc_algorithms": "HS256"}, "symmetric and 'none' algorithms are refused"),
        ({"oidc_algorithms": "none"}, "not allowed"),
        ({"oidc_role_map": "Group=superuser"}, "names role 'superuser'"),
        ({"database_url": "postgresql+psycopg2://cxr:cxr@db:5432/cxr"}, "default password"),
        ({"database_url": "postgresql+psycopg2://cxr:change-me@db:5432/cxr"}, "default password"),
        ({"database_url": "postgresql+psycopg2://cxr:@db:5432/cxr"}, "empty or default password"),
        ({"broker_url": "redis://:redis@cache:6379/0"}, "default password"),
    ],
)
def test_unsafe_authentication_settings_stop_start_up(env, message):
    with pytest.raises(ValueError, match=message):
        Settings(**env)


# --- API keys and roles -------------------------------------------------------------------------


@pytest.fixture
def keyed(tmp_path):
    settings = Settings(data_dir=tmp_path / "var", database_url=f"sqlite:///{tmp_path / 'keys.sqlite'}")
    settings.ensure_dirs()
    database = Database(settings.database_url)
    Base.metadata.create_all(database.engine)
    seed(database, settings.results_dir)
    keys = make_users(database, USERS)
    with TestClient(create_app(settings, database)) as client:
        yield client, database, keys
    database.dispose()


def test_every_route_but_health_needs_credentials(keyed):
    """Health and metrics answer without credentials (and carry no patient data); every other route needs them."""
    client, database, keys = keyed
    schema = client.get("/openapi.json").json()
    routes = [(path, method) for path, item in schema["paths"].items() for method in item]
    assert len(routes) > 20
    public = {("/health", "get"), ("/health/live", "get"), ("/health/ready", "get"), ("/metrics", "get")}
    assert public <= set(routes)
    for path, method in routes:
        concrete = path
        for name in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"):
            concrete = concrete.replace("{" + name + "}", HIGH)
        concrete = concrete.replace("{name}", "alice")
        response = client.request(method.upper(), concrete)
        if (path, method) in public:
            # /health/ready is 503 here (no worker, no node): an answer, not a refusal.
            assert response.status_code == (503 if path == "/health/ready" else 200), (path, response.status_code)
            assert "Doe^" not in response.text and "ACC1" not in response.text  # no patient data
            continue
        assert response.status_code == 401, (method, path, response.status_code)
        assert response.json()["detail"].startswith("credentials required")
        bad = client.request(method.upper(), concrete, headers=bearer("cxrk_" + "A" * 43))
        assert bad.status_code == 401 and bad.json()["detail"] == "unknown or revoked API key"
        operation = schema["paths"][path][method]
        assert {"401", "403"} <= set(operation["responses"]), path
        assert operation.get("security") == [{"bearer": []}], path
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    with database.session() as session:
        # missing credentials are not events (a browser's first request), presented and refused ones are
        refused = session.scalars(select(AuditEvent).where(AuditEvent.action == "AUTH_REFUSED")).all()
        reads = session.scalars(select(AuditEvent).where(AuditEvent.action.like("READ%"))).all()
    assert len(refused) == len(routes) - len(public) and reads == []
    assert all(r.detail["key_prefix"] == "cxrk_AAAAAA" and "A" * 20 not in json.dumps(r.detail) for r in refused)


@pytest.mark.parametrize(
    ("user", "path", "expected"),
    [
        ("dr.house", "/worklist", 200), ("dr.house", f"/studies/{HIGH}", 200), ("dr.house", "/dicomweb/studies", 200),
        ("dr.house", "/audit", 403), ("dr.house", "/audit/verify", 403), ("dr.house", "/users", 403),
        ("auditor", "/worklist", 403), ("auditor", f"/studies/{HIGH}/sr", 403), ("auditor", "/dicomweb/studies", 403),
        ("auditor", "/audit", 200), ("auditor", "/audit/verify", 200), ("auditor", "/users", 403),
        ("root", "/worklist", 200), ("root", "/audit", 200), ("root", "/users", 200), ("root", "/dicomweb/series", 200),
    ],
)
def test_roles(keyed, user, path, expected):
    client, database, keys = keyed
    response = client.get(path, headers=bearer(keys[user]))
    assert response.status_code == expected, response.text
    if expected == 403:
        [alert] = [a for a in alerts(database) if a.action == "ACCESS_DENIED"]
        assert alert.actor == user and alert.detail["request"] == f"GET {path}"


def test_audit_verify_over_http_is_audited(keyed):
    client, database, keys = keyed
    body = client.get("/audit/verify", headers=bearer(keys["auditor"])).json()
    assert body["intact"] is True and body["problem"] is None and body["events"] == body["head_seq"] == len(USERS)
    with database.session() as session:
        [event] = session.scalars(select(AuditEvent).where(AuditEvent.action == "VERIFY_AUDIT")).all()
    assert event.actor == "auditor" and event.detail["intact"] is True


def test_admin_manages_users_over_http_and_a_revoked_key_stops_at_once(keyed):
    client, database, keys = keyed
    admin = bearer(keys["root"])
    created = client.post("/users", json={"name": "night.shift", "role": "radiologist"}, headers=admin)
    assert created.status_code == 201, created.text
    key = created.json()["api_key"]
    assert key.startswith("cxrk_") and created.json()["key_prefix"] == key[:11]
    assert client.post("/users", json={"name": "night.shift", "role": "auditor"}, headers=admin).status_code == 409
    assert client.get("/worklist", headers=bearer(key)).status_code == 200
    listed = {u["name"]: u for u in client.get("/users", headers=admin).json()["data"]}
    assert listed["night.shift"]["role"] == "radiologist" and "api_key" not in listed["night.shift"]
    assert client.post("/users/night.shift/revoke", headers=admin).json()["revoked_at"]
    assert client.get("/worklist", headers=bearer(key)).status_code == 401
    assert client.post("/users/nobody/revoke", headers=admin).status_code == 404
    with database.session() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action.in_(["USER_CREATED", "USER_REVOKED"]))
                                 .where(AuditEvent.actor == "root")).all()
        stored = session.execute(select(__import__("triage_core.models", fromlist=["x"]).ApiUser.key_sha256)).scalars().all()
    assert [(e.action, e.detail["user"]) for e in events] == [("USER_CREATED", "night.shift"),
                                                              ("USER_REVOKED", "night.shift")]
    assert key not in json.dumps([e.detail for e in events]) and key not in stored


# --- no authentication configured ---------------------------------------------------------------


def test_without_authentication_configured_local_clients_are_served_but_proxied_ones_are_not(tmp_path):
    settings = Settings(data_dir=tmp_path / "var", database_url=f"sqlite:///{tmp_path / 'open.sqlite'}")
    database = Database(settings.database_url)
    Base.metadata.create_all(database.engine)
    with TestClient(create_app(settings, database)) as client:
        assert client.get("/worklist").status_code == 200
        proxied = client.get("/worklist", headers={"X-Forwarded-For": "10.1.2.3"})
        assert proxied.status_code == 401 and "proxied" in proxied.json()["detail"]
        # The first user switches authentication on, for good (revoking every key does not switch it off).
        created = client.post("/users", json={"name": "first.admin", "role": "admin"}).json()
        assert client.get("/worklist").status_code == 401
        assert client.post("/users/first.admin/revoke", headers=bearer(created["api_key"])).status_code == 200
        assert client.get("/worklist").status_code == 401
    with database.session() as session:
        actors = session.scalars(select(AuditEvent.actor).where(AuditEvent.action == "READ_WORKLIST")).all()
    assert actors == ["local:anonymous@testclient"]
    database.dispose()


def _api(tmp_path, **env) -> subprocess.CompletedProcess:
    environ = {"PATH": "/usr/bin:/bin", "CXR_TRIAGE_DATA_DIR": str(tmp_path / "var"),
               "CXR_TRIAGE_API_PORT": str(free_port()), **env}
    return subprocess.run([sys.executable, "-m", "cxr_triage.cli", "api"], env=environ, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def test_api_refuses_to_start_beyond_loopback_without_authentication(tmp_path):
    subprocess.run([sys.executable, "-m", "cxr_triage.cli", "db", "upgrade"], check=True, cwd=tmp_path,
                   env={"PATH": "/usr/bin:/bin", "CXR_TRIAGE_DATA_DIR": str(tmp_path / "var")}, capture_output=True)
    result = _api(tmp_path, CXR_TRIAGE_API_HOST="0.0.0.0")
    assert result.returncode != 0
    assert "refusing to start: the API would listen on 0.0.0.0 with no authentication configured" in result.stderr


def test_user_cli_prints_the_key_once_and_stores_only_its_hash(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CXR_TRIAGE_DATA_DIR": str(tmp_path / "var")}

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "cxr_triage.cli", *argv], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    assert run("db", "upgrade").returncode == 0
    added = run("user", "add", "dr.who", "--role", "radiologist")
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("cxrk_") and len(key) == 48 and "shown once" in added.stderr
    assert run("user", "add", "dr.who", "--role", "admin").returncode == 2
    bad = run("user", "add", "Robert'); DROP TABLE--", "--role", "admin")
    assert bad.returncode == 2 and "user name" in bad.stderr
    listing = run("user", "list").stdout
    assert "dr.who" in listing and "radiologist" in listing and key[:11] in listing and key not in listing
    database = (tmp_path / "var" / "triage.sqlite").read_bytes()
    assert key.encode() not in database
    revoked = run("user", "revoke", "dr.who")
    assert revoked.returncode == 0 and "revoked dr.who" in revoked.stdout
    assert run("user", "revoke", "nobody").returncode == 2
    settings = Settings(data_dir=tmp_path / "var")
    database = Database(settings.database_url)
    with TestClient(create_app(settings, database)) as client:
        assert client.get("/worklist", headers=bearer(key)).status_code == 401
    with database.session() as session:
        actors = session.scalars(select(AuditEvent.actor).where(AuditEvent.action.in_(["USER_CREATED", "USER_REVOKED"]))).all()
    assert len(actors) == 2 and all(a.startswith("cli:") for a in actors)
    database.dispose()


def test_roles_are_the_three_of_the_readme():
    assert [r.value for r in Role] == ["radiologist", "auditor", "admin"]
