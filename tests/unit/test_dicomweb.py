"""DICOMweb at /dicomweb with the `dicomweb-client` package as a real client against a real server.

A real radiograph is received and analysed by the pipeline (bundled demo model), so the
store holds what a hospital's would: the CR image, the SR, the heatmap Secondary Captures
and the Parametric Maps. The API runs under uvicorn on 127.0.0.1; every answer the
client receives is checked against the OpenAPI schema (schemathesis' validator).
"""

from __future__ import annotations

import io
import threading
import time

import pydicom
import pytest
import requests
import schemathesis
import uvicorn
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from sqlalchemy import select

from dashboard_api.app import create_app
from tests.conftest import free_port
from tests import dicom_fixtures as fx
from tests.unit.test_pipeline import _ready_job, _receive, _model
from triage_core.db import Database
from triage_core.models import AuditEvent, Base, ResultObject
from triage_core.settings import Settings
from triage_core.users import create_user
from dicom_node.ingest import IngestService
from worker.pipeline import Pipeline

#: A DX For Presentation PA chest with every Type 1 and 2 attribute (patient, accession, date...).
SOURCE = fx.dx_for_presentation(uid_seed="dicomweb-test")
STUDY = str(SOURCE.StudyInstanceUID)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dicomweb")
    settings = Settings(data_dir=tmp / "var", model_runtime="torch", model_threads=1)
    settings.ensure_dirs()
    database = Database(settings.database_url)
    Base.metadata.create_all(database.engine)
    source = fx.write(SOURCE, tmp / "dx_pa.dcm")
    _receive(IngestService(settings, database), source)
    assert Pipeline(settings, database, lambda: _model(settings)).run_job(_ready_job(database)).status == "DONE"
    with database.session() as session:
        keys = {name: create_user(session, name=name, role=role, actor="cli:test").key
                for name, role in (("dr.web", "radiologist"), ("audit.web", "auditor"))}
        results = {(r.kind, r.sop_instance_uid): r.series_instance_uid
                   for r in session.scalars(select(ResultObject)).all()}
    port = free_port()
    app = create_app(settings, database)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    schema = schemathesis.openapi.from_dict(app.openapi())
    yield {"url": f"http://127.0.0.1:{port}/dicomweb", "keys": keys, "results": results, "database": database,
           "schema": schema, "source": source}
    uv.should_exit = True
    thread.join(timeout=10)
    database.dispose()


@pytest.fixture
def checked(server):
    """Every response the client gets, validated against the OpenAPI schema."""
    seen: list[requests.Response] = []

    def check(response: requests.Response, *args, **kwargs):
        path = requests.utils.urlparse(response.url).path
        operation = server["schema"].find_operation_by_path(response.request.method, path)
        assert operation is not None, f"{response.request.method} {path} is not in the OpenAPI schema"
        operation.validate_response(response)
        seen.append(response)
        return response

    return seen, check


def client(server, checked, user: str = "dr.web") -> DICOMwebClient:
    headers = {"Authorization": f"Bearer {server['keys'][user]}"} if user else {}
    return DICOMwebClient(url=server["url"], headers=headers, callback=checked[1])


def values(item: dict, tag: str) -> list:
    return item.get(tag, {}).get("Value", [])


def test_qido_studies_with_the_usual_matching(server, checked):
    web = client(server, checked)
    [study] = web.search_for_studies()
    assert values(study, "0020000D") == [STUDY]
    assert values(study, "00100020") == [str(SOURCE.PatientID)]
    assert set(values(study, "00080061")) == {str(SOURCE.Modality), "SR", "OT"}  # CR, SR, heatmaps + maps
    assert values(study, "00201208")[0] == 1 + len(server["results"])
    assert values(study, "00081190") == [f"{server['url']}/studies/{STUDY}"]
    matching = [
        {"PatientID": str(SOURCE.PatientID)}, {"PatientID": str(SOURCE.PatientID)[:2] + "*"},
        {"StudyInstanceUID": STUDY}, {"ModalitiesInStudy": "SR"},
        {"StudyDate": f"{SOURCE.StudyDate}-"}, {"StudyDate": f"-{SOURCE.StudyDate}"},
        {"StudyDate": f"{SOURCE.StudyDate}-{SOURCE.StudyDate}"},
    ]
    if SOURCE.get("AccessionNumber"):
        matching.append({"AccessionNumber": str(SOURCE.AccessionNumber)})
    for search_filters in matching:
        assert len(web.search_for_studies(search_filters=search_filters)) == 1, search_filters
    for search_filters in ({"PatientID": "NOBODY"}, {"StudyInstanceUID": "1.2.3"}, {"ModalitiesInStudy": "MR"},
                           {"StudyDate": "19000101-19001231"}):
        assert web.search_for_studies(search_filters=search_filters) == [], search_filters
    assert web.search_for_studies(offset=1) == []
    [with_field] = web.search_for_studies(fields=["PatientSex", "StudyTime"])
    assert values(with_field, "00100040") == [str(SOURCE.PatientSex)]


def test_qido_series_and_instances(server, checked):
    web = client(server, checked)
    series = web.search_for_series(STUDY)
    by_uid = {values(s, "0020000E")[0]: values(s, "00080060")[0] for s in series}
    assert by_uid[str(SOURCE.SeriesInstanceUID)] == str(SOURCE.Modality)
    assert set(by_uid) == {str(SOURCE.SeriesInstanceUID)} | set(server["results"].values())
    assert len(web.search_for_series(STUDY, search_filters={"Modality": "SR"})) == 1
    instances = web.search_for_instances(STUDY, str(SOURCE.SeriesInstanceUID))
    assert [values(i, "00080018")[0] for i in instances] == [str(SOURCE.SOPInstanceUID)]
    everything = web.search_for_instances(STUDY)
    assert len(everything) == 1 + len(server["results"])
    assert len(web.search_for_instances(STUDY, limit=2)) == 2
    assert len(web.search_for_series()) == len(series)  # across all studies


def test_wado_instances_metadata_and_rendered_heatmaps(server, checked):
    web = client(server, checked)
    received = web.retrieve_instance(STUDY, str(SOURCE.SeriesInstanceUID), str(SOURCE.SOPInstanceUID))
    assert received.SOPInstanceUID == SOURCE.SOPInstanceUID and received.PixelData == pydicom.dcmread(server["source"]).PixelData
    everything = web.retrieve_study(STUDY)
    assert sorted(ds.SOPInstanceUID for ds in everything) == sorted(
        [str(SOURCE.SOPInstanceUID)] + [uid for _, uid in server["results"]])
    [(sr_uid, sr_series)] = [(uid, series) for (kind, uid), series in server["results"].items() if kind == "SR"]
    [sr] = web.retrieve_series(STUDY, sr_series)
    assert sr.SOPInstanceUID == sr_uid and sr.Modality == "SR"
    metadata = web.retrieve_instance_metadata(STUDY, sr_series, sr_uid)
    assert values(metadata, "00080018") == [sr_uid] and "7FE00010" not in metadata
    assert len(web.retrieve_study_metadata(STUDY)) == len(everything)
    heatmaps = [(uid, series) for (kind, uid), series in server["results"].items() if kind == "HEATMAP"]
    assert heatmaps
    for uid, series in heatmaps:
        png = web.retrieve_instance_rendered(STUDY, series, uid, media_types=("image/png",))
        image = Image.open(io.BytesIO(png))
        stored = next(ds for ds in everything if ds.SOPInstanceUID == uid)
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (stored.Columns, stored.Rows)
    radiograph = Image.open(io.BytesIO(web.retrieve_instance_rendered(
        STUDY, str(SOURCE.SeriesInstanceUID), str(SOURCE.SOPInstanceUID), media_types=("image/png",))))
    assert radiograph.mode == "L" and radiograph.size == (SOURCE.Columns, SOURCE.Rows)
    with pytest.raises(requests.HTTPError, match="406"):
        web.retrieve_instance_rendered(STUDY, sr_series, sr_uid, media_types=("image/png",))
    with pytest.raises(requests.HTTPError, match="404"):
        web.retrieve_instance(STUDY, sr_series, "1.2.3.4.5")


def test_dicomweb_needs_a_radiologist_and_every_answer_is_audited(server, checked):
    for user, status in ((None, "401"), ("audit.web", "403")):
        with pytest.raises(requests.HTTPError, match=status):
            client(server, checked, user).search_for_studies()
        with pytest.raises(requests.HTTPError, match=status):
            client(server, checked, user).retrieve_instance(STUDY, str(SOURCE.SeriesInstanceUID),
                                                             str(SOURCE.SOPInstanceUID))
    web = client(server, checked)
    web.search_for_studies(search_filters={"PatientID": str(SOURCE.PatientID)})
    web.retrieve_instance_metadata(STUDY, str(SOURCE.SeriesInstanceUID), str(SOURCE.SOPInstanceUID))
    with server["database"].session() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.actor == "dr.web")
                                 .order_by(AuditEvent.seq.desc()).limit(2)).all()
    metadata, query = events
    assert query.action == "QUERY" and query.detail["filter"] == {"PatientID": str(SOURCE.PatientID)}
    assert query.detail["study_instance_uids"] == [STUDY] and query.client_address == "127.0.0.1"
    assert metadata.action == "READ_METADATA" and metadata.study_instance_uid == STUDY
    assert metadata.detail["sop_instance_uids"] == [str(SOURCE.SOPInstanceUID)]
    assert metadata.patient_id == str(SOURCE.PatientID)
