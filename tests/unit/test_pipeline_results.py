"""The pipeline's result objects: Parametric Maps beside the heatmaps, switched by the setting.

Real file, real SQLite, the bundled model (the fixtures of test_pipeline.py).
"""

from __future__ import annotations

import pydicom
from sqlalchemy import select

from tests.unit.test_pipeline import CHEST, _ready_job, _receive, env  # noqa: F401  (env is a fixture)
from triage_core.models import ResultObject


def test_parametric_maps_are_stored_beside_the_heatmaps(env):  # noqa: F811
    settings, database, ingest, pipeline = env
    assert settings.parametric_map  # the default
    _receive(ingest, CHEST)
    assert pipeline.run_job(_ready_job(database)).status == "DONE"
    with database.session() as session:
        rows = session.scalars(select(ResultObject)).all()
        heatmaps = {r.finding: r for r in rows if r.kind == "HEATMAP"}
        maps = {r.finding: r for r in rows if r.kind == "PARAMETRIC_MAP"}
        assert heatmaps and maps.keys() == heatmaps.keys()
        source_uid = str(pydicom.dcmread(CHEST, stop_before_pixels=True).SOPInstanceUID)
        for row in maps.values():
            assert row.sop_class_uid == pydicom.uid.ParametricMapStorage
            assert row.source_sop_instance_uid == source_uid and row.model_version
            ds = pydicom.dcmread(settings.results_dir / row.path)
            assert ds.SOPInstanceUID == row.sop_instance_uid and ds.SeriesInstanceUID == row.series_instance_uid
            assert row.finding in ds.ContentDescription


def test_parametric_maps_can_be_switched_off(env):  # noqa: F811
    settings, database, ingest, pipeline = env
    pipeline.settings = settings.model_copy(update={"parametric_map": False})
    _receive(ingest, CHEST)
    assert pipeline.run_job(_ready_job(database)).status == "DONE"
    with database.session() as session:
        kinds = [r.kind for r in session.scalars(select(ResultObject)).all()]
    assert "PARAMETRIC_MAP" not in kinds and "SR" in kinds and "HEATMAP" in kinds
