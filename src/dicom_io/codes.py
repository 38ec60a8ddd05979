"""Coded concepts written into our result objects, in one place.

Each finding of the ChestX-ray14 label set (DESIGN.md section 5) maps to one
SNOMED CT concept; the table below is the only place they are written.
Verification, as far as this environment allowed (no SNOMED CT browser is
reachable), one source per line in the comment beside each code:
* "PS3.16": the code and meaning appear in DICOM PS3.16 (pydicom's concept
  dictionary, generated from PS3.16; the context group is named).
* "OMOP"/"UMLS": a public vocabulary listing (OMOP concept tables, UMLS
  SNOMEDCT_US) found with the project's code search gives the same id and
  meaning.
* "SNOMED CT International (not re-checked here)": widely used id whose
  listing was not found in the sources available here.
UNVERIFIED marks a code for which no source could be found at all; it must be
checked against a SNOMED CT browser before clinical release.
"""

from __future__ import annotations

from types import MappingProxyType

from highdicom.sr import CodedConcept

__all__ = [
    "ABSENT",
    "FINDING_CODES",
    "PRESENT",
    "PROBABILITY",
    "PROBABILITY_UNIT",
    "PROCEDURE_CHEST_RADIOGRAPH",
    "QUALITATIVE_EVALUATIONS",
    "finding_code",
]


def _sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, "SCT", meaning)


# ChestX-ray14 label -> finding concept.
FINDING_CODES: MappingProxyType[str, CodedConcept] = MappingProxyType(
    {
        # 46621007 |Atelectasis (disorder)|: SNOMED CT International (not
        # re-checked here; PS3.16 lists only the subtype 40779009 Plate-like atelectasis).
        "Atelectasis": _sct("46621007", "Atelectasis"),
        # 8186001 |Cardiomegaly (disorder)|: OMOP/imaging-finding code tables
        # (code search). PS3.16 CID 12248/12249 list 287272002 as "Cardiomegaly",
        # but that id is a fetal-echo concept there, so 8186001 is kept.
        "Cardiomegaly": _sct("8186001", "Cardiomegaly"),
        "Effusion": _sct("60046008", "Pleural effusion"),  # PS3.16 CID 645, 8134
        # 409609008 |Radiologic infiltrate of lung (disorder)|: UMLS SNOMEDCT_US
        # (not re-checked here). PS3.16 CID 6104 has (112121, DCM, "Infiltrate").
        "Infiltration": _sct("409609008", "Radiologic infiltrate of lung"),
        "Mass": _sct("4147007", "Mass"),  # PS3.16 CID 6102, 6104 (chest findings)
        "Nodule": _sct("27925004", "Nodule"),  # PS3.16 CID 6102, 6104 (chest findings)
        "Pneumonia": _sct("233604007", "Pneumonia"),  # UMLS C0032285 lists SCT 233604007 "Pneumonia"
        "Pneumothorax": _sct("36118008", "Pneumothorax"),  # PS3.16 CID 6102, 6105
        "Consolidation": _sct("95436008", "Lung consolidation"),  # OMOP concept 4318404 "Lung consolidation"
        "Edema": _sct("19242006", "Pulmonary edema"),  # PS3.16 CID 3700
        # 87433001 |Pulmonary emphysema (disorder)|: SNOMED CT International
        # (not re-checked here).
        "Emphysema": _sct("87433001", "Pulmonary emphysema"),
        # 51615001 |Fibrosis of lung (disorder)|: SNOMED CT International (not
        # re-checked here). PS3.16 has only the morphology 112674009 "Fibrosis".
        "Fibrosis": _sct("51615001", "Fibrosis of lung"),
        # UNVERIFIED: 40100001 is intended as |Pleural thickening (finding)|; no
        # listing of this id was found in PS3.16 or the searchable vocabularies.
        "Pleural_Thickening": _sct("40100001", "Pleural thickening"),
        # 84089009 |Hiatal hernia (disorder)|: SNOMED CT International (not
        # re-checked here). The NIH "Hernia" label is a hiatus hernia seen
        # behind the heart on chest radiographs.
        "Hernia": _sct("84089009", "Hiatal hernia"),
    }
)

# Qualitative evaluation at the operating point (PS3.16 CID 240/241 values,
# checked in pydicom's PS3.16 dictionary).
PRESENT = _sct("52101004", "Present")
ABSENT = _sct("272519000", "Absent")

# The probability: (122157, DCM, "Probability") from PS3.16 Annex D, unit
# UCUM "1" ("no units", PS3.16 CID 7181). A probability is a dimensionless
# number in [0, 1]; UCUM "1" is the unit that CID 7181 offers for it, whereas
# the annotation "{probability}" appears in no DICOM context group and some
# readers (dcmtk, PACS viewers) show annotations verbatim.
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
PROBABILITY_UNIT = CodedConcept("1", "UCUM", "no units")

# Procedure Reported (TID 1500 row 5): 399208008 |Plain X-ray of chest
# (procedure)|, right for one or more views, PA or AP. (LOINC 36643-5 is
# "XR Chest 2 Views", wrong for a single frontal image.)
PROCEDURE_CHEST_RADIOGRAPH = _sct("399208008", "Plain chest X-ray")

# TID 1500 row 12: the report-level "Qualitative Evaluations" container.
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")


def finding_code(finding: str) -> CodedConcept:
    """The coded concept of a ChestX-ray14 finding name; ValueError if unknown."""
    try:
        return FINDING_CODES[finding]
    except KeyError:
        raise ValueError(
            f"finding {finding!r} has no code; known findings: {', '.join(FINDING_CODES)}"
        ) from None
