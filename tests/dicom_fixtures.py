"""Standards-conformant DICOM test inputs built from the real radiographs in tests/data/cxr_dicom/.

Every builder is a pure function: it reads the committed source file (or copies the dataset it
is given) and returns a new ``pydicom.Dataset`` with ``file_meta`` filled in, ready for
``ds.save_as(path, enforce_file_format=True)``; only :func:`write` writes to disk.

Determinism: all UIDs are ``2.25.<uuid5>`` values derived from fixed names (and from the study UID
where one is passed in), all dates and times are constants, and the pixel transforms are exact
integer arithmetic or deterministic codecs (libjpeg via Pillow, OpenJPEG), so two calls give
byte-identical files.

References are to DICOM PS3.3 (Information Object Definitions), PS3.5 (Data Structures and
Encoding) and PS3.16 (Content Mapping Resource), current edition.

Pixel sources:

* ``nih_00000001_000_cardiomegaly.dcm``: NIH ChestX-ray14 00000001_000, 1024x1024 8-bit
  MONOCHROME2 (a PA chest; see tests/data/README.md), rescaled here to 12 or 14 bits.
* ``cr_chest_pa_mono1_10bit_explicit_le.dcm``: Fuji CR chest PA, 440x440 10-bit MONOCHROME1.
"""

from __future__ import annotations

import copy
import functools
import io
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)

DATA = Path(__file__).resolve().parent / "data"
NIH_SOURCE = DATA / "cxr_dicom" / "nih_00000001_000_cardiomegaly.dcm"
CR_SOURCE = DATA / "cxr_dicom" / "cr_chest_pa_mono1_10bit_explicit_le.dcm"

#: SOP Classes (PS3.4 B.5).
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"

#: Fixed so that files do not change when pydicom is upgraded.
IMPLEMENTATION_CLASS_UID = PYDICOM_IMPLEMENTATION_UID
IMPLEMENTATION_VERSION_NAME = "CXR_FIXTURES_1"

#: Study date/time and the patient born 57 years (and some months) before it.
STUDY_DATE = "20220315"
STUDY_TIME = "093000"
BIRTH_DATE = "19640710"
PATIENT_AGE = "057Y"

#: PS3.16 CID 4009 "DX Anatomy Imaged" (also CID 4031): Chest.
CHEST = ("816094009", "SCT", "Chest")

#: PS3.16 CID 4010 "DX View".
VIEW_CODES = {
    "PA": ("272479007", "SCT", "postero-anterior"),
    "AP": ("399348003", "SCT", "antero-posterior"),
    "LL": ("399173006", "SCT", "left lateral"),
}

#: Patient Orientation (0020,0020) (PS3.3 C.7.6.1.1.1: direction of the row, then of the column):
#: a frontal chest (PA or AP) is stored as if facing the patient, rows towards the patient's left,
#: columns towards the feet; a left lateral is stored with the patient facing the viewer's left, so
#: rows run towards the patient's back.
PATIENT_ORIENTATION = {"PA": ["L", "F"], "AP": ["L", "F"], "LL": ["P", "F"]}

#: Detector geometry: 0.143 mm elements binned 3x3 give the 1024x1024 NIH matrix over ~44 cm.
DETECTOR_ELEMENT_SPACING = [0.143, 0.143]
DETECTOR_BINNING = [3.0, 3.0]
IMAGER_PIXEL_SPACING = [0.429, 0.429]

#: Per-view acquisition geometry and technique (mm, kVp, mA, ms, uAs).
_TECHNIQUE = {
    "PA": dict(sid=1800, sod=1600, kvp=125, ma=250, ms=8, uas=2000, positioner="COLUMN"),
    "AP": dict(sid=1000, sod=800, kvp=90, ma=200, ms=10, uas=2000, positioner="NONE"),
    "LL": dict(sid=1800, sod=1550, kvp=125, ma=320, ms=16, uas=5120, positioner="COLUMN"),
}

View = Literal["PA", "AP", "LL"]


def uid(*parts: object) -> str:
    """A deterministic UID under the 2.25 root (PS3.5 B.2): ``2.25.`` + the integer of a UUIDv5 of `parts`."""
    name = "/".join(str(p) for p in ("cxr-triage-tests",) + parts)
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, name).int)


def write(ds: Dataset, path: str | Path) -> Path:
    """Write `ds` as a DICOM Part 10 file (PS3.10 7.1) and return the path."""
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------------
# helpers


@functools.lru_cache(maxsize=None)
def _nih_pixels() -> np.ndarray:
    """The NIH radiograph, decoded by pydicom, 1024x1024 uint8 MONOCHROME2 (read-only)."""
    array = pydicom.dcmread(NIH_SOURCE).pixel_array.astype(np.uint8)
    array.setflags(write=False)
    return array


def _rescale(array8: np.ndarray, bits: int) -> np.ndarray:
    """8-bit to `bits`-bit unsigned by exact integer arithmetic (0 -> 0, 255 -> 2**bits - 1)."""
    top = (1 << bits) - 1
    return ((array8.astype(np.uint32) * top + 127) // 255).astype(np.uint16)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    """One item of a Code Sequence (PS3.3 Table 8.8-1 Code Sequence Macro, basic coded entry)."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> FileMetaDataset:
    """File Meta Information (PS3.10 7.1)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _dx(
    *,
    kind: str,
    sop_class: str,
    study_instance_uid: str | None,
    view: View,
    series_number: int,
    instance_number: int,
    study_description: str,
    accession_number: str,
    patient_id: str,
    patient_name: str,
) -> Dataset:
    """Every Type 1 and 2 attribute of the DX Image IOD except the image-specific pixel ones."""
    if view not in VIEW_CODES:
        raise ValueError(f"view must be one of {sorted(VIEW_CODES)}, not {view!r}")
    study = study_instance_uid or uid(kind, view, "study")
    series = uid(study, kind, view, series_number, "series")
    instance = uid(series, instance_number, "instance")
    tech = _TECHNIQUE[view]

    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, instance, ExplicitVRLittleEndian)

    # SOP Common (PS3.3 C.12.1)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = instance
    ds.InstanceCreationDate = STUDY_DATE
    ds.InstanceCreationTime = "093215"

    # Patient (PS3.3 C.7.1.1)
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "CXR-TRIAGE-TESTS"
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientSex = "M"

    # General Study (PS3.3 C.7.2.1)
    ds.StudyInstanceUID = study
    ds.StudyDate = STUDY_DATE
    ds.StudyTime = STUDY_TIME
    ds.ReferringPhysicianName = "Weiß^Anna^^Dr."  # family^given^middle^prefix (PS3.5 6.2)
    ds.StudyID = "1"
    ds.AccessionNumber = accession_number
    ds.StudyDescription = study_description

    # Patient Study (PS3.3 C.7.2.2)
    ds.PatientAge = PATIENT_AGE

    # General Series (PS3.3 C.7.3.1) and DX Series (PS3.3 C.8.11.1)
    ds.Modality = "DX"
    ds.SeriesInstanceUID = series
    ds.SeriesNumber = series_number
    ds.SeriesDate = STUDY_DATE
    ds.SeriesTime = "093100"
    ds.SeriesDescription = {"PA": "Chest PA", "AP": "Chest AP", "LL": "Chest lateral"}[view]
    ds.BodyPartExamined = "CHEST"

    # General Equipment (PS3.3 C.7.5.1)
    ds.Manufacturer = "CXR-TRIAGE TEST FIXTURES"
    ds.InstitutionName = "Test Hospital"
    ds.StationName = "DXROOM1"
    ds.ManufacturerModelName = "dicom_fixtures.py"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1"

    # General Image (PS3.3 C.7.6.1) and General Acquisition (PS3.3 C.7.10.1)
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = PATIENT_ORIENTATION[view]
    ds.ContentDate = STUDY_DATE
    ds.ContentTime = "093210"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = STUDY_DATE
    ds.AcquisitionTime = "093205"

    # DX Anatomy Imaged (PS3.3 C.8.11.2): the chest is an unpaired structure -> "U".
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = Sequence([_code(*CHEST)])

    # DX Detector (PS3.3 C.8.11.4)
    ds.DetectorType = "SCINTILLATOR"
    ds.DetectorConfiguration = "AREA"
    ds.DetectorID = "DET-0001"
    ds.DetectorBinning = DETECTOR_BINNING
    ds.DetectorElementPhysicalSize = DETECTOR_ELEMENT_SPACING
    ds.DetectorElementSpacing = DETECTOR_ELEMENT_SPACING
    ds.ImagerPixelSpacing = IMAGER_PIXEL_SPACING

    # DX Positioning (PS3.3 C.8.11.5): PositionerType is Type 2.
    ds.ViewPosition = view
    ds.ViewCodeSequence = Sequence([_code(*VIEW_CODES[view])])
    ds.DistanceSourceToDetector = tech["sid"]
    ds.DistanceSourceToPatient = tech["sod"]
    ds.EstimatedRadiographicMagnificationFactor = f"{tech['sid'] / tech['sod']:.4f}"
    ds.PositionerType = tech["positioner"]

    # X-Ray Acquisition Dose (PS3.3 C.8.7.8): all Type 3; the technique a real unit records.
    ds.KVP = tech["kvp"]
    ds.XRayTubeCurrent = tech["ma"]
    ds.ExposureTime = tech["ms"]
    ds.ExposureInuAs = tech["uas"]
    ds.ExposureIndex = 450
    ds.TargetExposureIndex = 400
    ds.DeviationIndex = 0.5  # 10*log10(EI/TEI) (IEC 62494-1)

    # Acquisition Context (PS3.3 C.7.6.14): Type 2, empty.
    ds.AcquisitionContextSequence = Sequence()
    return ds


def _pixels(ds: Dataset, array: np.ndarray, bits_stored: int, photometric: str) -> None:
    """Image Pixel (PS3.3 C.7.6.3), native, 16 bits allocated."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = array.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(array, dtype="<u2").tobytes()


# --------------------------------------------------------------------------------------------------
# conformant fixtures


def dx_for_presentation(
    *,
    study_instance_uid: str | None = None,
    view: View = "PA",
    series_number: int = 1,
    instance_number: int = 1,
    bits_stored: int = 12,
    study_description: str = "XR CHEST",
    accession_number: str = "ACC0001",
    patient_id: str = "CXR0001",
    patient_name: str = "Müller^Jürgen",
    uid_seed: str = "dx-for-presentation",
) -> Dataset:
    """Digital X-Ray Image Storage - For Presentation (1.2.840.10008.5.1.4.1.1.1.1) of a chest.

    Fills every Type 1 and Type 2 attribute of each mandatory module of the DX Image IOD
    (PS3.3 A.26, Table A.26-1): Patient (C.7.1.1), General Study (C.7.2.1), General Series
    (C.7.3.1), DX Series (C.8.11.1; Modality DX, Presentation Intent Type FOR PRESENTATION),
    General Equipment (C.7.5.1), General Acquisition (C.7.10.1, Type 3 only), General Image
    (C.7.6.1), Image Pixel (C.7.6.3), DX Anatomy Imaged (C.8.11.2; Image Laterality U, the
    enumerated value for an unpaired structure such as the chest, and Anatomic Region Sequence
    SCT 816094009 "Chest" of PS3.16 CID 4009), DX Image (C.8.11.3; Image Type ORIGINAL\\PRIMARY,
    Pixel Intensity Relationship LOG with Sign -1 for MONOCHROME2, Rescale 0/1/US, Presentation
    LUT Shape IDENTITY, Lossy Image Compression 00, Burned In Annotation NO, Patient Orientation
    (Type 1C there)), DX Detector (C.8.11.4; Detector Type, Imager Pixel Spacing), VOI LUT
    (C.11.2; usage C in Table A.26-1, required For Presentation: Window Center/Width),
    Acquisition Context (C.7.6.14; Type 2 sequence, empty) and SOP Common (C.12.1; Specific
    Character Set ISO_IR 100, which the default names need).

    Also the user-optional Patient Study (C.7.2.2; Patient's Age "057Y"), DX Positioning
    (C.8.11.5; View Position, a CID 4010 View Code Sequence, Positioner Type (its one Type 2
    attribute) and the distances) and X-Ray Acquisition Dose (C.8.7.8; only Type 3 attributes:
    kVp, mA, ms, uAs and the IEC 62494-1 exposure index triple) modules with realistic values.

    Pixels: the NIH 1024x1024 radiograph rescaled to `bits_stored` (12 or 14) bits in 16
    allocated, MONOCHROME2. `view` "PA", "AP" or "LL" (left lateral) sets View Position, View
    Code Sequence, Patient Orientation and the technique; the pixels are the same frontal image
    (the repository has no lateral chest), so only the header says "lateral" for "LL".

    UIDs: the Study Instance UID is `study_instance_uid` or one derived from `uid_seed` and
    `view`; Series and SOP Instance UIDs are derived from the study UID, `uid_seed`, `view`,
    `series_number` and `instance_number`, so equal arguments give the same instance and a
    different `uid_seed` (or number) gives a different one in the same study.
    """
    if bits_stored not in (12, 14):
        raise ValueError("bits_stored must be 12 or 14")
    ds = _dx(
        kind=uid_seed, sop_class=DX_FOR_PRESENTATION, study_instance_uid=study_instance_uid,
        view=view, series_number=series_number, instance_number=instance_number,
        study_description=study_description, accession_number=accession_number, patient_id=patient_id,
        patient_name=patient_name,
    )
    ds.PresentationIntentType = "FOR PRESENTATION"
    _pixels(ds, _rescale(_nih_pixels(), bits_stored), bits_stored, "MONOCHROME2")
    top = 1 << bits_stored
    # DX Image (PS3.3 C.8.11.3)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1  # MONOCHROME2: higher values = less X-ray intensity
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.AcquisitionDeviceProcessingDescription = "CHEST"
    # VOI LUT (PS3.3 C.11.2)
    ds.WindowCenter = top // 2
    ds.WindowWidth = top
    ds.WindowCenterWidthExplanation = "FULL RANGE"
    ds.VOILUTFunction = "LINEAR"
    return ds


def dx_for_processing(
    *,
    study_instance_uid: str | None = None,
    view: View = "PA",
    series_number: int = 1,
    instance_number: int = 1,
    bits_stored: int = 14,
    study_description: str = "XR CHEST",
    accession_number: str = "ACC0001",
    patient_id: str = "CXR0001",
    patient_name: str = "Müller^Jürgen",
) -> Dataset:
    """Digital X-Ray Image Storage - For Processing (1.2.840.10008.5.1.4.1.1.1.1.1) of a chest.

    The same modules as :func:`dx_for_presentation` (PS3.3 A.26, Table A.26-1), with DX Series
    (C.8.11.1) Presentation Intent Type FOR PROCESSING and no VOI LUT module (C.11.2 is required
    only for For Presentation). The pixels are the NIH radiograph inverted and rescaled to
    `bits_stored` bits, stored as raw-detector-like MONOCHROME1 (higher values = more X-ray
    intensity, so Pixel Intensity Relationship Sign +1 and Presentation LUT Shape INVERSE as
    C.8.11.3 requires for MONOCHROME1).
    """
    if bits_stored not in (12, 14):
        raise ValueError("bits_stored must be 12 or 14")
    ds = _dx(
        kind="dx-for-processing", sop_class=DX_FOR_PROCESSING, study_instance_uid=study_instance_uid,
        view=view, series_number=series_number, instance_number=instance_number,
        study_description=study_description, accession_number=accession_number, patient_id=patient_id,
        patient_name=patient_name,
    )
    ds.PresentationIntentType = "FOR PROCESSING"
    _pixels(ds, _rescale(255 - _nih_pixels(), bits_stored), bits_stored, "MONOCHROME1")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    return ds


def cr_with_projection(
    *,
    study_instance_uid: str | None = None,
    patient_orientation: tuple[str, str] = ("L", "F"),
    imager_pixel_spacing: tuple[float, float] = (0.168, 0.168),
) -> Dataset:
    """The Fuji CR chest PA (Computed Radiography Image Storage, 1.2.840.10008.5.1.4.1.1.1) with a projection.

    Adds Patient Orientation (0020,0020) "L\\F" (General Image, PS3.3 C.7.6.1, Type 2C: required
    for a CR image, which has no Image Orientation (Patient)) and Imager Pixel Spacing
    (0018,1164) "0.168\\0.168" (CR Image, PS3.3 C.8.1.2, Type 3), and new deterministic Study,
    Series and SOP Instance UIDs (the source repeats its Study UID as the Series UID).

    Everything else is the source file's, except what the CR Image IOD (PS3.3 A.2, Table A.2-1)
    needs to verify without errors:

    * the ACR-NEMA dates and times (``1995.07.20``, ``11:22:07``) rewritten in the DA/TM form of
      PS3.5 6.2, and Image Type ``ORIGINAL PRIMARY`` split into the two values it means;
    * the Type 2 attributes the source lacks (Patient, C.7.1.1; General Study, C.7.2.1; General
      Series, C.7.3.1): Study Date/Time taken from the acquisition date/time, Patient ID, Study ID
      and Series Number given values (a DICOMDIR needs them), Birth Date, Sex and Referring
      Physician present and empty;
    * the retired group lengths and Border Density (2010,0100), a Basic Film Box attribute of
      print management that no image IOD contains, removed.

    The pixels (440x440, 10 of 16 bits, MONOCHROME1), window, View Position PA, Body Part CHEST
    and the Fuji plate attributes are unchanged.
    """
    ds = pydicom.dcmread(CR_SOURCE)
    for elem in list(ds):
        if elem.tag.element == 0:  # group lengths, retired (PS3.5 7.2)
            del ds[elem.tag]
    del ds[0x2010, 0x0100]

    study = study_instance_uid or uid("cr-with-projection", "study")
    series = uid(study, "cr-with-projection", "series")
    instance = uid(series, "instance")
    ds.file_meta = _file_meta(CR_IMAGE, instance, ExplicitVRLittleEndian)
    ds.SOPInstanceUID = instance
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series

    for keyword in ("InstanceCreationDate", "AcquisitionDate"):
        setattr(ds, keyword, str(ds[keyword].value).replace(".", ""))
    for keyword in ("InstanceCreationTime", "AcquisitionTime"):
        setattr(ds, keyword, str(ds[keyword].value).replace(":", ""))
    ds.ImageType = str(ds.ImageType).split()

    ds.PatientName = f"{ds.PatientName}^"  # "Anonymized^": same name, not the one-component form dciodvfy flags
    ds.PatientID = "CR0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ds.AcquisitionDate
    ds.StudyTime = ds.AcquisitionTime
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1

    ds.PatientOrientation = list(patient_orientation)
    ds.ImagerPixelSpacing = [float(v) for v in imager_pixel_spacing]
    return ds


#: PS3.5 Annex H (Japanese, ISO 2022 IR 87) and Annex I (Korean, ISO 2022 IR 149) examples, plus
#: a referring physician and study description in the same repertoires.
CHARACTER_SETS = {
    "IR 87": {
        "SpecificCharacterSet": ["", "ISO 2022 IR 87"],
        "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "ReferringPhysicianName": "Sato^Hanako=佐藤^花子=さとう^はなこ",
        "StudyDescription": "胸部単純撮影",
    },
    "IR 149": {
        "SpecificCharacterSet": ["", "ISO 2022 IR 149"],
        "PatientName": "Hong^Gildong=洪^吉洞=홍^길동",
        "ReferringPhysicianName": "Kim^Minsu=金^民洙=김^민수",
        "StudyDescription": "흉부 단순촬영",
    },
}

_TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "UC", "PN"}


def with_character_set(ds: Dataset, which: Literal["IR 87", "IR 149"]) -> Dataset:
    """A copy of `ds` re-labelled with an ISO 2022 Specific Character Set (SOP Common, PS3.3 C.12.1.1.2).

    ``"IR 87"``: ``\\ISO 2022 IR 87`` (ASCII plus JIS X 0208 kanji and kana) with the Patient's
    Name of PS3.5 Annex H (H.3.1); ``"IR 149"``: ``\\ISO 2022 IR 149`` (ASCII plus KS X 1001) with
    the Patient's Name of PS3.5 Annex I (I.2). Referring Physician's Name and Study Description
    get text in the same repertoire. Any other text of `ds` must be ASCII (the first, empty value
    means the default repertoire, PS3.5 6.1.2.5.3), otherwise ValueError; so use it on the DX or
    CR fixtures, whose only non-ASCII values are the names replaced here.
    """
    if which not in CHARACTER_SETS:
        raise ValueError(f"which must be one of {sorted(CHARACTER_SETS)}, not {which!r}")
    values = CHARACTER_SETS[which]
    out = copy.deepcopy(ds)
    for keyword, value in values.items():
        setattr(out, keyword, value)
    for elem in out.iterall():
        if elem.VR in _TEXT_VRS and elem.keyword not in values and elem.value is not None:
            text = str(elem.value)
            if not text.isascii():
                raise ValueError(f"{elem.keyword} is not ASCII ({text!r}); it cannot be kept under {which}")
    return out


def pa_lateral_study(*, study_instance_uid: str | None = None) -> list[Dataset]:
    """A PA and a left lateral DX For Presentation (PS3.3 A.26) of one study.

    Same Study Instance UID, Accession Number and Study Description (General Study, C.7.2.1);
    different Series Instance UID and Series Number (General Series, C.7.3.1), SOP Instance UID
    (C.12.1) and Instance Number (General Image, C.7.6.1). See :func:`dx_for_presentation`.
    """
    study = study_instance_uid or uid("pa-lateral-study", "study")
    common = dict(
        study_instance_uid=study, study_description="XR CHEST PA AND LATERAL", accession_number="ACC0002",
        uid_seed="pa-lateral-study",
    )
    return [
        dx_for_presentation(view="PA", series_number=1, instance_number=1, **common),
        dx_for_presentation(view="LL", series_number=2, instance_number=2, **common),
    ]


# --------------------------------------------------------------------------------------------------
# deliberately broken inputs


def truncated(ds: Dataset, keep_fraction: float = 0.5) -> Dataset:
    """A copy of `ds` whose native Pixel Data (Image Pixel, PS3.3 C.7.6.3) is cut to `keep_fraction`.

    The kept length is rounded down to an even number of bytes (PS3.5 7.1.1), so the file stays
    parseable: only the value is shorter than Rows x Columns x Samples x Bits Allocated / 8.
    """
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        raise ValueError("truncated() cuts native Pixel Data; this dataset is encapsulated")
    if not 0 <= keep_fraction < 1:
        raise ValueError("keep_fraction must be in [0, 1)")
    out = copy.deepcopy(ds)
    data = bytes(ds.PixelData)
    out.PixelData = data[: int(len(data) * keep_fraction) & ~1]
    return out


def _resized(rows: int, columns: int | None = None) -> np.ndarray:
    """The NIH radiograph resampled (Lanczos) to rows x columns (square if columns is None), uint8."""
    from PIL import Image

    columns = rows if columns is None else columns
    image = Image.fromarray(np.asarray(_nih_pixels()), mode="L")
    if (columns, rows) != image.size:
        image = image.resize((columns, rows), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def _jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    """Baseline (SOF0) 8-bit greyscale JPEG of `array`, by Pillow/libjpeg."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode="L").save(buffer, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buffer.getvalue()


def _sof_offset(jpeg: bytes) -> int:
    """Offset of the first SOFn marker (FFC0-FFCF except C4, C8, CC) in a JPEG (ISO/IEC 10918-1 B.2)."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no SOI)")
    pos = 2
    while pos + 4 <= len(jpeg):
        if jpeg[pos] != 0xFF:
            raise ValueError(f"no marker at offset {pos}")
        marker = jpeg[pos + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return pos
        pos += 2 + int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
    raise ValueError("no SOF marker")


def _encapsulated_dx(
    *, kind: str, frame: bytes, frame_pixels: int, rows: int, columns: int, transfer_syntax: str,
    study_instance_uid: str | None, lossy: bool,
) -> Dataset:
    """An 8-bit DX For Presentation (PS3.3 A.26) header around one encapsulated frame (PS3.5 A.4)."""
    ds = _dx(
        kind=kind, sop_class=DX_FOR_PRESENTATION, study_instance_uid=study_instance_uid, view="PA",
        series_number=1, instance_number=1, study_description="XR CHEST", accession_number="ACC0001",
        patient_id="CXR0001", patient_name="Müller^Jürgen",
    )
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.WindowCenter = 128
    ds.WindowWidth = 256
    if lossy:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = f"{frame_pixels / len(frame):.2f}"  # of the frame actually coded
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    else:
        ds.LossyImageCompression = "00"
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def jpeg_frame_larger_than_header(
    *, rows: int = 512, columns: int = 512, real_size: int = 2048, quality: int = 90,
    study_instance_uid: str | None = None,
) -> Dataset:
    """JPEG Baseline (1.2.840.10008.1.2.4.50) DX whose one frame is larger than Rows/Columns say.

    Rows (0028,0010) and Columns (0028,0011) (Image Pixel, PS3.3 C.7.6.3) say `rows` x `columns`;
    the encapsulated frame (PS3.5 A.4) is a genuine `real_size` x `real_size` 8-bit greyscale
    JPEG (the NIH radiograph upscaled with Lanczos, Pillow quality `quality`), whose SOF0 says so.
    The header is otherwise an 8-bit DX For Presentation (PS3.3 A.26). A decoder that trusts the
    frame allocates real_size**2 bytes, one that trusts the header gets a size mismatch.
    """
    frame = _jpeg(_resized(real_size), quality)
    return _encapsulated_dx(
        kind="jpeg-frame-larger-than-header", frame=frame, frame_pixels=real_size * real_size,
        rows=rows, columns=columns, transfer_syntax=JPEGBaseline8Bit, study_instance_uid=study_instance_uid,
        lossy=True,
    )


def jpeg_frame_header_patched(
    *, rows: int = 512, columns: int = 512, claimed: int = 12000, quality: int = 90,
    study_instance_uid: str | None = None,
) -> Dataset:
    """JPEG Baseline DX whose frame's SOF0 claims `claimed` x `claimed` over real 512x512 data.

    A genuine `rows` x `columns` JPEG of the NIH radiograph whose SOF0 number-of-lines and
    samples-per-line fields (ISO/IEC 10918-1 B.2.2) are overwritten with `claimed`, while Rows
    and Columns (PS3.3 C.7.6.3) stay `rows` x `columns`: a decompression bomb by header (12000**2
    bytes = 144 MB) whose entropy-coded data is only a small picture.
    """
    if not 0 < claimed <= 0xFFFF:
        raise ValueError("claimed must fit the 16-bit SOF fields")
    frame = bytearray(_jpeg(_resized(rows, columns), quality))
    sof = _sof_offset(bytes(frame))
    frame[sof + 5 : sof + 7] = claimed.to_bytes(2, "big")  # Y, number of lines
    frame[sof + 7 : sof + 9] = claimed.to_bytes(2, "big")  # X, samples per line
    return _encapsulated_dx(
        kind="jpeg-frame-header-patched", frame=bytes(frame), frame_pixels=rows * columns,
        rows=rows, columns=columns, transfer_syntax=JPEGBaseline8Bit, study_instance_uid=study_instance_uid,
        lossy=True,
    )


def j2k_frame_larger_than_header(
    *, rows: int = 512, columns: int = 512, real_size: int = 2048, study_instance_uid: str | None = None,
) -> Dataset:
    """JPEG 2000 Lossless (1.2.840.10008.1.2.4.90) DX whose frame is larger than Rows/Columns say.

    The frame is a raw J2K codestream (PS3.5 A.4.4: no JP2 box) encoded losslessly by OpenJPEG
    (pylibjpeg-openjpeg ``openjpeg.encode``) from the NIH radiograph upscaled to `real_size`,
    so its SIZ marker (ISO/IEC 15444-1 A.5.1) says Xsiz = Ysiz = `real_size`, while Rows and
    Columns (PS3.3 C.7.6.3) say `rows` x `columns`.
    """
    from openjpeg import encode

    frame = encode(_resized(real_size), bits_stored=8, photometric_interpretation=2, codec_format=0)
    return _encapsulated_dx(
        kind="j2k-frame-larger-than-header", frame=frame, frame_pixels=real_size * real_size,
        rows=rows, columns=columns, transfer_syntax=JPEG2000Lossless, study_instance_uid=study_instance_uid,
        lossy=False,
    )
