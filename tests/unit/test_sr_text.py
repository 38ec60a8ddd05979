"""dicom_io.sr_text: a structured report's content tree in words, checked against dcmtk's dsrdump."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from dicom_io.sr import build_sr
from dicom_io.sr_text import as_text, read_sr
from tests.conftest import need
from tests.unit.test_results import DEMO, NIH, _result


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    source = pydicom.dcmread(NIH)
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    build_sr([source], [_result(source, positives=("Cardiomegaly", "Effusion"))], DEMO).save_as(
        path, enforce_file_format=True)
    return path


def _walk(item):
    yield item
    for child in item.children:
        yield from _walk(child)


def test_every_content_item_that_dsrdump_shows_is_in_the_tree(report):
    need(shutil.which("dsrdump") is not None, "dcmtk's dsrdump is not installed")
    dump = subprocess.run(["dsrdump", "+Pl", str(report)], capture_output=True, text=True, timeout=60).stdout
    document = read_sr(pydicom.dcmread(report))
    items = list(_walk(document.root))
    # dsrdump prints one "<...>" line per content item, the root included.
    assert len(items) == len(re.findall(r"^\s*<", dump, flags=re.M))
    for name in set(re.findall(r'\(\S*?,\S*?,"([^"]+)"\)=', dump)):
        assert any(item.name == name for item in items), name
    probabilities = [item for item in items if item.value_type == "NUM" and item.name == "Probability"]
    assert len(probabilities) == 14
    in_dump = sorted(float(v) for v in re.findall(r'"Probability"\)="([0-9.]+)"', dump))
    assert sorted(float(item.value.split()[0]) for item in probabilities) == pytest.approx(in_dump)
    assert document.title == "Imaging Measurement Report" and document.verification_flag == "UNVERIFIED"


def test_the_text_is_one_indented_line_per_item_with_values_in_words(report):
    document = read_sr(pydicom.dcmread(report))
    text = as_text(document)
    lines = text.splitlines()
    assert lines[0] == "Imaging Measurement Report" and "Verification: UNVERIFIED" in lines[1]
    assert len(lines) == 3 + len(list(_walk(document.root)))
    assert "  HAS CONCEPT MOD: CODE Procedure reported = XR Chest Views (30745-4, LN)" in lines
    assert any(line.strip() == "CONTAINS: CODE Cardiomegaly = Present (52101004, SCT)" for line in lines)
    assert any(line.strip().startswith("CONTAINS: IMAGE Source of Measurement = SOP Instance ") for line in lines)
    assert "NOT FOR DIAGNOSTIC USE" in text and "DEMO WEIGHTS" in text


def test_a_dataset_that_is_no_report_is_refused():
    with pytest.raises(ValueError, match="not a structured report"):
        read_sr(pydicom.dcmread(NIH))
