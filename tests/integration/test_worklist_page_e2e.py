"""The radiologist's page on the running service: `cxr-triage serve` with Orthanc as the PACS, studies
sent by dcmtk's storescu, the page driven in Debian's Chromium by Playwright.

Sign in with a key made by `cxr-triage user add`, see the studies in the API's priority order, open
the top one, see its radiograph and heatmaps load, follow the link to the study in the PACS (Orthanc's
DICOMweb stands in for the hospital viewer), and leave screenshots as artifacts.
"""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest

from tests.browser import Page, accessibility_problems, browser  # noqa: F401 - the fixture
from tests.conftest import DATA, http_json, need, storescu, wait_until
from tests.integration.test_end_to_end import SETTLED, TriageService, _uid, assert_no_names_or_birth_dates_in

pytestmark = pytest.mark.e2e

STUDIES = [DATA / "cxr_dicom" / "cr_chest_pa_mono1_10bit_explicit_le.dcm",
           DATA / "cxr_dicom" / "nih_00000001_000_cardiomegaly.dcm",
           DATA / "not_cxr_dicom" / "bad_header_modality_ct.dcm"]


def test_a_radiologist_works_the_worklist_in_a_browser(browser, orthanc, tmp_path):  # noqa: F811
    need(shutil.which("storescu") is not None, "dcmtk is not installed (apt-get install dcmtk)")
    service = TriageService(tmp_path, {
        "CXR_TRIAGE_EXPORT_DESTINATIONS": f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}",
        "CXR_TRIAGE_WORKER_CONCURRENCY": "1",
        "CXR_TRIAGE_WORKLIST_REFRESH_SECONDS": "2",
        "CXR_TRIAGE_VIEWER_URL_TEMPLATE": f"{orthanc.url}/dicom-web/studies/{{study_instance_uid}}/series",
    }).start()
    tab = None
    try:
        for path in STUDIES:
            # The hospital's PACS holds the radiograph and routes it to us, as in a deployment.
            assert storescu(orthanc.dicom_port, orthanc.ae_title, path).returncode == 0
            sent = service.send(path)
            assert sent.returncode == 0, sent.stderr
        uids = [_uid(path, "StudyInstanceUID") for path in STUDIES]
        for uid in uids:
            service.wait_settled(uid)

        tab = Page(browser, service.api + "/")
        tab.sign_in_with_key(service.api_key)
        page = tab.page
        worklist = http_json(f"{service.api}/worklist?read=false", headers=service.headers)
        expected = [item["study_instance_uid"] for item in worklist["data"]]
        assert sorted(expected) == sorted(uids) and all(i["status"] in SETTLED for i in worklist["data"])
        wait_until(lambda: tab.row_uids() == expected, 10, what="the page to show the API's order")
        levels = [item["priority"]["level"] for item in worklist["data"]]
        assert levels == sorted(levels, reverse=True)
        skipped = page.locator(f'tr[data-uid="{uids[2]}"]')
        assert skipped.locator(".status-SKIPPED").inner_text() == "Skipped"
        assert "modality CT" in skipped.locator(".reason").inner_text()
        assert page.locator("#demo-banner").is_visible()
        tab.screenshot(tmp_path, "e2e-worklist")

        # The top study: radiograph and heatmaps load, 14 findings, the SR as text.
        top = next(item for item in worklist["data"] if item["status"] == "DONE")
        page.locator(f'tr[data-uid="{top["study_instance_uid"]}"] a.open').click()
        page.locator("figure img[alt^='Heatmap of']").first.wait_for()
        wait_until(lambda: page.eval_on_selector_all(
            "figure img", "imgs => imgs.length > 1 && imgs.every(i => i.complete && i.naturalWidth > 0)"), 60,
            what="the radiograph and its heatmaps to load")
        assert page.locator("table:has(caption:text('All findings')) tbody tr").count() == 14
        wait_until(lambda: "NUM Probability = " in page.locator(".sr-text").inner_text(), 20, what="the SR text")

        # Export status per destination, and the link into the PACS once the results are there.
        def exported():
            exports = http_json(f"{service.api}/studies/{top['study_instance_uid']}", headers=service.headers)["exports"]
            return exports and all(e["status"] == "EXPORTED" for e in exports)

        wait_until(exported, 120, what="export to Orthanc")
        page.reload()
        page.locator("#study-title").wait_for()
        exports = page.locator("table:has(caption:text('Export status')) tbody").inner_text()
        assert orthanc.ae_title in exports and "Sent" in exports
        link = page.locator("#viewer-link")
        href = link.get_attribute("href")
        assert href == f"{orthanc.url}/dicom-web/studies/{top['study_instance_uid']}/series"
        with urllib.request.urlopen(href, timeout=10) as response:
            series = json.load(response)
        modalities = {s["00080060"]["Value"][0] for s in series}
        assert {"SR", "OT"} <= modalities and modalities & {"CR", "DX"}, modalities  # radiograph, SR, heatmaps
        unlabelled, low, _ = accessibility_problems(page)
        assert not unlabelled and not low, (unlabelled, low)
        tab.screenshot(tmp_path, "e2e-study")
        assert not tab.foreign_requests(), tab.foreign_requests()
        assert not tab.errors, tab.errors
    finally:
        if tab is not None:
            tab.close()
        returncode = service.stop()
    assert returncode == 0, service.log_text()[-4000:]
    assert_no_names_or_birth_dates_in(service.log_text(), service.sent)
