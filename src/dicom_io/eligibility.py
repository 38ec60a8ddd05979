"""Is this instance a frontal chest radiograph the model may score?

DESIGN.md section 4: Modality CR or DX (also CR/DX carried in Secondary
Capture objects), chest, frontal. Everything else is SKIPPED with a reason
that names the attribute and value that decided it, so that the worklist can
say why a study was not scored.

The decision uses the header only. Headers lie (a lateral taken with the
frontal protocol, an animal imaged on a human CR plate); the model's own view
check is the second line of defence, see DESIGN.md section 4.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import pydicom
from pydicom.uid import UID

from triage_core.values import Eligibility

__all__ = ["check_eligibility"]

_RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})

# Storage SOP classes a projection radiograph may arrive in.
_CR = UID("1.2.840.10008.5.1.4.1.1.1")
_DX_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
_DX_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
_SECONDARY_CAPTURE = frozenset(
    {
        UID("1.2.840.10008.5.1.4.1.1.7"),  # Secondary Capture Image
        UID("1.2.840.10008.5.1.4.1.1.7.2"),  # Multi-frame Grayscale Byte SC
        UID("1.2.840.10008.5.1.4.1.1.7.3"),  # Multi-frame Grayscale Word SC
    }
)
_RADIOGRAPH_SOP_CLASSES = frozenset({_CR, _DX_PRESENTATION}) | _SECONDARY_CAPTURE

# Body Part Examined (0018,0015): PS3.16 Annex L defined terms for the chest,
# and the local spellings seen in practice.
_CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "TORAX", "THORAX_PA"})
# Ribs series are bone views (exposure and collimation for ribs), not the
# chest radiograph the model was trained on.

_CHEST_WORDS = re.compile(r"\b(CHEST|THORAX|THORACIC|TORAX|CXR|LUNGS?|PULMONARY|THORAKS?)\b")
_OTHER_BODY_WORDS = re.compile(
    r"\b(SKULL|HEAD|BRAIN|NECK|C-?SPINE|[CTL]SPINE|SPINE|ABDOMEN|ABD|PELVIS|HIP|KNEE|ANKLE|FOOT|FEET|"
    r"HAND|WRIST|ELBOW|SHOULDER|HUMERUS|FOREARM|FEMUR|TIBIA|FIBULA|LEG|ARM|BREAST|MAMMO\w*|DENTAL|"
    r"SINUS\w*|RIBS?|CLAVICLE|SCAPULA|EXTREMITY)\b"
)
_DESCRIPTION_KEYWORDS = (
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
)

_FRONTAL_VIEWS = frozenset({"PA", "AP"})
_LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LATERAL_LEFT", "LATERAL_RIGHT"})
# Patient Position (0018,5100) defined terms (PS3.3 C.7.3.1.1.2): they say
# how the patient lies, not which projection was taken.
_POSITION_TERMS = frozenset(
    {"HFP", "HFS", "HFDR", "HFDL", "FFDR", "FFDL", "FFP", "FFS", "LFP", "LFS", "RFP", "RFS", "AFDR", "AFDL", "PFDR", "PFDL"}
)
_VIEW_TOKEN = re.compile(r"[A-Z]+")

# Free-text fields a modality fills from its processing menu ("CANINE LATERAL
# THORAX"), consulted when View Position is empty.
_PROCESSING_TEXT_KEYWORDS = ("AcquisitionDeviceProcessingDescription", "ProtocolName", "SeriesDescription")
_LATERAL_WORDS = re.compile(r"\b(LAT|LATERAL|LL|RL|SEITLICH)\b")
_FRONTAL_WORDS = re.compile(r"\b(PA|AP|FRONTAL|POSTEROANTERIOR|ANTEROPOSTERIOR|P-A|A-P)\b")
_VETERINARY_WORDS = re.compile(r"\b(CANINE|FELINE|EQUINE|BOVINE|PORCINE|OVINE|VETERINARY|DOG|HORSE)\b")


def check_eligibility(ds: pydicom.Dataset) -> Eligibility:
    """Decide from the header whether `ds` is a frontal chest radiograph.

    Returns an `Eligibility` whose `view` is ``"PA"``, ``"AP"``,
    ``"frontal"`` (orientation says frontal, projection not stated) or
    ``"unknown"`` when eligible, and whose `reason` says what decided (or, for
    an eligible image, what was not stated).
    """
    refusal = _modality_refusal(ds) or _subject_refusal(ds)
    if refusal:
        return Eligibility(False, refusal)
    body_ok, body_note = _body_part(ds)
    if not body_ok:
        return Eligibility(False, body_note)
    eligible, view, view_note = _view(ds)
    notes = "; ".join(note for note in (body_note, view_note) if note)
    return Eligibility(eligible, notes, view)


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, None)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value).strip().upper()
    return str(value).strip().upper()


def _modality_refusal(ds: pydicom.Dataset) -> str:
    modality = _text(ds, "Modality")
    sop_class = ds.get("SOPClassUID", None) or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    if not modality:
        return "modality not stated; only radiographs (CR/DX) are analysed"
    if modality not in _RADIOGRAPH_MODALITIES:
        return f"modality {modality} is not a radiograph (CR/DX)"
    if sop_class is not None:
        sop_class = UID(str(sop_class))
        if sop_class == _DX_PROCESSING:
            return "DX image for processing (raw detector data) is not a displayable radiograph"
        if sop_class not in _RADIOGRAPH_SOP_CLASSES:
            return f"SOP class {sop_class.name} ({sop_class}) is not a radiograph storage class"
    return ""


def _subject_refusal(ds: pydicom.Dataset) -> str:
    """Veterinary images: the model is trained on human chests only."""
    if _text(ds, "AnatomicalOrientationType") == "QUADRUPED":
        return "non-human patient (AnatomicalOrientationType=QUADRUPED)"
    species = _text(ds, "PatientSpeciesDescription")
    if species and not re.search(r"\b(HUMAN|HOMO SAPIENS)\b", species):
        return f"non-human patient (PatientSpeciesDescription={species})"
    for item in ds.get("PatientSpeciesCodeSequence", None) or ():
        meaning = str(item.get("CodeMeaning", "")).upper()
        if meaning and "HOMO SAPIENS" not in meaning and "HUMAN" not in meaning:
            return f"non-human patient (PatientSpeciesCodeSequence={meaning})"
    for keyword, text in _processing_texts(ds):
        match = _VETERINARY_WORDS.search(text)
        if match:
            return f"non-human patient ({keyword}={text!r} says {match.group(1)})"
    return ""


def _body_part(ds: pydicom.Dataset) -> tuple[bool, str]:
    body_part = _text(ds, "BodyPartExamined")
    if body_part:
        if body_part in _CHEST_BODY_PARTS:
            return True, ""
        return False, f"body part {body_part} is not chest"
    descriptions = [(k, _text(ds, k)) for k in _DESCRIPTION_KEYWORDS]
    for keyword, text in descriptions:
        if text and _CHEST_WORDS.search(text):
            return True, f"body part not stated; {keyword} {text!r} says chest"
    for keyword, text in descriptions:
        match = _OTHER_BODY_WORDS.search(text) if text else None
        if match:
            return False, f"body part not stated and {keyword} {text!r} names {match.group(1)}, not chest"
    return True, "body part not stated"


def _view(ds: pydicom.Dataset) -> tuple[bool, str, str]:
    """(eligible, view, note) from the most specific attribute present."""
    view_position = _text(ds, "ViewPosition")
    if view_position:
        if view_position in _FRONTAL_VIEWS:
            return True, view_position, ""
        if view_position in _LATERAL_VIEWS:
            return False, view_position, f"lateral view (ViewPosition={view_position})"
        return False, view_position, f"view not frontal (ViewPosition={view_position})"

    coded = _view_from_code_sequence(ds)
    if coded is not None:
        return coded

    patient_position = _text(ds, "PatientPosition")
    if patient_position and patient_position not in _POSITION_TERMS:
        tokens = set(_VIEW_TOKEN.findall(patient_position))
        if tokens & _LATERAL_VIEWS:
            return False, patient_position, f"lateral view (PatientPosition={patient_position})"
        frontal = tokens & _FRONTAL_VIEWS
        if len(frontal) == 1:
            view = frontal.pop()
            return True, view, f"view taken from PatientPosition={patient_position}"
        return False, patient_position, f"view not frontal (PatientPosition={patient_position})"

    for keyword, text in _processing_texts(ds):
        if _LATERAL_WORDS.search(text):
            return False, "lateral", f"lateral view ({keyword}={text!r})"
    for keyword, text in _processing_texts(ds):
        match = _FRONTAL_WORDS.search(text)
        if match:
            view = match.group(1) if match.group(1) in _FRONTAL_VIEWS else "frontal"
            return True, view, f"view taken from {keyword}={text!r}"

    orientation = ds.get("PatientOrientation", None)
    if orientation and len(orientation) == 2 and str(orientation[0]).strip():
        row = str(orientation[0]).strip().upper()
        text = "\\".join(str(v) for v in orientation)
        # The row direction of a frontal chest runs across the patient
        # (L or R), that of a lateral front to back (A or P).
        if row[0] in "LR":
            return True, "frontal", f"view not stated; PatientOrientation={text} suggests frontal"
        if row[0] in "AP":
            return False, "lateral", f"lateral view (PatientOrientation={text})"
    if _text(ds, "ImageLaterality") == "B":
        return True, "frontal", "view not stated; ImageLaterality=B (both sides) suggests frontal"
    return True, "unknown", "view not stated"


def _view_from_code_sequence(ds: pydicom.Dataset) -> tuple[bool, str, str] | None:
    """View Code Sequence (0054,0220), by code meaning (CID 4010 / 4012 terms)."""
    for item in ds.get("ViewCodeSequence", None) or ():
        meaning = str(item.get("CodeMeaning", "")).strip()
        lowered = meaning.lower().replace("-", "")
        if "lateral" in lowered and "posteroanterior" not in lowered and "anteroposterior" not in lowered:
            return False, "lateral", f"lateral view (ViewCodeSequence={meaning!r})"
        if lowered.startswith("posteroanterior"):
            return True, "PA", ""
        if lowered.startswith("anteroposterior"):
            return True, "AP", ""
        if meaning:
            return False, meaning, f"view not frontal (ViewCodeSequence={meaning!r})"
    return None


def _processing_texts(ds: pydicom.Dataset) -> Iterable[tuple[str, str]]:
    for keyword in _PROCESSING_TEXT_KEYWORDS:
        text = _text(ds, keyword)
        if text:
            yield keyword, text
    for item in ds.get("PerformedProtocolCodeSequence", None) or ():
        meaning = str(item.get("CodeMeaning", "")).strip().upper()
        if meaning:
            yield "PerformedProtocolCodeSequence", meaning
