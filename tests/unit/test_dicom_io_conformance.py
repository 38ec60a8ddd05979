"""dicom_io on the conformant inputs hospitals send that tests/data lacks, one test per defect of issue 10.

The inputs come from tests/dicom_fixtures.py (each verified by dciodvfy in
test_dicom_fixtures.py): DX For Presentation with every Type 1 attribute
(Patient Orientation and Imager Pixel Spacing among them), a CR that states
both, ISO 2022 IR 87 and IR 149 names, JPEG/J2K frames larger than their
header. What we write from them is checked by dciodvfy, dcmtk's dsrdump and
highdicom's reader; the SR template cache is checked element for element
against a plain highdicom build.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import time
import tracemalloc
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_io import codes
from dicom_io.codestream import CodestreamError, frame_header
from dicom_io.pixels import PixelRefused, display_array, pixel_data_problem
from dicom_io.results import build_results
from dicom_io.sr import build_sr
from tests import dicom_fixtures as fx
from tests.conftest import DATA, need
from tests.unit.test_results import ALL_CHESTS, DEMO, REAL, _cams, _dciodvfy, _result

# --- the inputs ---------------------------------------------------------------------------------


def _dx_pa() -> pydicom.Dataset:
    return copy.deepcopy(fx.dx_for_presentation())


def _dx_ap() -> pydicom.Dataset:
    return copy.deepcopy(fx.dx_for_presentation(view="AP", uid_seed="dx-ap"))


def _cr() -> pydicom.Dataset:
    return copy.deepcopy(fx.cr_with_projection())


CONFORMANT = {
    "dx_for_presentation_pa": _dx_pa,
    "dx_for_presentation_ap": _dx_ap,
    "dx_for_presentation_14bit": lambda: copy.deepcopy(fx.dx_for_presentation(bits_stored=14, uid_seed="dx-14")),
    "cr_with_orientation_and_imager_spacing": _cr,
    "dx_iso2022_ir87": lambda: fx.with_character_set(_dx_pa(), "IR 87"),
    "dx_iso2022_ir149": lambda: fx.with_character_set(_dx_pa(), "IR 149"),
    "dx_for_presentation_ll": lambda: copy.deepcopy(fx.dx_for_presentation(view="LL", uid_seed="dx-ll")),
    "cr_iso2022_ir87": lambda: fx.with_character_set(_cr(), "IR 87"),
}


def _roundtrip(ds: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    """`ds` as a receiver reads it: written and read back."""
    fx.write(ds, path)
    return pydicom.dcmread(path)


# --- every conformant input gets results that verify -----------------------------------------------


@pytest.mark.parametrize("name", CONFORMANT)
def test_conformant_input_gets_results_that_verify(name: str, tmp_path: Path) -> None:
    need(shutil.which("dciodvfy") is not None, "dicom3tools' dciodvfy is not installed")
    need(shutil.which("dsrdump") is not None, "dcmtk's dsrdump is not installed")
    source = _roundtrip(CONFORMANT[name](), tmp_path / "source.dcm")
    objects = build_results([source], [display_array(source)], [_result(source)], [_cams()], DEMO)
    assert len(objects.heatmaps) == 2 and len(objects.parametric_maps) == 1
    for number, ds in enumerate(objects):
        written = fx.write(ds, tmp_path / f"{number}.dcm")
        errors, unexpected = _dciodvfy(written)
        assert errors == [] and unexpected == [], f"{ds.SOPClassUID.name}: {errors + unexpected}"
        back = pydicom.dcmread(written)
        assert back.get("SpecificCharacterSet") == source.get("SpecificCharacterSet")
        assert back.PatientName == source.PatientName and back.get("PatientAge") == source.get("PatientAge")
        assert back.PatientID == source.PatientID and back.StudyInstanceUID == source.StudyInstanceUID
    # Without +U8: dcmtk built on glibc iconv cannot convert ISO 2022 IR 87 (it prints the stored bytes).
    dump = subprocess.run(["dsrdump", str(tmp_path / "0.dcm")], capture_output=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert dump.stdout.count(b"\"Probability\"") == 14
    sr = hd.sr.srread(tmp_path / "0.dcm")
    assert len(sr.content.get_image_measurement_groups()) == 14


@pytest.mark.parametrize("name", ["dx_for_presentation_pa", "cr_with_orientation_and_imager_spacing"])
def test_image_library_states_the_projection_geometry(name: str) -> None:
    """TID 1603 descriptors from Patient Orientation and Imager Pixel Spacing (the DX case used to fail)."""
    source = CONFORMANT[name]()
    sr = build_sr([source], [_result(source)], DEMO)
    library = next(item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeMeaning == "Image Library")
    descriptors = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item
        for group in library.ContentSequence for entry in group.ContentSequence
        for item in getattr(entry, "ContentSequence", [])
    }
    assert descriptors["Patient Orientation Row"].TextValue == "L"
    assert descriptors["Patient Orientation Column"].TextValue == "F"
    spacing = [float(v) for v in source.ImagerPixelSpacing]
    assert float(descriptors["Horizontal Pixel Spacing"].MeasuredValueSequence[0].NumericValue) == spacing[1]
    assert float(descriptors["Vertical Pixel Spacing"].MeasuredValueSequence[0].NumericValue) == spacing[0]


@pytest.mark.parametrize("name", ["dx_for_presentation_pa", "cr_with_orientation_and_imager_spacing"])
def test_parametric_map_has_the_source_geometry(name: str) -> None:
    source = CONFORMANT[name]()
    (pm,) = build_results([source], [display_array(source)], [_result(source)], [_cams()], DEMO).parametric_maps
    measures = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    cells = (source.Rows / pm.Rows, source.Columns / pm.Columns)  # source pixels per map cell
    expected = [float(v) * cell for v, cell in zip(source.ImagerPixelSpacing, cells)]
    assert [float(v) for v in measures.PixelSpacing] == pytest.approx(expected)
    orientation = pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert pm.NumberOfFrames == 14
    assert [float(v) for v in orientation] == [1, 0, 0, 0, 0, -1]  # rows towards L, columns towards F
    assert "Imager Pixel Spacing" in pm.DerivationDescription and "1 mm is nominal" not in pm.DerivationDescription
    assert "Patient Orientation (rows towards L, columns towards F)" in pm.DerivationDescription


def test_parametric_map_says_when_geometry_is_assumed() -> None:
    source = pydicom.dcmread(DATA / "cxr_dicom" / "nih_00000001_000_cardiomegaly.dcm")
    (pm,) = build_results([source], [display_array(source)], [_result(source)], [_cams()], DEMO).parametric_maps
    assert "1 mm is nominal" in pm.DerivationDescription and "are assumed" in pm.DerivationDescription


def test_lateral_orientation_is_kept() -> None:
    source = copy.deepcopy(fx.dx_for_presentation(view="LL", uid_seed="dx-ll"))
    (image, _) = build_results([source], [display_array(source)], [_result(source)], [_cams()], DEMO).heatmaps
    assert list(image.PatientOrientation) == list(source.PatientOrientation)


# --- the SR -------------------------------------------------------------------------------------


def test_every_finding_has_its_finding_site() -> None:
    source = _dx_pa()
    sr = hd.sr.Comprehensive3DSR.from_dataset(build_sr([source], [_result(source)], DEMO))
    by_code = {concept.value: name for name, concept in codes.FINDING_CODES.items()}
    seen = set()
    for group in sr.content.get_image_measurement_groups():
        name = by_code[group.finding_type.value]
        (site,) = group.finding_sites
        assert site.value == codes.finding_site(name)
        seen.add(name)
    assert seen == set(codes.FINDING_CODES)
    assert codes.finding_site("Cardiomegaly").meaning == "Heart"
    assert codes.finding_site("Pneumothorax").value == "3120008"  # pleura
    assert codes.finding_site("Hernia").meaning == "Esophageal Hiatus"


def test_procedure_reported_is_the_loinc_chest_radiograph() -> None:
    source = _dx_pa()
    sr = hd.sr.Comprehensive3DSR.from_dataset(build_sr([source], [_result(source)], DEMO))
    (procedure,) = [item for item in sr.ContentSequence
                    if item.ConceptNameCodeSequence[0].CodeValue == "121058"]  # Procedure reported
    code = procedure.ConceptCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("30745-4", "LN", "XR Chest Views")


def test_pleural_thickening_uses_the_declared_local_scheme() -> None:
    concept = codes.finding_code("Pleural_Thickening")
    assert concept.scheme_designator == codes.LOCAL_CODING_SCHEME and concept.scheme_designator.startswith("99")
    source = _dx_pa()
    sr = build_sr([source], [_result(source)], DEMO)
    (item,) = sr.CodingSchemeIdentificationSequence
    assert item.CodingSchemeDesignator == codes.LOCAL_CODING_SCHEME and item.CodingSchemeName


def _verhoeff_valid(number: str) -> bool:
    """The Verhoeff check (SNOMED CT identifiers end in a Verhoeff check digit)."""
    d = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
         [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
         [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
         [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
    p = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
         [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
         [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8]]
    check = 0
    for i, digit in enumerate(reversed(number)):
        check = d[check][p[i % 8][int(digit)]]
    return check == 0


def test_every_snomed_code_passes_its_check_digit() -> None:
    concepts = [*codes.FINDING_CODES.values(), *codes.FINDING_SITES.values(), codes.PRESENT, codes.ABSENT,
                codes.FINDING_SITE]
    snomed = [c for c in concepts if c.scheme_designator == "SCT"]
    assert len(snomed) >= 17
    assert not _verhoeff_valid("78381009")  # the mistyped "pleural thickening" id seen in the wild
    for concept in snomed:
        assert concept.value.isdigit() and _verhoeff_valid(concept.value), concept


#: When each document was made: the two builds run some milliseconds apart.
_CREATION_TIME = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "ContributionDateTime"}


def _elements(ds: pydicom.Dataset, path: str = "") -> list[tuple[str, str, object]]:
    """(tag path, VR, value) of every element, depth first; sequences by item."""
    out = []
    for element in ds:
        where = f"{path}/{element.tag}"
        if element.keyword in _CREATION_TIME:
            out.append((where, element.VR, "<creation time>"))
        elif element.VR == "SQ":
            out.append((where, "SQ", len(element.value)))
            for index, item in enumerate(element.value):
                out.extend(_elements(item, f"{where}[{index}]"))
        else:
            out.append((where, element.VR, element.value))
    return out


def _sr_inputs() -> dict[str, tuple[list[pydicom.Dataset], list]]:
    cases = {}
    for path in ALL_CHESTS:
        ds = pydicom.dcmread(path, force=True)
        cases[path.name] = ([ds], [_result(ds)])
    for name, make in CONFORMANT.items():
        ds = make()
        cases[name] = ([ds], [_result(ds, positives=("Pneumothorax", "Pleural_Thickening", "Hernia"))])
    pa, lateral = (copy.deepcopy(ds) for ds in fx.pa_lateral_study())
    cases["two_images_of_one_study"] = ([pa, lateral], [_result(pa), _result(lateral, positives=())])
    return cases


@pytest.mark.parametrize("algorithm", [DEMO, REAL], ids=["demo", "real"])
@pytest.mark.parametrize("case", list(_sr_inputs()))
def test_sr_template_cache_equals_a_plain_highdicom_build(case: str, algorithm, tmp_path: Path) -> None:
    """The byte-splicing cache (sr_cache) is kept only because its output equals highdicom's own build."""
    sources, results = _sr_inputs()[case]
    predecessor = pydicom.Dataset()
    predecessor.StudyInstanceUID = sources[0].StudyInstanceUID
    predecessor.SeriesInstanceUID, predecessor.SOPInstanceUID = "2.25.1", "2.25.2"
    predecessor.SOPClassUID = pydicom.uid.Comprehensive3DSRStorage
    built = {}
    for cached in (True, False):
        ds = build_sr(sources, results, algorithm, predecessors=[predecessor], cached=cached)
        built[cached] = pydicom.dcmread(fx.write(ds, tmp_path / f"{cached}.dcm"))
    cached_elements, plain_elements = _elements(built[True]), _elements(built[False])
    assert len(cached_elements) > 500
    assert cached_elements == plain_elements


def test_superseded_reports_are_named_as_predecessors() -> None:
    source = _dx_pa()
    first = build_sr([source], [_result(source)], DEMO)
    second = build_sr([source], [_result(source)], REAL, predecessors=[first])
    (study,) = second.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (reference,) = series.ReferencedSOPSequence
    assert reference.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert second.SOPInstanceUID != first.SOPInstanceUID


def test_result_uids_follow_the_source_content_and_thresholds() -> None:
    source = _dx_pa()
    base = _result(source)
    variants = {
        "base": base,
        "other pixels": type(base)(base.sop_instance_uid, base.findings, source_sha256="ab" * 32),
        "other threshold": type(base)(base.sop_instance_uid, tuple(
            type(f)(f.finding, f.probability, 0.9 if f.probability < 0.9 else f.threshold,
                    f.probability >= (0.9 if f.probability < 0.9 else f.threshold))
            for f in base.findings)),
    }
    uids = {name: build_sr([source], [result], DEMO).SOPInstanceUID for name, result in variants.items()}
    assert len(set(uids.values())) == 3
    assert build_sr([source], [base], DEMO).SOPInstanceUID == uids["base"]  # a retry replaces


# --- PS3.3 C.7.6.1.1.5: lossy history carries over ---------------------------------------------------


@pytest.mark.parametrize("name, method", [
    ("siim_chest_pa_jpeg_baseline_no_pneumothorax.dcm", "ISO_10918_1"),
    ("cr_chest_pa_mono1_15bit_j2k_lossy.dcm", "ISO_15444_1"),
])
def test_lossy_source_gives_lossy_results_with_ratio_and_method(name: str, method: str) -> None:
    source = pydicom.dcmread(DATA / "cxr_dicom" / name)
    objects = build_results([source], [display_array(source)], [_result(source)], [_cams()], DEMO)
    for ds in objects.parametric_maps:  # float maps: the source's history only
        assert ds.LossyImageCompression == "01"
        assert ds.LossyImageCompressionMethod == method
        assert float(ds.LossyImageCompressionRatio) > 1
    for ds in objects.heatmaps:  # the source's history, then our own JPEG, in the order applied
        assert ds.LossyImageCompression == "01"
        assert list(ds.LossyImageCompressionMethod) == [method, "ISO_10918_1"]
        assert all(float(r) > 1 for r in ds.LossyImageCompressionRatio)


def test_lossless_source_gives_lossless_maps_and_honestly_lossy_heatmaps() -> None:
    source = _dx_pa()
    objects = build_results([source], [display_array(source)], [_result(source)], [_cams()], DEMO)
    for ds in objects.parametric_maps:
        assert ds.LossyImageCompression == "00"
        assert "LossyImageCompressionRatio" not in ds and "LossyImageCompressionMethod" not in ds
    for ds in objects.heatmaps:
        assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_10918_1"


# --- reading: integrity and bounded decoding ------------------------------------------------------------


def test_truncated_pixel_data_is_a_problem_without_decoding() -> None:
    problem = pixel_data_problem(fx.truncated(_dx_pa()))
    assert problem is not None and problem.startswith("truncated pixel data") and "1024x1024" in problem
    assert pixel_data_problem(_dx_pa()) is None


@pytest.mark.parametrize("make, says", [
    (fx.jpeg_frame_larger_than_header, "JPEG frame is 2048x2048 but Rows/Columns say 512x512"),
    (fx.jpeg_frame_header_patched, "JPEG frame is 12000x12000 but Rows/Columns say 512x512"),
    (fx.j2k_frame_larger_than_header, "JPEG 2000 frame is 2048x2048 but Rows/Columns say 512x512"),
])
def test_frame_larger_than_its_header_is_refused_before_decoding(make, says: str, tmp_path: Path) -> None:
    ds = _roundtrip(make(), tmp_path / "bomb.dcm")
    assert pixel_data_problem(ds) == says
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(PixelRefused, match="Rows/Columns say 512x512"):
            display_array(ds)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"refusing took {peak / 2**20:.0f} MiB: something decoded"
    assert time.perf_counter() - started < 1.0


def test_frame_headers_of_real_files() -> None:
    siim = pydicom.dcmread(DATA / "cxr_dicom" / "siim_chest_pa_jpeg_baseline_no_pneumothorax.dcm")
    rg1 = pydicom.dcmread(DATA / "cxr_dicom" / "cr_chest_pa_mono1_15bit_j2k_lossy.dcm")
    for ds, codec, bits in ((siim, "JPEG", 8), (rg1, "JPEG 2000", 15)):
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        header = frame_header(frame, ds.file_meta.TransferSyntaxUID)
        assert (header.rows, header.columns, header.components, header.codec) == (ds.Rows, ds.Columns, 1, codec)
        assert header.bits == bits
        assert pixel_data_problem(ds) is None
    assert frame_header(b"", pydicom.uid.RLELossless) is None
    with pytest.raises(CodestreamError, match="SOI"):
        frame_header(b"\x00\x01", pydicom.uid.JPEGBaseline8Bit)
    with pytest.raises(CodestreamError, match="cut short"):
        frame_header(b"\xff\xd8\xff\xe0\x00\x10JFIF", pydicom.uid.JPEGBaseline8Bit)
    with pytest.raises(CodestreamError, match="SOC"):
        frame_header(b"\xff\xd8", pydicom.uid.JPEG2000)


def test_pixel_data_check_of_a_file_equals_the_in_memory_check(tmp_path: Path) -> None:
    """The DICOM node checks spooled files without reading their pixel data into memory: same verdicts."""
    from dicom_io.pixels import pixel_data_problem_in_file

    paths = sorted(DATA.glob("*/*.dcm"))
    builders = {"truncated": lambda: fx.truncated(_dx_pa()), "jpeg_larger": fx.jpeg_frame_larger_than_header,
                "jpeg_patched": fx.jpeg_frame_header_patched, "j2k_larger": fx.j2k_frame_larger_than_header}
    paths += [fx.write(make(), tmp_path / f"{name}.dcm") for name, make in builders.items()]
    verdicts = {}
    for path in paths:
        in_memory = pixel_data_problem(pydicom.dcmread(path, force=True))
        assert pixel_data_problem_in_file(path) == in_memory, path.name
        verdicts[path.name] = in_memory
    assert sum(v is not None for v in verdicts.values()) == 4  # the four broken ones, nothing else
