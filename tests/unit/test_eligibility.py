"""dicom_io.eligibility on every reference file and on edited headers."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
from pydicom.sr.coding import Code

from dicom_io.eligibility import check_eligibility

DATA = Path(__file__).resolve().parents[1] / "data"
CXR_FILES = sorted((DATA / "cxr_dicom").glob("*.dcm"))
NOT_CXR_FILES = sorted((DATA / "not_cxr_dicom").glob("*.dcm"))
DOG = DATA / "not_cxr_dicom" / "dx_dog_thorax_lateral.dcm"
CR_PA = DATA / "cxr_dicom" / "cr_chest_pa_mono1_10bit_explicit_le.dcm"
NIH_NO_BODY_PART = DATA / "cxr_dicom" / "nih_00000002_000_no_finding.dcm"


def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, force=True, stop_before_pixels=True)


def test_reference_files_are_present() -> None:
    assert len(CXR_FILES) == 7 and len(NOT_CXR_FILES) == 5


@pytest.mark.parametrize("path", CXR_FILES, ids=lambda p: p.name)
def test_every_real_chest_radiograph_is_eligible(path: Path) -> None:
    result = check_eligibility(_header(path))
    assert result.eligible, result.reason
    assert result.view in {"PA", "AP", "frontal", "unknown"}


EXPECTED_SKIPS = {
    "bad_header_bodypart_ribcage.dcm": "body part RIBCAGE is not chest",
    "bad_header_modality_ct.dcm": "modality CT is not a radiograph (CR/DX)",
    "bad_header_patient_position_xx.dcm": "view not frontal (PatientPosition=XX)",
    "cr_tibia_j2k.dcm": "body part EXTREMITY is not chest",
}


@pytest.mark.parametrize("path", [p for p in NOT_CXR_FILES if p.name in EXPECTED_SKIPS], ids=lambda p: p.name)
def test_every_non_chest_file_is_skipped_with_a_specific_reason(path: Path) -> None:
    result = check_eligibility(_header(path))
    assert not result.eligible
    assert result.reason == EXPECTED_SKIPS[path.name]


def test_dog_lateral_thorax_is_caught_only_by_its_processing_text() -> None:
    """The header says BodyPartExamined THORAX, PatientOrientation L\\F (a
    frontal's orientation) and no ViewPosition. Only the free-text processing
    menu entry "CANINE LATERAL THORAX 0-15cm" gives it away."""
    dog = _header(DOG)
    result = check_eligibility(dog)
    assert not result.eligible
    assert result.reason.startswith("non-human patient (AcquisitionDeviceProcessingDescription=")
    assert "CANINE" in result.reason

    # Without that text the header lies successfully: a lateral (and canine)
    # image passes as a frontal chest. Header checks cannot catch this; it
    # needs the model-based view check of DESIGN.md section 4.
    del dog.AcquisitionDeviceProcessingDescription
    del dog.PerformedProtocolCodeSequence
    lying = check_eligibility(dog)
    assert lying.eligible and lying.view == "frontal"
    assert "PatientOrientation=L\\F" in lying.reason


def test_missing_body_part_and_view_is_eligible_with_a_note() -> None:
    result = check_eligibility(_header(NIH_NO_BODY_PART))
    assert result.eligible and result.view == "unknown"
    assert "body part not stated" in result.reason and "view not stated" in result.reason


def _edited(**attributes) -> pydicom.Dataset:
    ds = copy.deepcopy(_header(CR_PA))
    for keyword, value in attributes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({"ViewPosition": "LL"}, "lateral view (ViewPosition=LL)"),
        ({"ViewPosition": "RL"}, "lateral view (ViewPosition=RL)"),
        ({"ViewPosition": "LLO"}, "view not frontal (ViewPosition=LLO)"),
        ({"Modality": "CT"}, "modality CT is not a radiograph (CR/DX)"),
        ({"Modality": "MG"}, "modality MG is not a radiograph (CR/DX)"),
        ({"Modality": None}, "modality not stated; only radiographs (CR/DX) are analysed"),
        ({"BodyPartExamined": "RIBCAGE"}, "body part RIBCAGE is not chest"),
        ({"BodyPartExamined": "KNEE"}, "body part KNEE is not chest"),
        ({"ViewPosition": None, "PatientPosition": "XX"}, "view not frontal (PatientPosition=XX)"),
        ({"ViewPosition": None, "PatientPosition": "LATERAL"}, "lateral view (PatientPosition=LATERAL)"),
        ({"ViewPosition": None, "PatientOrientation": ["A", "F"]}, "lateral view (PatientOrientation=A\\F)"),
        ({"AnatomicalOrientationType": "QUADRUPED"}, "non-human patient (AnatomicalOrientationType=QUADRUPED)"),
        ({"PatientSpeciesDescription": "Canis lupus familiaris"}, "non-human patient (PatientSpeciesDescription=CANIS LUPUS FAMILIARIS)"),
        (
            {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.34"},
            "SOP class Comprehensive 3D SR Storage (1.2.840.10008.5.1.4.1.1.88.34) is not a radiograph storage class",
        ),
        (
            {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1.1"},
            "DX image for processing (raw detector data) is not a displayable radiograph",
        ),
        (
            {"BodyPartExamined": None, "StudyDescription": "XR KNEE 2 VIEWS"},
            "body part not stated and StudyDescription 'XR KNEE 2 VIEWS' names KNEE, not chest",
        ),
    ],
)
def test_edited_header_is_skipped_with_a_specific_reason(attributes: dict, reason: str) -> None:
    result = check_eligibility(_edited(**attributes))
    assert not result.eligible
    assert result.reason == reason


@pytest.mark.parametrize(
    ("attributes", "view", "note"),
    [
        ({}, "PA", ""),
        ({"ViewPosition": "AP"}, "AP", ""),
        ({"ViewPosition": None, "PatientPosition": "PA"}, "PA", "view taken from PatientPosition=PA"),
        ({"ViewPosition": None, "PatientPosition": "HFS"}, "unknown", "view not stated"),
        ({"ViewPosition": None, "PatientOrientation": ["L", "F"]}, "frontal", "PatientOrientation=L\\F suggests frontal"),
        ({"ViewPosition": None, "ImageLaterality": "B"}, "frontal", "ImageLaterality=B"),
        ({"BodyPartExamined": None, "StudyDescription": "CXR PA"}, "PA", "StudyDescription 'CXR PA' says chest"),
        ({"BodyPartExamined": "THORAX"}, "PA", ""),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "Modality": "DX"}, "PA", ""),
    ],
)
def test_edited_header_is_eligible(attributes: dict, view: str, note: str) -> None:
    result = check_eligibility(_edited(**attributes))
    assert result.eligible, result.reason
    assert result.view == view
    assert note in result.reason


def test_view_code_sequence_decides_when_view_position_is_empty() -> None:
    lateral = _edited(ViewPosition=None)
    lateral.ViewCodeSequence = [_code_item(Code("399067008", "SCT", "lateral"))]
    assert check_eligibility(lateral).reason == "lateral view (ViewCodeSequence='lateral')"
    frontal = _edited(ViewPosition=None)
    frontal.ViewCodeSequence = [_code_item(Code("399348003", "SCT", "postero-anterior"))]
    result = check_eligibility(frontal)
    assert result.eligible and result.view == "PA"


def _code_item(code: Code) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return item
