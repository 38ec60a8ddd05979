"""dicom_io: SR, heatmap SC and Parametric Map on every real chest
radiograph of tests/data, checked by dcmtk (dsrdump), dicom3tools (dciodvfy)
and highdicom's readers.

dciodvfy warnings seen and accepted (none is an error; any warning that is not
one of `_ACCEPTED_WARNINGS` fails the test):
* "Missing attribute or value that would be needed to build DICOMDIR -
  Patient ID / Study Date / Study Time / Study ID": the sources lack them; we
  copy the source's patient and study identity and invent nothing.
* "Value dubious for this VR - Patient's Name / Referring Physician's Name ...
  Retired Person Name form": single-component names copied verbatim from the
  sources ("Anonymized", "Covid0000", the SIIM UUID, RG1's "<ward>").
* "Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device
  UID", and with it "Dicom dataset contains attributes not present in
  standard DICOM IOD - this is a Standard Extended SOP Class": the Device UID
  of the algorithm in the Contributing Equipment Sequence (IHE AIR). It is
  Type 3 there in the current PS3.3 Table C.12-1 (highdicom's tables,
  generated from the current edition, list ContributingEquipmentSequence >
  DeviceUID); the installed dciodvfy's tables predate it.
* "Unrecognized defined term <99CXRTRIAGE> for value 1 of attribute <Coding
  Scheme Designator>": our private coding scheme for Pleural thickening
  (dicom_io.codes), declared in the Coding Scheme Identification Sequence;
  PS3.16 section 8 reserves designators starting "99" for private schemes,
  so by definition no table lists it.
* "method inconsistent with Transfer Syntax - attribute
  <LossyImageCompressionMethod> = <ISO_15444_1>": a heatmap of a JPEG 2000
  lossy radiograph, itself JPEG compressed, lists both compressions in the
  order applied (PS3.3 C.7.6.1.1.5.2: ISO_15444_1 then ISO_10918_1), as the
  standard asks; dciodvfy compares every listed method with the object's own
  transfer syntax.
No Laterality warning: the SC and the map say BodyPartExamined CHEST (only
chest radiographs are analysed), so Laterality (Type 2C) does not apply.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from cxr_model.labels import DEFAULT_URGENCY
from dicom_io import codes as _sr_codes
from dicom_io.pixels import display_array
from dicom_io.pm import PARAMETRIC_MAP_SERIES_NUMBER, build_parametric_maps
from dicom_io.results import ResultObjects, build_results
from dicom_io.sc import HEATMAP_SERIES_NUMBER, HeatmapOptions, build_heatmaps, heatmaps_by_finding
from dicom_io.sr import build_sr
from dicom_io.uids import device_uid, image_key, result_uid
from triage_core.priority import heatmap_rank
from triage_core.values import AlgorithmInfo, FindingResult, ImageResult

DATA = Path(__file__).resolve().parents[1] / "data" / "cxr_dicom"
CR = DATA / "cr_chest_pa_mono1_10bit_explicit_le.dcm"
NIH = DATA / "nih_00000001_000_cardiomegaly.dcm"
SIIM = DATA / "siim_chest_pa_jpeg_baseline_no_pneumothorax.dcm"
RG1 = DATA / "cr_chest_pa_mono1_15bit_j2k_lossy.dcm"
#: Every real chest radiograph in tests/data (CR, DX in SC, MONOCHROME1/2, JPEG, JPEG 2000, no Part 10 header).
ALL_CHESTS = sorted(DATA.glob("*.dcm"))

# The ChestX-ray14 label order (DESIGN.md section 5), written out here because
# dicom_node must not import cxr_model.
FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
DEMO = AlgorithmInfo(
    name="cxr-densenet121", version="0.1.0-demo", weights_sha256="ab" * 32, demo=True,
    parameters={"input_size": "224"},
)
REAL = AlgorithmInfo(name="cxr-densenet121", version="1.2.0", weights_sha256="cd" * 32, demo=False)

needs_dcmtk = pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk dsrdump not installed")
needs_dicom3tools = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools dciodvfy not installed")


@pytest.fixture(autouse=True)
def _strict_writing():
    """Everything we write must be valid for its VR (sources may not be)."""
    settings = pydicom.config.settings
    before = settings.writing_validation_mode
    settings.writing_validation_mode = pydicom.config.RAISE
    yield
    settings.writing_validation_mode = before


def _result(ds: pydicom.Dataset, positives: tuple[str, ...] = ("Cardiomegaly", "Effusion")) -> ImageResult:
    findings = []
    for index, name in enumerate(FINDINGS):
        probability = 0.8 - 0.01 * index if name in positives else 0.05 + 0.02 * index
        findings.append(FindingResult(name, probability, 0.5, probability >= 0.5))
    return ImageResult(str(ds.SOPInstanceUID), tuple(findings))


def _cams(hot: tuple[int, int] = (2, 1), size: int = 8) -> dict[str, np.ndarray]:
    """A CAM with one hot spot (row, column) on a coarse grid, like DenseNet's 7x7."""
    yy, xx = np.mgrid[0:size, 0:size]
    cam = np.exp(-((yy - hot[0]) ** 2 + (xx - hot[1]) ** 2) / 2.0)
    return {name: cam for name in FINDINGS}


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


_ACCEPTED_WARNINGS = (
    "Warning - Missing attribute or value that would be needed to build DICOMDIR - ",
    "Warning - Value dubious for this VR - (0x0010,0x0010) PN Patient's Name ",
    "Warning - Value dubious for this VR - (0x0008,0x0090) PN Referring Physician's Name ",
    "Warning - Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device UID",
    "Warning - Unrecognized defined term <99CXRTRIAGE> for value 1 of attribute <Coding Scheme Designator>",
    "Warning - method inconsistent with Transfer Syntax - attribute <LossyImageCompressionMethod> = <ISO_15444_1>",
    "Warning - Dicom dataset contains attributes not present in standard DICOM IOD - "
    "this is a Standard Extended SOP Class",
)


def _dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings not in _ACCEPTED_WARNINGS) that dciodvfy reports for `path`."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    unexpected = [
        line for line in lines if line.startswith("Warning") and not line.startswith(_ACCEPTED_WARNINGS)
    ]
    return errors, unexpected


def _dciodvfy_errors(path: Path) -> list[str]:
    return _dciodvfy(path)[0]


@pytest.fixture(scope="module")
def nih() -> pydicom.Dataset:
    return pydicom.dcmread(NIH)


@pytest.fixture(scope="module")
def cr() -> pydicom.Dataset:
    return pydicom.dcmread(CR)


# --- SR ------------------------------------------------------------------------


@needs_dicom3tools
@pytest.mark.parametrize("path", ALL_CHESTS, ids=lambda p: p.name)
def test_sr_heatmaps_and_parametric_maps_pass_dciodvfy(path: Path, tmp_path: Path) -> None:
    source = pydicom.dcmread(path, force=True)
    objects = build_results([source], [display_array(source)], [_result(source)], [_cams()], DEMO)
    assert len(objects.heatmaps) == 2 and len(objects.parametric_maps) == 1
    kinds = set()
    for number, ds in enumerate(objects):
        written = _write(ds, tmp_path / f"{number}.dcm")
        errors, unexpected = _dciodvfy(written)
        assert errors == [], f"{ds.SOPClassUID.name}: dciodvfy errors"
        assert unexpected == [], f"{ds.SOPClassUID.name}: dciodvfy warnings not justified in this module"
        kinds.add(str(ds.SOPClassUID))
    assert kinds == {
        pydicom.uid.Comprehensive3DSRStorage, pydicom.uid.SecondaryCaptureImageStorage,
        pydicom.uid.ParametricMapStorage,
    }


@needs_dcmtk
def test_dsrdump_shows_every_finding_and_the_algorithm(nih: pydicom.Dataset, tmp_path: Path) -> None:
    path = _write(build_sr([nih], [_result(nih)], DEMO), tmp_path / "sr.dcm")
    run = subprocess.run(["dsrdump", "+Pl", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    dump = run.stdout
    for concept in _sr_codes.FINDING_CODES.values():
        assert f'"{concept.meaning}"' in dump
    assert '"0.1.0-demo"' in dump and '"cxr-densenet121"' in dump
    assert "Imaging Measurement Report" in dump and '(30745-4,LN,"XR Chest Views")' in dump
    assert dump.count('"Probability"') == 14 and dump.count("Tracking Unique Identifier") == 14
    assert '"English (United States)"' in dump and "Device Observer UID" in dump
    assert '"operating threshold 0.5000' in dump and '"Image Library"' in dump
    assert "NOT FOR DIAGNOSTIC USE" in dump and "DEMO WEIGHTS" in dump
    assert "Verification Flag   : UNVERIFIED" in dump


def test_sr_reads_back_with_every_finding_probability_and_source(
    nih: pydicom.Dataset, cr: pydicom.Dataset, tmp_path: Path
) -> None:
    # Two images of one study, as a PA and an AP would arrive.
    second = copy.deepcopy(cr)
    second.StudyInstanceUID = nih.StudyInstanceUID
    results = [_result(nih), _result(second, positives=("Pneumothorax",))]
    path = _write(build_sr([nih, second], results, DEMO), tmp_path / "sr.dcm")

    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    by_code = {concept.value: name for name, concept in _sr_codes.FINDING_CODES.items()}
    recovered = {}
    for group in sr.content.get_image_measurement_groups():
        (source,) = group.source_images
        finding = by_code[group.finding_type.value]
        (measurement,) = group.get_measurements()
        assert measurement.name == _sr_codes.PROBABILITY and measurement.unit == _sr_codes.PROBABILITY_UNIT
        (evaluation,) = group.get_qualitative_evaluations()
        recovered[(source.referenced_sop_instance_uid, finding)] = (
            float(measurement.value),
            evaluation.value == _sr_codes.PRESENT,
        )
    expected = {
        (r.sop_instance_uid, f.finding): (f.probability, f.present) for r in results for f in r.findings
    }
    assert recovered.keys() == expected.keys()
    for key, (probability, present) in expected.items():
        assert recovered[key][0] == pytest.approx(probability, abs=1e-12)
        assert recovered[key][1] is present
    library = {item.referenced_sop_instance_uid for item in _image_items(sr)}
    assert library == {str(nih.SOPInstanceUID), str(second.SOPInstanceUID)}
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == library


def _image_items(sr) -> list:
    root = sr.ContentSequence
    library = next(item for item in root if item.ConceptNameCodeSequence[0].CodeMeaning == "Image Library")
    return [
        hd.sr.ImageContentItem.from_dataset(image)
        for group in library.ContentSequence
        for image in group.ContentSequence
        if image.ValueType == "IMAGE"
    ]


def test_sr_header_patient_study_series_and_equipment(nih: pydicom.Dataset) -> None:
    before = copy.deepcopy(nih)
    sr = build_sr([nih], [_result(nih)], DEMO)
    assert nih == before  # the source is not changed
    for keyword in ("PatientID", "PatientName", "PatientSex", "StudyInstanceUID", "AccessionNumber"):
        assert sr.get(keyword) == nih.get(keyword)
    assert sr.SeriesInstanceUID != nih.SeriesInstanceUID
    assert sr.SeriesDescription == "CXR Triage AI results - not for diagnostic use - DEMO WEIGHTS"
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    # highdicom lists itself too; ours is the entry with our model name.
    (equipment,) = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == DEMO.manufacturer]
    purpose = equipment.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
    assert equipment.ManufacturerModelName == "cxr-densenet121" and equipment.SoftwareVersions == "0.1.0-demo"
    assert equipment.DeviceSerialNumber == DEMO.weights_sha256
    assert equipment.DeviceUID == device_uid(DEMO)
    assert "PatientAge" not in sr or len(sr.PatientAge) == 4  # the NIH source's "81" is not valid AS


def test_non_demo_sr_does_not_say_demo(nih: pydicom.Dataset) -> None:
    sr = build_sr([nih], [_result(nih)], REAL)
    assert "DEMO" not in sr.SeriesDescription
    text = sr.ContentSequence[-1].ContentSequence[0].TextValue
    assert "NOT FOR DIAGNOSTIC USE" in text and "DEMO" not in text


def test_output_uids_are_deterministic(nih: pydicom.Dataset) -> None:
    first = build_results([nih], [display_array(nih)], [_result(nih)], [_cams()], DEMO)
    second = build_results([nih], [display_array(nih)], [_result(nih)], [_cams()], DEMO)
    assert isinstance(first, ResultObjects)
    uids = lambda objects: [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in objects]  # noqa: E731
    assert uids(first) == uids(second)
    assert _tracking_uids(first.sr) == _tracking_uids(second.sr)
    other = build_results([nih], [display_array(nih)], [_result(nih)], [_cams()], REAL)
    assert not set(uids(first)) & set(uids(other))
    # Three series (SR, heatmaps, maps), one SR, the heatmaps and the maps: all distinct.
    assert len({uid for pair in uids(first) for uid in pair}) == (
        3 + 1 + len(first.heatmaps) + len(first.parametric_maps)
    )
    for uid in (uid for pair in uids(first) for uid in pair):
        assert len(uid) <= 64 and pydicom.uid.UID(uid).is_valid


def _tracking_uids(sr: pydicom.Dataset) -> list[str]:
    out = []
    for group in hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups():
        out.append(group.tracking_uid)
    return out


def test_result_uid_depends_on_every_input() -> None:
    base = result_uid("1.2.3", DEMO, "sr")
    assert base == result_uid("1.2.3", DEMO, "sr")
    assert base.startswith("2.25.") and pydicom.uid.UID(base).is_valid
    assert base != result_uid("1.2.4", DEMO, "sr")
    assert base != result_uid("1.2.3", DEMO, "heatmap:Effusion")
    assert base != result_uid("1.2.3", REAL, "sr")


@needs_dicom3tools
@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
def test_non_ascii_patient_name_round_trips(nih: pydicom.Dataset, charset: str, tmp_path: Path) -> None:
    source = copy.deepcopy(nih)
    source.SpecificCharacterSet = charset
    source.PatientName = "Müller^Jürgen"
    source.ReferringPhysicianName = "Åström^Øyvind"
    objects = build_results([source], [display_array(source)], [_result(source)], [_cams()], DEMO)
    for number, ds in enumerate(objects):
        path = _write(ds, tmp_path / f"{number}.dcm")
        back = pydicom.dcmread(path)
        assert back.SpecificCharacterSet == charset
        assert str(back.PatientName) == "Müller^Jürgen"
        assert str(back.ReferringPhysicianName) == "Åström^Øyvind"
        assert _dciodvfy_errors(path) == []


def test_mismatched_inputs_are_rejected(nih: pydicom.Dataset, cr: pydicom.Dataset) -> None:
    with pytest.raises(ValueError, match="no result for source"):
        build_sr([nih], [_result(cr)], DEMO)
    with pytest.raises(ValueError, match="span 2 studies"):
        build_sr([nih, cr], [_result(nih), _result(cr)], DEMO)
    partial = {name: cam for name, cam in _cams().items() if name != "Effusion"}
    with pytest.raises(ValueError, match="no CAM for finding"):
        build_heatmaps(nih, display_array(nih), _result(nih), partial, DEMO)


# --- heatmaps ------------------------------------------------------------------


def test_one_heatmap_per_positive_finding(nih: pydicom.Dataset) -> None:
    images = build_heatmaps(nih, display_array(nih), _result(nih), _cams(), DEMO)
    assert len(images) == 2
    assert [image.ImageComments.split(" ")[0] for image in images] == ["Cardiomegaly", "Effusion"]


def test_summary_heatmap_when_nothing_is_positive(nih: pydicom.Dataset) -> None:
    (image,) = build_heatmaps(nih, display_array(nih), _result(nih, positives=()), _cams(), DEMO)
    assert image.ImageComments.startswith("Hernia")  # the most probable of the negatives


def test_heatmap_header(cr: pydicom.Dataset) -> None:
    (image, _) = build_heatmaps(cr, display_array(cr), _result(cr), _cams(), DEMO)
    assert image.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert image.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    assert image.PhotometricInterpretation == "YBR_FULL_422" and image.SamplesPerPixel == 3
    # Our own JPEG is lossy, and says so with its ratio (the CR source itself is lossless).
    assert image.LossyImageCompression == "01" and image.LossyImageCompressionMethod == "ISO_10918_1"
    assert float(image.LossyImageCompressionRatio) > 3
    assert list(image.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert image.BurnedInAnnotation == "YES"
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth", "VOILUTSequence"):
        assert keyword not in image
    assert image.StudyInstanceUID == cr.StudyInstanceUID and image.get("PatientID") == cr.get("PatientID")
    assert image.SeriesInstanceUID != cr.SeriesInstanceUID and image.SeriesNumber == HEATMAP_SERIES_NUMBER
    assert image.SeriesDescription.endswith("DEMO WEIGHTS")
    (reference,) = image.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == cr.SOPInstanceUID
    # The source states no Patient Orientation; the copy does not invent one.
    assert "PatientOrientation" in image and not image.PatientOrientation
    (plain, _) = build_heatmaps(cr, display_array(cr), _result(cr), _cams(), DEMO, HeatmapOptions(compress=False))
    assert plain.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and plain.PhotometricInterpretation == "RGB"
    assert plain.LossyImageCompression == "00"


def test_heatmap_keeps_the_source_patient_orientation() -> None:
    big = pydicom.dcmread(RG1)
    (image, _) = build_heatmaps(big, display_array(big), _result(big), _cams(), DEMO)
    assert list(image.PatientOrientation) == ["L", "F"] == list(big.PatientOrientation)
    # Made from a lossy JPEG 2000 source, then JPEG compressed: both, in the order applied.
    assert image.LossyImageCompression == "01"
    assert list(image.LossyImageCompressionMethod) == ["ISO_15444_1", "ISO_10918_1"]
    assert len(image.LossyImageCompressionRatio) == 2 and float(image.LossyImageCompressionRatio[0]) == 10


@pytest.mark.parametrize("max_side", [768, 512])
def test_heatmap_is_downscaled_to_the_display_size(max_side: int) -> None:
    big = pydicom.dcmread(RG1)  # 1841 x 1955
    options = HeatmapOptions(max_side=max_side, compress=False)
    (image, _) = build_heatmaps(big, display_array(big), _result(big), _cams(), DEMO, options)
    assert image.Columns == round(1841 * max_side / 1955)
    rgb = image.pixel_array
    # The picture fills the first max_side rows; the legend band below starts with a black margin.
    assert rgb[max_side - 4:max_side].max() > 0 and rgb[max_side:max_side + 4].max() == 0
    assert image.Rows > max_side


def test_heatmap_is_hotter_where_the_cam_is_high(nih: pydicom.Dataset) -> None:
    display = display_array(nih)
    (image, _) = build_heatmaps(nih, display, _result(nih), _cams(hot=(1, 1)), DEMO, HeatmapOptions(max_side=1024))
    rgb = image.pixel_array.astype(np.int32)  # decoded from JPEG, as a viewer shows it
    side = 1024  # NIH images are 1024x1024: no downscale at this size, the picture is rows 0..1023
    hot = rgb[: side // 4, : side // 4]
    cold = rgb[side * 3 // 4 : side, side * 3 // 4 : side]
    warmth = lambda block: float(np.mean(block[..., 0] - block[..., 2]))  # noqa: E731  red minus blue
    assert warmth(hot) > warmth(cold) + 20
    # Where the CAM is low the radiograph shows through unchanged (grey).
    grey = np.round(display[side * 7 // 8 :, side * 7 // 8 :] * 255)
    assert np.abs(rgb[side * 7 // 8 : side, side * 7 // 8 : side, 1] - grey).mean() < 25


def test_heatmap_legend_is_burned_in(nih: pydicom.Dataset) -> None:
    (image, _) = build_heatmaps(nih, display_array(nih), _result(nih), _cams(), DEMO)
    band = image.pixel_array[768:]
    assert band.shape[0] > 50
    assert (band > 200).any()  # text and colour bar
    assert "NOT FOR DIAGNOSTIC USE" in image.ImageComments and "DEMO WEIGHTS" in image.ImageComments


def test_secondary_capture_shows_what_predict_heatmaps_draws(nih: pydicom.Dataset) -> None:
    """One renderer: the SC's pixels are the picture `cxr-triage predict --heatmaps` writes for the same inputs
    (exactly, before the SC's JPEG compression)."""
    from cxr_triage.dicom_input import render_heatmap

    display, result, cams = display_array(nih), _result(nih), _cams()
    images = build_heatmaps(nih, display, result, cams, DEMO, HeatmapOptions(compress=False))
    for image, finding in zip(images, result.positive, strict=True):
        picture = render_heatmap(
            display, cams[finding.finding], finding=finding.finding, probability=finding.probability,
            threshold=finding.threshold, present=True, summary=False, model_name=DEMO.name,
            model_version=DEMO.version, demo=DEMO.demo,
        )
        np.testing.assert_array_equal(image.pixel_array, picture)


def test_many_positive_findings_get_images_for_the_most_urgent_and_one_overview(nih: pydicom.Dataset) -> None:
    positives = ("Pneumothorax", "Effusion", "Pneumonia", "Consolidation", "Edema", "Mass", "Cardiomegaly", "Nodule")
    result = _result(nih, positives=positives)
    # The card's urgency classes: the critical pneumothorax first, then the urgent ones by probability.
    rank = heatmap_rank(FINDINGS, DEFAULT_URGENCY)
    pairs = heatmaps_by_finding(nih, display_array(nih), result, _cams(), DEMO, HeatmapOptions(per_finding=3, rank=rank))
    assert [name for name, _ in pairs] == ["Pneumothorax", "Effusion", "Pneumonia", "overview"]
    overview = pairs[-1][1]
    assert overview.ImageComments.startswith("Overview of 8 positive findings: Pneumothorax")
    assert all(name in overview.ImageComments for name in positives)
    # Three or fewer positives: no overview.
    few = heatmaps_by_finding(nih, display_array(nih), _result(nih), _cams(), DEMO, HeatmapOptions(per_finding=3))
    assert [name for name, _ in few] == ["Cardiomegaly", "Effusion"]


@pytest.mark.parametrize("positives", [1, 3, 8, 14])
def test_result_volume_stays_within_the_budget(positives: int, tmp_path: Path) -> None:
    """At most 3 MB of result objects for a 1024x1024 image with eight positive findings, SR included,
    and no worse with all fourteen (README "Result volume")."""
    source = pydicom.dcmread(NIH)
    names = FINDINGS[:positives]
    result = _result(source, positives=names)
    native = {name: cam for name, cam in _cams(size=7).items()}
    objects = build_results([source], [display_array(source)], [result], [_cams()], DEMO, native_cams_per_image=[native])
    sizes = [len(_encoded(ds)) for ds in objects]
    assert sum(sizes) <= 3_000_000, sizes
    assert len(objects.heatmaps) == min(positives, 2) + (positives > 2)
    (pm,) = objects.parametric_maps  # every finding's map, one frame each
    assert (pm.Rows, pm.Columns, pm.NumberOfFrames) == (7, 7, 14)
    print(f"\n{positives} positive: {sum(sizes) / 1e6:.2f} MB in {len(sizes)} objects")


def _encoded(ds: pydicom.Dataset) -> bytes:
    import io

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_tracking_uids_are_stable_per_source_model_and_finding(nih: pydicom.Dataset, cr: pydicom.Dataset) -> None:
    first = _tracking_uids(build_sr([nih], [_result(nih)], DEMO))
    # Other probabilities (present/absent changes too): same tracking UIDs.
    again = _tracking_uids(build_sr([nih], [_result(nih, positives=("Hernia",))], DEMO))
    assert first == again and len(set(first)) == 14
    assert not set(first) & set(_tracking_uids(build_sr([cr], [_result(cr)], DEMO)))
    assert not set(first) & set(_tracking_uids(build_sr([nih], [_result(nih)], REAL)))


def test_device_uid_changes_with_the_weights(nih: pydicom.Dataset) -> None:
    retrained = AlgorithmInfo(name=DEMO.name, version=DEMO.version, weights_sha256="ef" * 32, demo=True)
    assert device_uid(DEMO) == device_uid(DEMO) != device_uid(retrained)
    for algorithm in (DEMO, retrained):
        sr = build_sr([nih], [_result(nih)], algorithm)
        (equipment,) = [e for e in sr.ContributingEquipmentSequence if "DeviceUID" in e]
        assert equipment.DeviceUID == device_uid(algorithm)
        observer = [item for item in sr.ContentSequence if item.ValueType == "UIDREF"]
        assert [item.UID for item in observer] == [device_uid(algorithm)]  # Device Observer UID


def test_documents_share_no_content_items(nih: pydicom.Dataset, cr: pydicom.Dataset) -> None:
    """The per-model template is copied, never shared: editing one SR leaves the next intact."""
    first = build_sr([nih], [_result(nih)], DEMO)
    groups = first.ContentSequence[-2].ContentSequence
    groups[0].ContentSequence[2].ConceptCodeSequence[0].CodeMeaning = "changed"
    first.ContentSequence[1].ConceptCodeSequence[0].CodeMeaning = "changed"
    second = build_sr([cr], [_result(cr)], DEMO)
    assert "changed" not in str(second)
    library = {item.referenced_sop_instance_uid for item in _image_items(second)}
    assert library == {str(cr.SOPInstanceUID)} and str(nih.SOPInstanceUID) not in str(second)


def test_parametric_map_holds_every_cam_at_its_own_resolution(nih: pydicom.Dataset, tmp_path: Path) -> None:
    result = _result(nih)
    yy, xx = np.mgrid[0:7, 0:7]
    ramp = (yy / 6 * 0.5 + xx / 6 * 0.5).astype(np.float32)  # a ramp in [0, 1] on the model's 7 x 7 grid
    cams = {name: ramp * (index + 1) / 14 for index, name in enumerate(FINDINGS)}
    (single,) = build_parametric_maps(nih, result, cams, DEMO)  # one map of the image, all findings
    path = _write(single, tmp_path / "pm.dcm")
    assert path.stat().st_size < 30_000
    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(path))
    assert pm.SOPClassUID == pydicom.uid.ParametricMapStorage
    assert (pm.Rows, pm.Columns, pm.NumberOfFrames) == (7, 7, 14) and pm.BitsAllocated == 32
    stored = pm.pixel_array
    for index, (name, frame) in enumerate(zip(FINDINGS, pm.PerFrameFunctionalGroupsSequence, strict=True)):
        np.testing.assert_array_equal(stored[index], cams[name])  # FloatPixelData: each CAM itself
        (mapping,) = frame.RealWorldValueMappingSequence
        assert mapping.LUTLabel == name[:16] and name in mapping.LUTExplanation
        assert (float(mapping.RealWorldValueSlope), float(mapping.RealWorldValueIntercept)) == (1.0, 0.0)
        assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    # Each cell spans 1024/7 source pixels; the NIH file states no spacing, so 1 mm is nominal.
    shared = pm.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx([1024 / 7] * 2)
    frame = pm.PerFrameFunctionalGroupsSequence[0]
    position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
    half_cell = (1024 / 7 - 1) / 2
    assert position == pytest.approx([half_cell, 0.0, -half_cell])  # rows towards L (+x), columns towards F (-z)
    (derivation,) = frame.DerivationImageSequence
    (reference,) = derivation.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == nih.SOPInstanceUID and reference.SpatialLocationsPreserved == "NO"
    assert pm.StudyInstanceUID == nih.StudyInstanceUID and pm.get("PatientID") == nih.get("PatientID")
    assert pm.SeriesInstanceUID != nih.SeriesInstanceUID and pm.SeriesNumber == PARAMETRIC_MAP_SERIES_NUMBER
    assert pm.FrameOfReferenceUID == result_uid(image_key(result), DEMO, "parametric-map-frame-of-reference")
    assert pm.ContentDescription == "NOT FOR DIAGNOSTIC USE; DEMO WEIGHTS; CAMs of 14 findings"
    assert pm.ImageComments.startswith("Frames in this order: Atelectasis 0.0500")
    assert "Cardiomegaly 0.7900 (threshold 0.5000, POSITIVE)" in pm.ImageComments and "DEMO WEIGHTS" in pm.ImageComments
    assert pm.SeriesDescription.endswith("DEMO WEIGHTS") and "(7x7 cells over its 1024x1024 pixels)" in pm.DerivationDescription
    with pytest.raises(ValueError, match="finer than"):
        build_parametric_maps(nih, result, {name: np.zeros((2048, 2048), np.float32) for name in FINDINGS}, DEMO)
    with pytest.raises(ValueError, match="no CAM for finding"):
        build_parametric_maps(nih, result, {name: ramp for name in FINDINGS[:-1]}, DEMO)


def test_parametric_maps_can_be_switched_off(nih: pydicom.Dataset) -> None:
    objects = build_results([nih], [display_array(nih)], [_result(nih)], [_cams()], DEMO, parametric_maps=False)
    assert objects.parametric_maps == () and objects.parametric_map_findings == ()
    assert len(objects.heatmaps) == 2 and len(list(objects)) == 3
    with_maps = build_results([nih], [display_array(nih)], [_result(nih)], [_cams()], DEMO)
    assert with_maps.parametric_map_findings == ("all",)
    assert with_maps.heatmap_findings == ("Cardiomegaly", "Effusion")


def test_results_bench_runs_and_prints_numbers(tmp_path: Path) -> None:
    bench = Path(__file__).resolve().parents[2] / "bench" / "results_bench.py"
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(bench), "--repeat", "1", "--json", str(out)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert "ms per study" in run.stdout
    report = json.loads(out.read_text())
    assert set(report["studies"]) == {path.name for path in ALL_CHESTS}
    assert all(study["total_ms"] > 0 for study in report["studies"].values())


@needs_dicom3tools
def test_non_ascii_model_identity_takes_the_dataset_path(nih: pydicom.Dataset, tmp_path: Path) -> None:
    """Pre-encoded groups are for ASCII model identities; others are written in the document's character set."""
    source = copy.deepcopy(nih)
    source.SpecificCharacterSet = "ISO_IR 192"
    algorithm = AlgorithmInfo(
        name="cxr-modèle", version="2.0-β", weights_sha256="12" * 32, demo=False, manufacturer="Hôpital Labs"
    )
    path = _write(build_sr([source], [_result(source)], algorithm), tmp_path / "sr.dcm")
    assert _dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    assert len(sr.content.get_image_measurement_groups()) == 14
    texts = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
        for item in sr.ContentSequence[-2].ContentSequence[0].ContentSequence
        if item.ValueType == "TEXT"
    }
    assert texts["Algorithm Name"] == "cxr-modèle" and texts["Algorithm Version"] == "2.0-β"
    assert texts["Algorithm Manufacturer"] == "Hôpital Labs"
