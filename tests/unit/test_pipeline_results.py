"""The pipeline's result objects: Parametric Maps beside the heatmaps, switched by the setting.

Real file, real SQLite, the bundled model (the fixtures of test_pipeline.py).
"""

from __future__ import annotations

import pydicom
from sqlalchemy import func, select

from tests.unit.test_pipeline import CHEST, _ready_job, _receive, env  # noqa: F401  (env is a fixture)
from triage_core.models import Finding, ResultObject


def test_parametric_maps_are_stored_beside_the_heatmaps(env):  # noqa: F811
    settings, database, ingest, pipeline = env
    assert settings.parametric_map  # the default
    _receive(ingest, CHEST)
    assert pipeline.run_job(_ready_job(database)).status == "DONE"
    with database.session() as session:
        rows = session.scalars(select(ResultObject)).all()
        heatmaps = {r.finding: r for r in rows if r.kind == "HEATMAP"}
        maps = {r.finding: r for r in rows if r.kind == "PARAMETRIC_MAP"}
        # One map of the image holding every finding's CAM; heatmap images for the most urgent two
        # positive findings, and an overview of all of them when there are more.
        assert list(maps) == ["all"]
        positives = session.scalar(select(func.count()).select_from(Finding).where(Finding.present.is_(True)))
        assert len(heatmaps) == min(2, max(1, positives)) + (positives > 2)
        header = pydicom.dcmread(settings.results_dir / maps["all"].path, stop_before_pixels=True)
        assert (header.Rows, header.NumberOfFrames) == (7, 14)
        source_uid = str(pydicom.dcmread(CHEST, stop_before_pixels=True).SOPInstanceUID)
        for row in maps.values():
            assert row.sop_class_uid == pydicom.uid.ParametricMapStorage
            assert row.source_sop_instance_uid == source_uid and row.model_version
            ds = pydicom.dcmread(settings.results_dir / row.path)
            assert ds.SOPInstanceUID == row.sop_instance_uid and ds.SeriesInstanceUID == row.series_instance_uid
            assert "CAMs of 14 findings" in ds.ContentDescription
        study_uid = str(pydicom.dcmread(CHEST, stop_before_pixels=True).StudyInstanceUID)

    # The API serves them like the heatmaps: all as multipart/related, one by UID, each read audited.
    from fastapi.testclient import TestClient

    from dashboard_api.app import create_app
    from tests.unit.test_api import parse_multipart
    from triage_core.models import AuditEvent
    from triage_core.users import create_user

    with database.session() as session:
        key = create_user(session, name="dr-test", role="radiologist", actor="cli:test").key
    with TestClient(create_app(settings, database), headers={"Authorization": f"Bearer {key}"}) as client:
        response = client.get(f"/studies/{study_uid}/parametric-maps")
        assert response.status_code == 200
        parts = parse_multipart(response.headers["content-type"], response.content)
        got = sorted(pydicom.dcmread(pydicom.filebase.DicomBytesIO(body)).SOPInstanceUID for _, body in parts)
        assert got == sorted(r.sop_instance_uid for r in maps.values())
        one = next(iter(maps.values())).sop_instance_uid
        response = client.get(f"/studies/{study_uid}/parametric-maps/{one}")
        assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
        heatmap_uid = next(iter(heatmaps.values())).sop_instance_uid
        assert client.get(f"/studies/{study_uid}/parametric-maps/{heatmap_uid}").status_code == 404
    with database.session() as session:
        reads = session.scalars(select(AuditEvent).where(AuditEvent.action == "READ_PARAMETRIC_MAPS")).all()
        assert [r.actor for r in reads] == ["dr-test", "dr-test"]


def test_parametric_maps_can_be_switched_off(env):  # noqa: F811
    settings, database, ingest, pipeline = env
    pipeline.settings = settings.model_copy(update={"parametric_map": False})
    _receive(ingest, CHEST)
    assert pipeline.run_job(_ready_job(database)).status == "DONE"
    with database.session() as session:
        kinds = [r.kind for r in session.scalars(select(ResultObject)).all()]
    assert "PARAMETRIC_MAP" not in kinds and "SR" in kinds and "HEATMAP" in kinds
