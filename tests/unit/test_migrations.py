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
