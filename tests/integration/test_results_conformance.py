"""Our result objects in another party's PACS: a real Orthanc takes the SR, the heatmap
Secondary Capture and the Parametric Map over C-STORE (dcmtk's storescu), and its
DICOMweb plugin serves them back by QIDO-RS and WADO-RS, byte-identical in content.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
from dicom_io.pixels import display_array
from dicom_io.results import build_results
from tests.conftest import DATA, http_json, need, storescu, wait_until
from triage_core.values import AlgorithmInfo, FindingResult, ImageResult

SOURCE = DATA / "cxr_dicom" / "nih_00000001_000_cardiomegaly.dcm"
FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
ALGORITHM = AlgorithmInfo(name="cxr-densenet121", version="0.1.0-demo", weights_sha256="ab" * 32, demo=True)
DICOM_JSON = {"Accept": "application/dicom+json"}


def _objects() -> list[pydicom.Dataset]:
    source = pydicom.dcmread(SOURCE)
    findings = tuple(
        FindingResult(name, 0.8 if name == "Cardiomegaly" else 0.1, 0.5, name == "Cardiomegaly") for name in FINDINGS
    )
    yy, xx = np.mgrid[0:7, 0:7]
    cam = np.exp(-((yy - 2) ** 2 + (xx - 3) ** 2) / 2.0)
    objects = build_results(
        [source], [display_array(source)], [ImageResult(str(source.SOPInstanceUID), findings)],
        [{name: cam for name in FINDINGS}], ALGORITHM,
    )
    return list(objects)


def _wado_instance(url: str) -> pydicom.Dataset:
    """WADO-RS retrieve of one instance: multipart/related; type="application/dicom"."""
    request = urllib.request.Request(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    with urllib.request.urlopen(request, timeout=30) as response:
        content_type = response.headers["Content-Type"]
        body = response.read()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    parts = [part.get_payload(decode=True) for part in message.iter_parts()]
    assert len(parts) == 1, f"expected one part, got {len(parts)}"
    return pydicom.dcmread(io.BytesIO(parts[0]))


def test_orthanc_stores_and_serves_sr_heatmap_and_parametric_map(orthanc, tmp_path: Path) -> None:
    need(Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so").exists(), "orthanc-dicomweb is not installed")
    objects = _objects()
    sop_classes = {str(ds.SOPClassUID) for ds in objects}
    assert sop_classes == {
        pydicom.uid.Comprehensive3DSRStorage, pydicom.uid.SecondaryCaptureImageStorage,
        pydicom.uid.ParametricMapStorage,
    }
    paths = []
    for number, ds in enumerate(objects):
        path = tmp_path / f"{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)

    sent = storescu(orthanc.dicom_port, orthanc.ae_title, *paths)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    study_uid = str(objects[0].StudyInstanceUID)
    expected = {str(ds.SOPInstanceUID): ds for ds in objects}

    # QIDO-RS: every object is listed under the source's study, each in its own new series.
    def listed():
        answer = http_json(f"{orthanc.url}/dicom-web/studies/{study_uid}/instances", headers=DICOM_JSON)
        return answer if len(answer) == len(objects) else None

    instances = wait_until(listed, 30, what="QIDO-RS to list the three objects")
    found = {item["00080018"]["Value"][0]: item for item in instances}
    assert set(found) == set(expected)
    for sop_instance_uid, item in found.items():
        assert item["00080016"]["Value"][0] == str(expected[sop_instance_uid].SOPClassUID)
    series = http_json(f"{orthanc.url}/dicom-web/studies/{study_uid}/series", headers=DICOM_JSON)
    assert {s["0020000E"]["Value"][0] for s in series} == {str(ds.SeriesInstanceUID) for ds in objects}
    modalities = {s["00080060"]["Value"][0] for s in series}
    assert modalities == {"SR", "OT"}  # SC and Parametric Map are both OT

    # WADO-RS: each instance comes back with the content we sent.
    for sop_instance_uid, sent_ds in expected.items():
        series_uid = str(sent_ds.SeriesInstanceUID)
        back = _wado_instance(
            f"{orthanc.url}/dicom-web/studies/{study_uid}/series/{series_uid}/instances/{sop_instance_uid}"
        )
        assert back.SOPInstanceUID == sop_instance_uid and back.SOPClassUID == sent_ds.SOPClassUID
        assert back.PatientID == sent_ds.PatientID and back.StudyInstanceUID == study_uid
        if back.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage:
            assert back.VerificationFlag == "UNVERIFIED"
            assert len(back.ContentSequence) == len(sent_ds.ContentSequence)
        else:  # the SC's RGB pixels and the map's float pixels, unchanged
            np.testing.assert_array_equal(back.pixel_array, sent_ds.pixel_array)
            is_sc = back.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
            assert back.BurnedInAnnotation == ("YES" if is_sc else "NO")


def _stored_syntaxes(orthanc) -> dict[str, str]:
    """SOP Class UID -> transfer syntax of what Orthanc stored."""
    out = {}
    for orthanc_id in orthanc.get("/instances"):
        meta = orthanc.get(f"/instances/{orthanc_id}/header")
        tags = orthanc.get(f"/instances/{orthanc_id}/tags?simplify")
        out[tags["SOPClassUID"]] = meta["0002,0010"]["Value"]
    return out


def test_export_sends_jpeg_heatmaps_as_stored_and_uncompressed_where_refused(orthanc, tmp_path_factory) -> None:
    """The export SCU offers each object as stored (heatmaps JPEG baseline) and uncompressed; a PACS that
    takes only uncompressed data gets the heatmaps decompressed (still marked lossy), nothing is refused."""
    from dicom_node.scu import send_files
    from tests.conftest import Orthanc
    from triage_core.settings import Destination

    work = tmp_path_factory.mktemp("export")
    paths = []
    for number, ds in enumerate(_objects()):
        ds.save_as(work / f"{number}.dcm", enforce_file_format=True)
        paths.append(work / f"{number}.dcm")
    sc = pydicom.uid.SecondaryCaptureImageStorage
    assert send_files(Destination(orthanc.ae_title, "127.0.0.1", orthanc.dicom_port), paths,
                      calling_ae_title="CXR_TEST") == len(paths)
    assert _stored_syntaxes(orthanc)[sc] == pydicom.uid.JPEGBaseline8Bit
    strict = Orthanc(tmp_path_factory.mktemp("orthanc-strict"), AcceptedTransferSyntaxes=[
        pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian]).start()
    try:
        assert send_files(Destination(strict.ae_title, "127.0.0.1", strict.dicom_port), paths,
                          calling_ae_title="CXR_TEST") == len(paths)
        assert set(_stored_syntaxes(strict).values()) <= {pydicom.uid.ExplicitVRLittleEndian,
                                                           pydicom.uid.ImplicitVRLittleEndian}
        (heatmap_id,) = [i for i in strict.get("/instances")
                         if strict.get(f"/instances/{i}/tags?simplify")["SOPClassUID"] == sc]
        tags = strict.get(f"/instances/{heatmap_id}/tags?simplify")
        assert tags["PhotometricInterpretation"] == "RGB" and tags["LossyImageCompression"] == "01"
        # The same instance in another transfer syntax: its UID is kept (PACS and SR refer to it).
        sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
        stored = {strict.get(f"/instances/{i}/tags?simplify")["SOPInstanceUID"] for i in strict.get("/instances")}
        assert stored == sent
    finally:
        strict.stop()
