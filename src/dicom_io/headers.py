"""What our result objects take from their source radiograph's header.

Patient and study identity are copied verbatim (valid values only); the
projection geometry (Patient Orientation, Pixel Spacing or Imager Pixel
Spacing) is read where the source states it, and never invented; the lossy
compression history of the source carries over to everything derived from
its pixels (PS3.3 C.7.6.1.1.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import pydicom
from highdicom.sr import CodedConcept
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.valuerep import validate_value

__all__ = [
    "Lossy",
    "PATIENT_STUDY_KEYWORDS",
    "copy_patient_and_study",
    "header_view",
    "instance_number",
    "lossy_history",
    "patient_orientation",
    "pixel_spacing",
    "set_lossy_attributes",
    "source_image_item",
    "valid_element",
]

# Patient and study attributes copied verbatim from the source (PS3.3 C.7.1.1
# Patient, C.7.2.1 General Study, C.7.2.2 Patient Study). highdicom copies
# some of them; copying them again keeps the set explicit and identical in
# the SR and the images.
PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
    # Patient Study module: a radiologist reads a chest radiograph with the age.
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)

# Type 2 attributes of the Patient and General Study modules that highdicom
# reads from the first evidence dataset; absent in some sources (the NIH
# samples have no birth date), present but empty in the result objects.
_TYPE2_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "AccessionNumber", "ReferringPhysicianName", "StudyID",
)


def valid_element(element: pydicom.DataElement) -> bool:
    """Whether every value of `element` is valid for its VR (an invalid one is not copied).

    Multi-valued elements (Patient Orientation ``L\\F``, Imager Pixel
    Spacing, several windows) are checked value by value: pydicom's
    validator takes one value at a time.
    """
    values = element.value
    if isinstance(values, (MultiValue, list, tuple)) and element.VR not in ("SQ", "OB", "OW", "UN"):
        candidates = list(values)
    else:
        candidates = [values]
    try:
        for value in candidates:
            validate_value(element.VR, value, pydicom.config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def header_view(source: pydicom.Dataset) -> pydicom.Dataset:
    """A header-only copy of `source` (no pixels, no sequences, valid values
    only) with the Type 2 patient/study attributes present, empty where the
    source lacks them, for highdicom to build from.

    Person names are left empty: highdicom checks them and warns with the
    name in the message, and names stay out of logs (house rule 5). The real
    values are copied onto the result by `copy_patient_and_study`.
    """
    view = pydicom.Dataset()
    for element in source:
        if element.tag.group != 0x7FE0 and element.VR != "SQ" and valid_element(element):
            # A new element: the view is edited below, the source must not be.
            view.add(pydicom.DataElement(element.tag, element.VR, element.value))
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in view:
            setattr(view, keyword, None)
    view.PatientName = None
    view.ReferringPhysicianName = None
    # The character set is set on the result itself (copy_patient_and_study):
    # highdicom's constructors take ISO 2022 code extensions ("\ISO 2022 IR 87",
    # first value empty) for invalid.
    if "SpecificCharacterSet" in view:
        del view.SpecificCharacterSet
    return view


def copy_patient_and_study(source: pydicom.Dataset, target: pydicom.Dataset) -> None:
    """Copy the patient and study identity verbatim, with the source's
    character set; invalid values are left out (the NIH samples carry
    Patient's Age "81", not "081Y")."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source and source[keyword].value not in (None, "") and valid_element(source[keyword]):
            target[keyword] = pydicom.DataElement(source[keyword].tag, source[keyword].VR, source[keyword].value)
        elif keyword in target and keyword not in _TYPE2_PATIENT_STUDY and keyword != "StudyInstanceUID":
            del target[keyword]
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet
    elif "SpecificCharacterSet" in target:
        del target.SpecificCharacterSet


def patient_orientation(source: pydicom.Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation as two single-letter directions that
    are not parallel (``("L", "F")`` for a conventionally displayed PA chest),
    or None when it is absent or is anything else (oblique ``"FL"``...)."""
    value = source.get("PatientOrientation", None)
    if not value or isinstance(value, str) or len(value) != 2:
        return None
    row, column = (str(v).strip().upper() for v in value)
    try:  # highdicom takes single-letter biped directions only
        hd.PatientOrientationValuesBiped(row)
        hd.PatientOrientationValuesBiped(column)
    except ValueError:
        return None
    if {row, column} in ({"L", "R"}, {"A", "P"}, {"H", "F"}) or row == column:
        return None
    return row, column


def pixel_spacing(
    source: pydicom.Dataset, keywords: tuple[str, ...] = ("PixelSpacing", "ImagerPixelSpacing")
) -> tuple[tuple[float, float], str] | None:
    """(row spacing, column spacing) in mm and the attribute that stated it.

    By default Pixel Spacing (calibrated to the patient) before Imager Pixel
    Spacing (at the detector plane, PS3.3 C.8.11.4.1.1; larger than the
    anatomy by the geometric magnification). None when the source states
    none of `keywords` validly.
    """
    for keyword in keywords:
        value = source.get(keyword, None)
        try:
            spacing = tuple(float(v) for v in value) if value is not None and not isinstance(value, str) else ()
        except (TypeError, ValueError):
            continue
        if len(spacing) == 2 and all(v > 0 for v in spacing):
            return (spacing[0], spacing[1]), keyword
    return None


def instance_number(source: pydicom.Dataset, number: int) -> int:
    try:
        base = int(source.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        base = 0
    return base * 100 + number if 0 < base < 10**6 else number


# Lossy transfer syntaxes and their Lossy Image Compression Method defined
# terms (PS3.3 C.7.6.1.1.5.1). JPEG 2000 (.91) and HTJ2K may carry either;
# they count as lossy unless the header says "00".
_LOSSY_METHODS = {
    pydicom.uid.JPEGBaseline8Bit: "ISO_10918_1",
    pydicom.uid.JPEGExtended12Bit: "ISO_10918_1",
    pydicom.uid.JPEGLSNearLossless: "ISO_14495_1",
    pydicom.uid.JPEG2000: "ISO_15444_1",
    pydicom.uid.HTJ2K: "ISO_15444_15",
}


@dataclass(frozen=True)
class Lossy:
    """The lossy compression history of a source's pixels."""

    lossy: bool
    ratios: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()


def lossy_history(source: pydicom.Dataset) -> Lossy:
    """Whether the source's pixels went through lossy compression, with the
    ratios and methods as stated or, for its own transfer syntax, as measured
    (uncompressed size over encoded size)."""
    stated = str(source.get("LossyImageCompression", "") or "").strip()
    meta = getattr(source, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    method_now = _LOSSY_METHODS.get(syntax) if syntax else None
    lossy = stated == "01" if stated in ("00", "01") else method_now is not None
    if not lossy:
        return Lossy(False)
    ratios = _strings(source.get("LossyImageCompressionRatio", None))
    methods = _strings(source.get("LossyImageCompressionMethod", None))
    # Sources often state half of the pair (a ratio without its method, or the
    # reverse); the half for the compression of their own transfer syntax can
    # be filled in: the method from the syntax, the ratio by measuring.
    if method_now is not None and len(ratios) <= 1 and len(methods) <= 1:
        if not methods:
            methods = (method_now,)
        if not ratios and methods == (method_now,):
            measured = _measured_ratio(source)
            ratios = (measured,) if measured else ()
    return Lossy(True, ratios, methods)


def set_lossy_attributes(source: pydicom.Dataset, target: pydicom.Dataset,
                         also: tuple[str, str] | None = None) -> None:
    """Lossy Image Compression and, when lossy, its ratios and methods (Type 1C): the source's
    history, then `also` (ratio, method), a lossy compression of the target's own pixels."""
    history = lossy_history(source)
    if also is not None:
        history = Lossy(True, history.ratios + (also[0],), history.methods + (also[1],)) if (
            not history.lossy or len(history.ratios) == len(history.methods)) else Lossy(True, (also[0],), (also[1],))
    target.LossyImageCompression = "01" if history.lossy else "00"
    for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if keyword in target:
            del target[keyword]
    if history.lossy and history.ratios:
        target.LossyImageCompressionRatio = list(history.ratios)
        if len(history.methods) == len(history.ratios):
            target.LossyImageCompressionMethod = list(history.methods)


def _strings(value: object) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, (MultiValue, list, tuple)):
        return tuple(str(v) for v in value if str(v).strip())
    return (str(value),)


def _measured_ratio(source: pydicom.Dataset) -> str | None:
    if "PixelData" not in source:
        return None
    try:
        rows, columns = int(source.Rows), int(source.Columns)
        samples = int(source.get("SamplesPerPixel", 1) or 1)
        frames = int(source.get("NumberOfFrames", 1) or 1)
        bits = int(source.BitsAllocated)
        encoded = len(source.PixelData)
    except (AttributeError, TypeError, ValueError):
        return None
    if encoded <= 0:
        return None
    ratio = rows * columns * samples * frames * bits / 8 / encoded
    return f"{ratio:.2f}"[:16]


def source_image_item(source: pydicom.Dataset) -> pydicom.Dataset:
    """A Source Image Sequence item: the radiograph this object was derived from."""
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)]
    return item
