"""schemathesis over the whole OpenAPI schema: no server errors, and every valid-by-schema request accepted.

Requests are generated from the schema the API publishes and sent, with an
administrator's key, to the app over ASGI against a seeded SQLite database with real
result files. The checks: no 5xx; the status code, content type, headers and body are
the ones the schema declares; and a request the schema calls valid is not refused (the
schema declares every rule the server enforces: UID patterns, lengths, ranges, enums).
"""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from dashboard_api.app import create_app
from tests.unit.test_api import make_users, seed
from triage_core.db import Database
from triage_core.models import Base
from triage_core.settings import Settings
from triage_core.states import Role

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, positive_data_acceptance]
ADMIN = "fuzz-admin-7f3c9d"
#: Generated requests per operation (about 30 operations).
EXAMPLES = 25


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    # A heartbeat long enough for the whole run: a worker and a node reported in, so /health/ready is 200.
    settings = Settings(data_dir=tmp / "var", database_url=f"sqlite:///{tmp / 'fuzz.sqlite'}",
                        heartbeat_seconds=3600, min_free_disk_mb=0)
    settings.ensure_dirs()
    database = Database(settings.database_url)
    Base.metadata.create_all(database.engine)
    seed(database, settings.results_dir)
    from triage_core import work

    with database.session() as session:
        work.beat(session, holder="fuzz-host:1:1", service="worker", version="0",
                  model={"name": "m", "version": "1", "runtime": "onnx", "device": "cpu"})
        work.beat(session, holder="fuzz-host:2:1", service="node", version="0")
    keys = make_users(database, {ADMIN: Role.ADMIN})
    app = create_app(settings, database)
    yield app, {"Authorization": f"Bearer {keys[ADMIN]}"}
    database.dispose()


def _operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


def test_every_operation_answers_as_its_schema_says(api):
    """Each operation gets its own generated requests; every failure of every operation is reported."""
    app, headers = api
    failures: dict[str, str] = {}
    operations = _operations(app)
    assert len(operations) >= 25
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def run(case):
            case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - collected, then reported together
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:1500]
    assert not failures, "\n\n".join(f"{label}\n{text}" for label, text in failures.items())


def test_schema_covers_the_api(api):
    app, headers = api
    with TestClient(app) as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert {"/worklist", "/studies/{study_instance_uid}", "/audit", "/audit/verify", "/users", "/dicomweb/studies",
            "/dicomweb/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}/rendered",
            } <= set(paths)
