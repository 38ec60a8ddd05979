"""Coded concepts written into our result objects, in one place.

Each finding of the ChestX-ray14 label set (DESIGN.md section 5) maps to one
concept and one finding site; the tables below are the only place they are
written. Every SNOMED CT identifier here passes its Verhoeff check digit
(tested). Sources, one per line in the comment beside each code:
* "PS3.16": the code and meaning appear in DICOM PS3.16 (pydicom's concept
  dictionary, generated from PS3.16; the context group is named).
* "OMOP"/"UMLS"/"HL7": a public vocabulary listing gives the same id and
  meaning.
* "SNOMED CT International (not re-checked here)": widely used id whose
  listing was not found in the sources available here.

Pleural thickening has no SNOMED CT concept that any source reachable here
lists (the id used before, 40100001, was found nowhere; the one other
candidate seen, 78381009, fails the check digit). It is therefore coded in
our own coding scheme, declared in each SR's Coding Scheme Identification
Sequence: PS3.16 section 8 reserves designators beginning with "99" for
private schemes. The openimagingdata finding model for pleural thickening
indexes the same concept as GAMUTS 15999.
"""

from __future__ import annotations

from types import MappingProxyType

import pydicom
from highdicom.sr import CodedConcept

__all__ = [
    "ABSENT",
    "FINDING_CODES",
    "FINDING_SITES",
    "FINDING_SITE",
    "LOCAL_CODING_SCHEME",
    "PRESENT",
    "PROBABILITY",
    "PROBABILITY_UNIT",
    "PROCEDURE_CHEST_RADIOGRAPH",
    "QUALITATIVE_EVALUATIONS",
    "coding_scheme_identification",
    "finding_code",
    "finding_site",
]


def _sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, "SCT", meaning)


#: Our private coding scheme (PS3.16 section 8: designators starting "99" are private).
LOCAL_CODING_SCHEME = "99CXRTRIAGE"
_LOCAL_SCHEME_NAME = "CXR Triage local codes"


def _local(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, LOCAL_CODING_SCHEME, meaning)


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
        # No verifiable SNOMED CT concept (see the module docstring): our own
        # scheme; GAMUTS 15999 "pleural thickening" (openimagingdata/findingmodels
        # defs/pleural_thickening.fm.json) names the same finding.
        "Pleural_Thickening": _local("PLEURAL-THICK", "Pleural thickening"),
        # 84089009 |Hiatal hernia (disorder)|: SNOMED CT International (not
        # re-checked here). The NIH "Hernia" label is a hiatus hernia seen
        # behind the heart on chest radiographs.
        "Hernia": _sct("84089009", "Hiatal hernia"),
    }
)

# Where each finding lies (TID 1501 row 8, Finding Site, CID 6100 "Chest
# Component Category" and CID 6102; PS3.16, checked in pydicom's PS3.16
# dictionary): lung parenchyma, pleura, heart, or the oesophageal hiatus for
# the NIH "Hernia" label (a hiatus hernia behind the heart).
FINDING_SITE = CodedConcept("363698007", "SCT", "Finding Site")  # PS3.16 CID 9000
_LUNG = _sct("39607008", "Lung")  # PS3.16 CID 6100
_PLEURA = _sct("3120008", "Pleural structure")  # PS3.16 CID 6100
_HEART = _sct("80891009", "Heart")  # PS3.16 CID 6100
_HIATUS = _sct("280062008", "Esophageal Hiatus")  # PS3.16 CID 6102

FINDING_SITES: MappingProxyType[str, CodedConcept] = MappingProxyType(
    {
        "Atelectasis": _LUNG,
        "Cardiomegaly": _HEART,
        "Effusion": _PLEURA,
        "Infiltration": _LUNG,
        "Mass": _LUNG,
        "Nodule": _LUNG,
        "Pneumonia": _LUNG,
        "Pneumothorax": _PLEURA,
        "Consolidation": _LUNG,
        "Edema": _LUNG,
        "Emphysema": _LUNG,
        "Fibrosis": _LUNG,
        "Pleural_Thickening": _PLEURA,
        "Hernia": _HIATUS,
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

# Procedure Reported (TID 1500 row 5; IHE AIR: "shall describe the imaging
# procedure analyzed"): LOINC/RSNA Radiology Playbook 30745-4 "XR Chest
# Views", the chest radiograph with any number of views (36554-4 is "XR Chest
# Single view", 36643-5 "XR Chest 2 Views"; a study may bring either). Source:
# the LOINC codes listed by MicrosoftDocs/azure-docs, articles/azure-health-
# insights/radiology-insights/radiology-procedure-inference.md, Appendix A.
PROCEDURE_CHEST_RADIOGRAPH = CodedConcept("30745-4", "LN", "XR Chest Views")

# TID 1500 row 12: the report-level "Qualitative Evaluations" container.
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")


def finding_site(finding: str) -> CodedConcept:
    """The anatomic site of a ChestX-ray14 finding; ValueError if unknown."""
    try:
        return FINDING_SITES[finding]
    except KeyError:
        raise ValueError(f"finding {finding!r} has no finding site") from None


def coding_scheme_identification() -> list[pydicom.Dataset]:
    """Coding Scheme Identification Sequence items (PS3.3 C.12.1) for the
    schemes that are not in PS3.16's table of coding schemes: ours."""
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = LOCAL_CODING_SCHEME
    item.CodingSchemeName = _LOCAL_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "CXR Triage"
    return [item]


def finding_code(finding: str) -> CodedConcept:
    """The coded concept of a ChestX-ray14 finding name; ValueError if unknown."""
    try:
        return FINDING_CODES[finding]
    except KeyError:
        raise ValueError(
            f"finding {finding!r} has no code; known findings: {', '.join(FINDING_CODES)}"
        ) from None
