"""Query/Retrieve SCP (issue 15): dcmtk findscu/getscu/movescu and Orthanc pulling our results by C-MOVE.

One study analysed twice by the real pipeline (the bundled model): a PA, then an
AP of the same study, so that some result objects of the first analysis are
superseded. The node must find and serve the received images and the current
result objects (SR, heatmap Secondary Captures, Parametric Maps), and never a
superseded one.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import select

from dicom_node.ingest import IngestService
from dicom_node.query import value_matches
from dicom_node.scp import start_scp
from tests import dicom_fixtures as fx
from tests.conftest import free_port, need, wait_until
from tests.unit.test_pipeline import _model, _ready_job
from triage_core.db import Database
from triage_core.models import AuditEvent, Base, ResultObject
from triage_core.settings import Destination, Settings
from worker.pipeline import Pipeline


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A node serving a study analysed twice; yields (settings, database, study UID, current, superseded)."""
    tmp = tmp_path_factory.mktemp("qr")
    settings = Settings(data_dir=tmp / "var", model_runtime="torch", model_threads=1, dicom_port=free_port(),
                        dicom_host="127.0.0.1", ae_title="CXR_QR", keep_superseded_results=True)
    settings.ensure_dirs()
    database = Database(settings.database_url)
    Base.metadata.create_all(database.engine)
    ingest = IngestService(settings, database)
    pipeline = Pipeline(settings, database, lambda: _model(settings))
    pa = fx.dx_for_presentation()
    ap = copy.deepcopy(fx.dx_for_presentation(view="AP", uid_seed="qr-second", instance_number=2, series_number=2))
    ap.StudyInstanceUID = pa.StudyInstanceUID
    for ds in (pa, ap):
        path = fx.write(ds, tmp / f"{ds.SOPInstanceUID}.dcm")
        assert ingest.store(None, path.read_bytes(), calling_ae_title="MODALITY",
                            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID)).status == 0
        assert pipeline.run_job(_ready_job(database)).status == "DONE"
    with database.session() as session:
        rows = session.scalars(select(ResultObject)).all()
        current = {r.sop_instance_uid: (r.kind, r.series_instance_uid) for r in rows if r.superseded_at is None}
        superseded = {r.sop_instance_uid: (r.kind, r.series_instance_uid) for r in rows if r.superseded_at is not None}
    assert current and superseded
    server = start_scp(settings, ingest)
    yield settings, database, str(pa.StudyInstanceUID), current, superseded, [pa, ap]
    server.shutdown()
    database.dispose()


def _find(settings: Settings, **keys) -> list[Dataset]:
    ae = AE(ae_title="FINDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title)
    assert assoc.is_established
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    try:
        responses = list(assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert final.Status in (0x0000, 0xA900, 0xC000), final
    if final.Status != 0:
        return [final]
    return [ds for status, ds in responses if status.Status == 0xFF00]


def _dcmtk(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    need(shutil.which(tool) is not None, "dcmtk is not installed")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


# --- C-FIND ---------------------------------------------------------------------------------------------


def test_findscu_study_level(analysed, tmp_path):
    settings, database, study_uid, current, _, sources = analysed
    result = _dcmtk("findscu", "-S", "-X", "-od", str(tmp_path), "-aec", settings.ae_title,
                    "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "PatientName",
                    "-k", "PatientID", "-k", "StudyDate", "-k", "StudyTime", "-k", "ModalitiesInStudy",
                    "-k", "NumberOfStudyRelatedInstances", "-k", "NumberOfStudyRelatedSeries",
                    "127.0.0.1", str(settings.dicom_port), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (response,) = [pydicom.dcmread(p) for p in sorted(tmp_path.glob("rsp*.dcm"))]
    assert response.StudyInstanceUID == study_uid
    assert response.PatientName == sources[0].PatientName and response.PatientID == sources[0].PatientID
    assert response.StudyTime == sources[0].StudyTime  # from the file: the database has no study time
    assert int(response.NumberOfStudyRelatedInstances) == 2 + len(current)
    assert {"DX", "SR"} <= set(response.ModalitiesInStudy)
    assert response.RetrieveAETitle == settings.ae_title


def test_series_and_image_levels_list_current_results_never_superseded(analysed, tmp_path):
    settings, _, study_uid, current, superseded, sources = analysed
    series = _find(settings, QueryRetrieveLevel="SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="",
                   Modality="", NumberOfSeriesRelatedInstances="")
    series_uids = {str(ds.SeriesInstanceUID) for ds in series}
    assert {str(s.SeriesInstanceUID) for s in sources} <= series_uids
    assert {uid for _, uid in current.values()} <= series_uids
    images = _find(settings, QueryRetrieveLevel="IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID="",
                   SOPInstanceUID="", SOPClassUID="", InstanceNumber="")
    sop_uids = {str(ds.SOPInstanceUID) for ds in images}
    assert sop_uids == {str(s.SOPInstanceUID) for s in sources} | set(current)
    assert not sop_uids & set(superseded)
    # A superseded object asked for by its own UID is not there either.
    gone = next(iter(superseded))
    assert _find(settings, QueryRetrieveLevel="IMAGE", StudyInstanceUID=study_uid, SOPInstanceUID=gone) == []
    # findscu's view of the SR series.
    (sr_uid,) = [uid for uid, (kind, _) in current.items() if kind == "SR"]
    result = _dcmtk("findscu", "-S", "-X", "-od", str(tmp_path), "-aec", settings.ae_title,
                    "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study_uid}", "-k", "Modality=SR",
                    "-k", "SeriesInstanceUID", "127.0.0.1", str(settings.dicom_port), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (sr_series,) = [pydicom.dcmread(p) for p in tmp_path.glob("rsp*.dcm")]
    assert sr_series.SeriesInstanceUID == current[sr_uid][1] and sr_series.Modality == "SR"


def test_matching_keys(analysed):
    settings, _, study_uid, _, _, sources = analysed
    family = str(sources[0].PatientName).split("^")[0]  # Müller, in ISO_IR 100
    for pattern in (f"{family.lower()}*", "M?LLER^J*", "*^Jürgen"):
        found = _find(settings, SpecificCharacterSet="ISO_IR 192", QueryRetrieveLevel="STUDY", PatientName=pattern,
                      StudyInstanceUID="")
        assert len(found) == 1, pattern
        assert found[0].PatientName == sources[0].PatientName and found[0].SpecificCharacterSet == "ISO_IR 100"
    assert _find(settings, QueryRetrieveLevel="STUDY", PatientName="NOBODY*", StudyInstanceUID="") == []
    date = str(sources[0].StudyDate)
    assert len(_find(settings, QueryRetrieveLevel="STUDY", StudyDate=f"{date}-", StudyInstanceUID="")) == 1
    assert _find(settings, QueryRetrieveLevel="STUDY", StudyDate=f"-{int(date) - 1}", StudyInstanceUID="") == []
    assert len(_find(settings, QueryRetrieveLevel="STUDY", StudyInstanceUID=f"1.2.3\\{study_uid}")) == 1
    (bad,) = _find(settings, StudyInstanceUID=study_uid)  # no Query/Retrieve Level
    assert bad.Status == 0xA900


@pytest.mark.parametrize(("vr", "query", "stored", "matches"), [
    ("PN", "doe^j*", "DOE^JOHN", True),
    ("PN", "DOE^JOHN", "DOE^JOHN^^^", True),
    ("LO", "AB?12", "ABC12", True),
    ("LO", "abc12", "ABC12", False),
    ("DA", "20220101-20221231", "20220315", True),
    ("DA", "-20211231", "20220315", False),
    ("TM", "0900-1000", "093000", True),
    ("UI", "1.2.3", "1.2.3", True),
    ("UI", "1.2.*", "1.2.3", False),
])
def test_value_matching_rules(vr, query, stored, matches):
    assert value_matches(vr, query, stored) is matches


# --- C-GET ----------------------------------------------------------------------------------------------


def test_getscu_retrieves_results_as_stored(analysed, tmp_path):
    """getscu takes the SR and heatmap series (it proposes no Parametric Map Storage: see the next test)."""
    settings, database, study_uid, current, _, _ = analysed
    wanted = {uid: series for uid, (kind, series) in current.items() if kind in ("SR", "HEATMAP")}
    for series_uid in sorted(set(wanted.values())):
        result = _dcmtk("getscu", "-S", "-od", str(tmp_path), "-aec", settings.ae_title,
                        "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study_uid}",
                        "-k", f"SeriesInstanceUID={series_uid}", "127.0.0.1", str(settings.dicom_port), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    received = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in tmp_path.iterdir() if p.is_file()}
    assert set(received) == set(wanted)
    with database.session() as session:
        rows = {r.sop_instance_uid: r for r in session.scalars(select(ResultObject))}
    for uid in wanted:
        stored = pydicom.dcmread(settings.results_dir / rows[uid].path)
        got = pydicom.dcmread(received[uid])
        assert got.SOPClassUID == stored.SOPClassUID and got.SeriesInstanceUID == stored.SeriesInstanceUID
        if "PixelData" in stored and not stored.file_meta.TransferSyntaxUID.is_compressed:
            assert got.PixelData == stored.PixelData
        elif "PixelData" in stored:  # the JPEG heatmaps: our SCP chose the uncompressed syntax getscu also proposed
            import numpy as np

            np.testing.assert_array_equal(got.pixel_array, stored.pixel_array)
    events = wait_until(lambda: _audit(database, "DICOM_RETRIEVE"), timeout=5, what="audit")
    assert any(e["service"] == "C-GET" and e["calling_ae_title"] == "GETSCU" for e in events)


def test_c_get_of_the_whole_study_with_every_class_proposed(analysed):
    settings, database, study_uid, current, _, sources = analysed
    received: list[str] = []

    def on_store(event):
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="GETALL")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    classes = sorted({str(s.SOPClassUID) for s in sources} | _result_classes(database, current))
    roles = []
    for sop_class in classes:
        ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        roles.append(build_role(sop_class, scp_role=True))
    assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    responses = list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
    assoc.release()
    assert responses[-1][0].Status == 0x0000
    # The JPEG heatmaps went decompressed (only uncompressed syntaxes were proposed), under their own UIDs.
    assert set(received) == {str(s.SOPInstanceUID) for s in sources} | set(current)


def _result_classes(database: Database, current: dict) -> set[str]:
    with database.session() as session:
        return {r.sop_class_uid for r in session.scalars(select(ResultObject)) if r.sop_instance_uid in current}


def test_superseded_objects_are_not_retrievable(analysed):
    settings, _, study_uid, _, superseded, _ = analysed
    gone_uid, (_, gone_series) = next(iter(superseded.items()))
    ae = AE(ae_title="GETTER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = study_uid
    identifier.SeriesInstanceUID = gone_series
    identifier.SOPInstanceUID = gone_uid
    responses = list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
    assoc.release()
    final = responses[-1][0]
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 0


# --- C-MOVE ---------------------------------------------------------------------------------------------


def test_movescu_to_a_known_destination_and_a_refusal_for_an_unknown_one(analysed, tmp_path):
    settings, database, study_uid, current, _, _ = analysed
    port = free_port()
    settings.move_destinations = [Destination.parse(f"MOVESCU@127.0.0.1:{port}")]
    try:
        result = _dcmtk("movescu", "-S", "-aec", settings.ae_title, "-aem", "MOVESCU", "+P", str(port),
                        "-od", str(tmp_path), "-k", "QueryRetrieveLevel=SERIES",
                        "-k", f"StudyInstanceUID={study_uid}",
                        "-k", f"SeriesInstanceUID={next(s for k, s in current.values() if k == 'SR')}",
                        "127.0.0.1", str(settings.dicom_port), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        received = {str(pydicom.dcmread(p).SOPInstanceUID) for p in tmp_path.iterdir() if p.is_file()}
        assert received == {uid for uid, (kind, _) in current.items() if kind == "SR"}
        ae = AE(ae_title="MOVER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study_uid
        (final, _), *_ = list(assoc.send_c_move(identifier, "NOBODY", StudyRootQueryRetrieveInformationModelMove))
        assoc.release()
        assert final.Status == 0xA801
    finally:
        settings.move_destinations = []


def test_orthanc_pulls_the_study_by_c_move(analysed, orthanc):
    settings, database, study_uid, current, superseded, sources = analysed
    settings.move_destinations = [Destination.parse(f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}")]
    try:
        _orthanc_put(orthanc, "/modalities/cxr", {"AET": settings.ae_title, "Host": "127.0.0.1",
                                                  "Port": settings.dicom_port})
        query = _orthanc_post(orthanc, "/modalities/cxr/query",
                              {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        answers = orthanc.get(f"/queries/{query['ID']}/answers")
        assert len(answers) == 1
        _orthanc_post(orthanc, f"/queries/{query['ID']}/retrieve",
                      {"TargetAet": orthanc.ae_title, "Synchronous": True})
        pulled = {orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get("/instances")}
        assert pulled == {str(s.SOPInstanceUID) for s in sources} | set(current)
        assert not pulled & set(superseded)
    finally:
        settings.move_destinations = []


# --- helpers --------------------------------------------------------------------------------------------


def _audit(database: Database, action: str) -> list[dict]:
    with database.session() as session:
        return [e.detail for e in session.scalars(select(AuditEvent).where(AuditEvent.action == action))]


def _orthanc_post(orthanc, path: str, body: dict):
    request = urllib.request.Request(f"{orthanc.url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def _orthanc_put(orthanc, path: str, body: dict) -> None:
    request = urllib.request.Request(f"{orthanc.url}{path}", data=json.dumps(body).encode(), method="PUT",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30):
        pass
