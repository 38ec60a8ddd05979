"""tests/dicom_fixtures.py: the fixtures are what they claim to be.

* Conformance: every conformant fixture (DX For Presentation PA, AP, left lateral and 14-bit;
  DX For Processing; the CR with projection; the DX and the CR under ISO 2022 IR 87 and IR 149;
  both images of the PA + lateral study) is written to disk and verified by dicom3tools'
  ``dciodvfy``, which must report zero "Error" lines and no warning outside ACCEPTED_WARNINGS.

  Warnings that remain with dicom3tools 1.00~20220618 (Debian 12): none. Warnings met while
  building the fixtures, and how they were fixed rather than accepted:

  - "Value is zero for value 1 of attribute <Deviation Index>": a Deviation Index of exactly 0
    looks like a default; the fixtures state EI 450 against a target of 400, so DI 0.5.
  - CR only, from the source file: "Retired Person Name form" for the one-component
    "Anonymized" (written "Anonymized^" now, the same name), "Retired attribute ... Group Length"
    (group lengths dropped), "Attribute is not present in standard DICOM IOD - (0x2010,0x0100)
    Border Density" and the "Standard Extended SOP Class" that follows it (a Basic Film Box
    attribute, dropped), "Missing attribute or value that would be needed to build DICOMDIR" for
    Patient ID, Study Date/Time, Study ID and Series Number (now given values).

  This dciodvfy does not check coded values against context groups (it accepts any SCT code),
  so test_codes_come_from_their_context_groups checks CID 4009 and CID 4010 against pydicom's
  copy of PS3.16.

* The deliberately broken inputs: their headers still verify (the JPEG/J2K ones without error,
  the truncated one with only the Pixel Data length error), the JPEG SOF0 and J2K SIZ markers,
  parsed here byte by byte, say the stated sizes, and the truncated Pixel Data is short.

* ISO 2022 names round-trip through a file as the exact byte sequences printed in PS3.5 H.3.1
  and I.2, and dcmtk's dcmdump shows them: converted to UTF-8 by ``dcmdump +U8`` where dcmtk's
  character set library can (IR 149 with Debian's glibc iconv build), else, as for IR 87 there
  ("not supported by the utilized character set conversion library"), as the stored bytes.

ACCEPTED_WARNINGS is strict on purpose: a new dciodvfy warning fails the test until the fixture
is fixed or the warning is added there with its reason.

* Determinism: two calls, and a second interpreter, give byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames
from pydicom.sr._cid_dict import cid_concepts
from pydicom.sr.codedict import codes

from tests import dicom_fixtures as fx
from tests.conftest import need

REPO = Path(__file__).resolve().parents[2]

CONFORMANT = {
    "dx_presentation_pa": lambda: fx.dx_for_presentation(view="PA"),
    "dx_presentation_ap": lambda: fx.dx_for_presentation(view="AP"),
    "dx_presentation_ll": lambda: fx.dx_for_presentation(view="LL"),
    "dx_presentation_pa_14bit": lambda: fx.dx_for_presentation(view="PA", bits_stored=14),
    "dx_processing": lambda: fx.dx_for_processing(),
    "cr_with_projection": lambda: fx.cr_with_projection(),
    "dx_ir87": lambda: fx.with_character_set(fx.dx_for_presentation(), "IR 87"),
    "dx_ir149": lambda: fx.with_character_set(fx.dx_for_presentation(), "IR 149"),
    "cr_ir87": lambda: fx.with_character_set(fx.cr_with_projection(), "IR 87"),
    "cr_ir149": lambda: fx.with_character_set(fx.cr_with_projection(), "IR 149"),
    "study_pa": lambda: fx.pa_lateral_study()[0],
    "study_ll": lambda: fx.pa_lateral_study()[1],
}

#: The IOD each conformant fixture must be recognised as.
EXPECTED_IOD = {
    name: ("CRImage" if name.startswith("cr") else "DXImageForProcessing" if name == "dx_processing"
           else "DXImageForPresentation")
    for name in CONFORMANT
}

#: dciodvfy warnings accepted per fixture, each with its reason. None at present (see the docstring).
ACCEPTED_WARNINGS: dict[str, set[str]] = {}

BROKEN = {
    "truncated_dx": lambda: fx.truncated(fx.dx_for_presentation()),
    "truncated_cr": lambda: fx.truncated(fx.cr_with_projection(), keep_fraction=0.3),
    "jpeg_frame_larger_than_header": lambda: fx.jpeg_frame_larger_than_header(),
    "jpeg_frame_header_patched": lambda: fx.jpeg_frame_header_patched(),
    "j2k_frame_larger_than_header": lambda: fx.j2k_frame_larger_than_header(),
}

#: PS3.5 H.3.1 and I.2: the encoded Patient's Name of the two examples, byte for byte.
PS35_ENCODED_NAMES = {
    "IR 87": (
        b"Yamada^Tarou="
        b"\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B="
        b"\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B"
    ),
    "IR 149": (
        b"Hong^Gildong="
        b"\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7="
        b"\x1b$)C\xc8\xab^\x1b$)C\xb1\xe6\xb5\xbf"
    ),
}


def _dciodvfy(path: Path) -> tuple[str, list[str], list[str]]:
    """Run dciodvfy on `path`: (whole output, Error lines, Warning lines)."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, timeout=120)
    output = (result.stdout + result.stderr).decode("utf-8", errors="replace")
    lines = output.splitlines()
    return output, [line for line in lines if line.startswith("Error")], [
        line for line in lines if line.startswith("Warning")
    ]


def _need_dciodvfy() -> None:
    need(shutil.which("dciodvfy") is not None, "dicom3tools' dciodvfy is not installed (apt-get install dicom3tools)")


def _need_dcmdump() -> None:
    need(shutil.which("dcmdump") is not None, "dcmtk's dcmdump is not installed (apt-get install dcmtk)")


def _one_frame(ds: pydicom.Dataset) -> bytes:
    frames = list(generate_frames(ds.PixelData, number_of_frames=1))
    assert len(frames) == 1
    return frames[0]


def _jpeg_sof(frame: bytes) -> dict:
    """Walk the JPEG marker segments from SOI to the first SOFn and decode it (ISO/IEC 10918-1 B.2.2)."""
    assert frame[:2] == b"\xff\xd8", "no SOI"
    pos = 2
    while True:
        assert frame[pos] == 0xFF, f"no marker at {pos}"
        marker = frame[pos + 1]
        length = int.from_bytes(frame[pos + 2 : pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            body = frame[pos + 4 : pos + 2 + length]
            return {
                "marker": marker,
                "precision": body[0],
                "lines": int.from_bytes(body[1:3], "big"),
                "samples_per_line": int.from_bytes(body[3:5], "big"),
                "components": body[5],
                "offset": pos,
            }
        assert marker not in (0xD9, 0xDA), "reached SOS/EOI before any SOF"
        pos += 2 + length


def _j2k_siz(frame: bytes) -> dict:
    """Decode the SIZ marker segment that must follow SOC in a J2K codestream (ISO/IEC 15444-1 A.5.1)."""
    assert frame[:2] == b"\xff\x4f", "no SOC (a JP2 box instead of a raw codestream?)"
    assert frame[2:4] == b"\xff\x51", "SIZ does not follow SOC"
    be = lambda a, b: int.from_bytes(frame[a:b], "big")  # noqa: E731
    xsiz, ysiz, xosiz, yosiz = be(8, 12), be(12, 16), be(16, 20), be(20, 24)
    # then XTsiz, YTsiz, XTOsiz, YTOsiz (4 bytes each), Csiz (2), and Ssiz, XRsiz, YRsiz per component
    return {
        "width": xsiz - xosiz,
        "height": ysiz - yosiz,
        "components": be(40, 42),
        "ssiz": frame[42],  # bit depth - 1; high bit set = signed
    }


# --------------------------------------------------------------------------------------------------
# conformance


@pytest.mark.parametrize("name", sorted(CONFORMANT))
def test_conformant_fixture_passes_dciodvfy(name: str, tmp_path: Path) -> None:
    _need_dciodvfy()
    path = fx.write(CONFORMANT[name](), tmp_path / f"{name}.dcm")
    output, errors, warnings = _dciodvfy(path)
    print(f"dciodvfy {name}:\n{output}")
    assert EXPECTED_IOD[name] in output.split()
    assert errors == [], output
    assert set(warnings) <= ACCEPTED_WARNINGS.get(name, set()), output


@pytest.mark.parametrize("name", ["jpeg_frame_larger_than_header", "jpeg_frame_header_patched",
                                  "j2k_frame_larger_than_header"])
def test_compressed_broken_fixtures_have_conformant_headers(name: str, tmp_path: Path) -> None:
    """Only the frame disagrees with the header: the DX header itself verifies."""
    _need_dciodvfy()
    path = fx.write(BROKEN[name](), tmp_path / f"{name}.dcm")
    output, errors, warnings = _dciodvfy(path)
    print(f"dciodvfy {name}:\n{output}")
    assert "DXImageForPresentation" in output.split()
    assert errors == [], output
    assert warnings == [], output


@pytest.mark.parametrize("name", ["truncated_dx", "truncated_cr"])
def test_truncated_fixture_has_only_the_pixel_data_length_error(name: str, tmp_path: Path) -> None:
    _need_dciodvfy()
    ds = BROKEN[name]()
    path = fx.write(ds, tmp_path / f"{name}.dcm")
    output, errors, warnings = _dciodvfy(path)
    print(f"dciodvfy {name}:\n{output}")
    expected = ds.Rows * ds.Columns * ds.BitsAllocated // 8
    assert errors == [
        f"Error - PixelData has incorrect value length - expected {expected} dec - got {len(ds.PixelData)} dec"
    ], output
    assert warnings == [], output


#: PS3.3 Type 1 (must have a value) and Type 2 (must be present) attributes of the mandatory DX
#: modules, checked without dciodvfy so that they hold where dicom3tools is missing.
DX_TYPE_1 = [
    "SOPClassUID", "SOPInstanceUID", "SpecificCharacterSet", "StudyInstanceUID", "Modality", "SeriesInstanceUID",
    "PresentationIntentType", "ImageType", "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PixelData", "PixelIntensityRelationship",
    "PixelIntensityRelationshipSign", "RescaleIntercept", "RescaleSlope", "RescaleType", "PresentationLUTShape",
    "LossyImageCompression", "BurnedInAnnotation", "PatientOrientation", "ImageLaterality", "AnatomicRegionSequence",
    "ImagerPixelSpacing",
]
DX_TYPE_2 = [
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "StudyID", "AccessionNumber", "SeriesNumber", "Manufacturer", "InstanceNumber", "DetectorType", "PositionerType",
    "AcquisitionContextSequence",
]


@pytest.mark.parametrize("name", [n for n in sorted(CONFORMANT) if not n.startswith("cr")])
def test_dx_fixture_has_every_type_1_and_2_attribute(name: str) -> None:
    ds = CONFORMANT[name]()
    for keyword in DX_TYPE_1:
        assert keyword in ds and ds[keyword].value not in (None, "", b""), keyword
    for keyword in DX_TYPE_2:
        assert keyword in ds, keyword
    presentation = ds.PresentationIntentType == "FOR PRESENTATION"
    assert ds.SOPClassUID == (fx.DX_FOR_PRESENTATION if presentation else fx.DX_FOR_PROCESSING)
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ("WindowCenter" in ds and "WindowWidth" in ds) == presentation
    assert ds.Modality == "DX" and ds.BodyPartExamined == "CHEST" and ds.ImageLaterality == "U"
    assert ds.PatientAge == "057Y" and ds.AcquisitionContextSequence == []
    shape_for = {"MONOCHROME2": "IDENTITY", "MONOCHROME1": "INVERSE"}
    assert ds.PresentationLUTShape == shape_for[ds.PhotometricInterpretation]


def test_codes_come_from_their_context_groups() -> None:
    """CID 4009 DX Anatomy Imaged and CID 4010 DX View, as pydicom transcribes PS3.16."""
    by_value = lambda cid: {getattr(codes.SCT, k).value: getattr(codes.SCT, k).meaning  # noqa: E731
                            for k in cid_concepts[cid]["SCT"]}
    value, scheme, meaning = fx.CHEST
    assert scheme == "SCT" and by_value(4009)[value] == meaning
    for view, (value, scheme, meaning) in fx.VIEW_CODES.items():
        assert scheme == "SCT" and by_value(4010)[value] == meaning, view
    assert fx.VIEW_CODES["PA"][2] == "postero-anterior"
    assert fx.VIEW_CODES["AP"][2] == "antero-posterior"
    assert fx.VIEW_CODES["LL"][2] == "left lateral"


@pytest.mark.parametrize("view, orientation", [("PA", ["L", "F"]), ("AP", ["L", "F"]), ("LL", ["P", "F"])])
def test_view_sets_position_code_and_orientation(view: str, orientation: list[str]) -> None:
    ds = fx.dx_for_presentation(view=view)
    assert ds.ViewPosition == view
    assert list(ds.PatientOrientation) == orientation
    item = ds.ViewCodeSequence[0]
    assert (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) == fx.VIEW_CODES[view]
    anatomy = ds.AnatomicRegionSequence[0]
    assert (anatomy.CodeValue, anatomy.CodingSchemeDesignator, anatomy.CodeMeaning) == fx.CHEST


def test_dx_pixels_are_the_nih_radiograph_rescaled() -> None:
    nih = pydicom.dcmread(fx.NIH_SOURCE).pixel_array.astype(np.int64)
    for bits in (12, 14):
        ds = fx.dx_for_presentation(bits_stored=bits)
        array = ds.pixel_array
        assert array.shape == (1024, 1024) and array.dtype == np.uint16
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, bits, bits - 1)
        assert array.max() == (1 << bits) - 1 and array.min() == 0
        assert np.array_equal(array, (nih * ((1 << bits) - 1) + 127) // 255)
    processing = fx.dx_for_processing()
    assert processing.PhotometricInterpretation == "MONOCHROME1"
    assert processing.PixelIntensityRelationshipSign == 1
    assert np.array_equal(processing.pixel_array, ((255 - nih) * 16383 + 127) // 255)


def test_cr_with_projection_adds_orientation_and_spacing_and_keeps_the_rest() -> None:
    source = pydicom.dcmread(fx.CR_SOURCE)
    ds = fx.cr_with_projection()
    assert list(ds.PatientOrientation) == ["L", "F"]
    assert [float(v) for v in ds.ImagerPixelSpacing] == [0.168, 0.168]
    assert ds.PixelData == source.PixelData
    assert ds.SOPClassUID == fx.CR_IMAGE and ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    new_uids = {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    assert len(new_uids) == 3 and not new_uids & {source.StudyInstanceUID, source.SOPInstanceUID}
    changed = {
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstanceCreationDate", "InstanceCreationTime",
        "AcquisitionDate", "AcquisitionTime", "ImageType", "PatientName",
    }
    for elem in source:
        if elem.tag.element == 0 or elem.tag == 0x20100100 or elem.keyword in changed:
            continue
        assert ds[elem.tag].value == elem.value, elem.keyword
    assert "BorderDensity" not in ds and not [e for e in ds if e.tag.element == 0]
    assert (ds.AcquisitionDate, ds.AcquisitionTime) == ("19930224", "175800")
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY"] and str(ds.PatientName) == "Anonymized^"


# --------------------------------------------------------------------------------------------------
# character sets


@pytest.mark.parametrize("which", ["IR 87", "IR 149"])
def test_iso_2022_names_round_trip(which: str, tmp_path: Path) -> None:
    values = fx.CHARACTER_SETS[which]
    path = fx.write(fx.with_character_set(fx.dx_for_presentation(), which), tmp_path / "cs.dcm")
    raw = pydicom.dcmread(path)
    assert raw.get_item("PatientName").value == PS35_ENCODED_NAMES[which]
    ds = pydicom.dcmread(path)
    assert list(ds.SpecificCharacterSet) == values["SpecificCharacterSet"]
    for keyword in ("PatientName", "ReferringPhysicianName", "StudyDescription"):
        assert str(ds[keyword].value) == values[keyword], keyword
    alphabetic, ideographic, phonetic = values["PatientName"].split("=")
    assert (ds.PatientName.alphabetic, ds.PatientName.ideographic, ds.PatientName.phonetic) == (
        alphabetic, ideographic, phonetic,
    )
    assert not str(ds.StudyDescription).isascii() and not ds.ReferringPhysicianName.ideographic.isascii()


@pytest.mark.parametrize("which", ["IR 87", "IR 149"])
def test_dcmdump_shows_the_iso_2022_names(which: str, tmp_path: Path) -> None:
    """dcmdump +U8 converts to UTF-8 where dcmtk's character set library knows the repertoire.

    dcmtk built on glibc iconv (Debian's) cannot convert ISO 2022 IR 87 and says so; then the
    plain dump must carry the PS3.5 byte sequence unchanged (dcmdump prints values as stored).
    """
    _need_dcmdump()
    values = fx.CHARACTER_SETS[which]
    path = fx.write(fx.with_character_set(fx.cr_with_projection(), which), tmp_path / "cs.dcm")
    converted = subprocess.run(["dcmdump", "+U8", str(path)], capture_output=True, timeout=60)
    text = converted.stdout.decode("utf-8", errors="replace")
    print(f"dcmdump +U8 ({which}), rc {converted.returncode}:\n{text}{converted.stderr.decode(errors='replace')}")
    if converted.returncode == 0:
        for keyword in ("PatientName", "ReferringPhysicianName", "StudyDescription"):
            assert f"[{values[keyword]}]" in text, keyword
        assert "ISO_IR 192" in text
    else:
        assert b"is not supported by the utilized character set conversion library" in converted.stderr
        plain = subprocess.run(["dcmdump", str(path)], capture_output=True, timeout=60, check=True).stdout
        assert b"[" + PS35_ENCODED_NAMES[which] + b"]" in plain
        assert b"ISO 2022 IR" in plain


def test_with_character_set_refuses_text_it_cannot_keep() -> None:
    ds = fx.cr_with_projection()
    ds.InstitutionName = "Klinik Köln"
    with pytest.raises(ValueError, match="InstitutionName"):
        fx.with_character_set(ds, "IR 87")
    with pytest.raises(ValueError):
        fx.with_character_set(fx.cr_with_projection(), "IR 100")


# --------------------------------------------------------------------------------------------------
# one study


def test_pa_lateral_study_is_one_study_of_two_series() -> None:
    pa, lateral = fx.pa_lateral_study()
    assert pa.StudyInstanceUID == lateral.StudyInstanceUID
    assert pa.AccessionNumber == lateral.AccessionNumber and pa.StudyDescription == lateral.StudyDescription
    assert pa.SeriesInstanceUID != lateral.SeriesInstanceUID
    assert pa.SOPInstanceUID != lateral.SOPInstanceUID
    assert pa.SeriesNumber != lateral.SeriesNumber and pa.InstanceNumber != lateral.InstanceNumber
    assert (pa.ViewPosition, lateral.ViewPosition) == ("PA", "LL")
    assert lateral.ViewCodeSequence[0].CodeMeaning == "left lateral"
    assert list(lateral.PatientOrientation) == ["P", "F"]
    assert {pa.SOPClassUID, lateral.SOPClassUID} == {fx.DX_FOR_PRESENTATION}


def test_callers_can_put_fixtures_in_one_study() -> None:
    study = fx.uid("some", "other", "study")
    made = [
        fx.dx_for_presentation(study_instance_uid=study),
        fx.dx_for_processing(study_instance_uid=study),
        fx.cr_with_projection(study_instance_uid=study),
        fx.jpeg_frame_larger_than_header(study_instance_uid=study),
        *fx.pa_lateral_study(study_instance_uid=study),
    ]
    assert {ds.StudyInstanceUID for ds in made} == {study}
    assert len({ds.SeriesInstanceUID for ds in made}) == len(made)
    assert len({ds.SOPInstanceUID for ds in made}) == len(made)
    assert fx.dx_for_presentation().SOPInstanceUID != made[0].SOPInstanceUID
    for value in (study, made[0].SOPInstanceUID, made[0].SeriesInstanceUID):
        assert value.startswith("2.25.") and len(value) <= 64
        assert pydicom.uid.UID(value).is_valid


# --------------------------------------------------------------------------------------------------
# broken inputs


@pytest.mark.parametrize("name", ["truncated_dx", "truncated_cr"])
def test_truncated_pixel_data_is_short_and_the_file_parses(name: str, tmp_path: Path) -> None:
    ds = BROKEN[name]()
    expected = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    assert 0 < len(ds.PixelData) < expected and len(ds.PixelData) % 2 == 0
    path = fx.write(ds, tmp_path / f"{name}.dcm")
    back = pydicom.dcmread(path)
    assert len(back.PixelData) == len(ds.PixelData) and back.Rows == ds.Rows
    with pytest.raises(ValueError):
        back.pixel_array  # noqa: B018
    if shutil.which("dcmdump"):
        subprocess.run(["dcmdump", "-q", str(path)], capture_output=True, timeout=60, check=True)


def test_truncated_leaves_its_input_alone_and_refuses_encapsulated_data() -> None:
    ds = fx.dx_for_presentation()
    before = bytes(ds.PixelData)
    fx.truncated(ds, keep_fraction=0.25)
    assert ds.PixelData == before
    with pytest.raises(ValueError):
        fx.truncated(fx.jpeg_frame_larger_than_header())


def test_jpeg_frame_larger_than_header() -> None:
    from PIL import Image

    ds = fx.jpeg_frame_larger_than_header()
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored) == (512, 512, 8, 8)
    frame = _one_frame(ds)
    sof = _jpeg_sof(frame)
    assert sof["marker"] == 0xC0  # baseline
    assert (sof["precision"], sof["components"]) == (8, 1)
    assert (sof["lines"], sof["samples_per_line"]) == (2048, 2048)
    with Image.open(io.BytesIO(frame)) as image:
        image.load()
        assert (image.mode, image.size) == ("L", (2048, 2048))


def test_jpeg_frame_header_patched() -> None:
    from PIL import Image

    ds = fx.jpeg_frame_header_patched()
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert (ds.Rows, ds.Columns) == (512, 512)
    frame = _one_frame(ds)
    sof = _jpeg_sof(frame)
    assert sof["marker"] == 0xC0 and (sof["precision"], sof["components"]) == (8, 1)
    assert (sof["lines"], sof["samples_per_line"]) == (12000, 12000)
    # Put 512 back into the SOF0: what is coded really is a 512x512 picture.
    restored = bytearray(frame)
    offset = sof["offset"]
    restored[offset + 5 : offset + 9] = (512).to_bytes(2, "big") * 2
    with Image.open(io.BytesIO(bytes(restored))) as image:
        image.load()
        assert (image.mode, image.size) == ("L", (512, 512))
        assert np.asarray(image).std() > 20  # a radiograph, not a blank


def test_j2k_frame_larger_than_header() -> None:
    from openjpeg import decode

    ds = fx.j2k_frame_larger_than_header()
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert (ds.Rows, ds.Columns) == (512, 512)
    frame = _one_frame(ds)
    siz = _j2k_siz(frame)
    assert (siz["width"], siz["height"], siz["components"], siz["ssiz"]) == (2048, 2048, 1, 7)
    assert decode(frame).shape == (2048, 2048)


# --------------------------------------------------------------------------------------------------
# determinism

ALL = {**CONFORMANT, **BROKEN}


def _bytes(ds: pydicom.Dataset, path: Path) -> bytes:
    return fx.write(ds, path).read_bytes()


@pytest.mark.parametrize("name", sorted(ALL))
def test_two_calls_give_byte_identical_files(name: str, tmp_path: Path) -> None:
    assert _bytes(ALL[name](), tmp_path / "a.dcm") == _bytes(ALL[name](), tmp_path / "b.dcm")


_DIGEST_SCRIPT = """
import hashlib, sys, tempfile
from pathlib import Path
from tests import dicom_fixtures as fx
from tests.unit.test_dicom_fixtures import ALL
with tempfile.TemporaryDirectory() as tmp:
    for name in sorted(ALL):
        data = fx.write(ALL[name](), Path(tmp) / "x.dcm").read_bytes()
        print(name, hashlib.sha256(data).hexdigest())
"""


def test_another_interpreter_gives_the_same_files(tmp_path: Path) -> None:
    """UIDs, dates and codecs depend on nothing of the process (hash seed, clock, random state)."""
    here = {
        name: hashlib.sha256(_bytes(ALL[name](), tmp_path / "x.dcm")).hexdigest() for name in sorted(ALL)
    }
    result = subprocess.run(
        [sys.executable, "-c", _DIGEST_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}, check=True,
    )
    there = dict(line.split() for line in result.stdout.splitlines())
    assert there == here
