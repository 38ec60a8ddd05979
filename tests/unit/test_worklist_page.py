"""The worklist page in a real browser (Debian's Chromium, Playwright) against the API under uvicorn.

The studies are real: radiographs from tests/data received by the node's ingest, analysed by the
worker's pipeline with the bundled demo model (SR, heatmaps, findings), a CT skipped as not a
chest radiograph, a chest study FAILED by a model directory that does not exist, an export to a
PACS that does not answer, and studies still awaiting analysis. Sign-in goes through an API key or
a real OpenID provider on loopback (authorization code with PKCE).
"""

from __future__ import annotations

import io
import json
import re
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from cxr_triage.runtime import load_model_for, upgrade_database
from dashboard_api.app import create_app
from dicom_node.ingest import IngestService
from dicom_node.readiness import mark_quiet_studies_ready
from tests.browser import ApiServer, Page, accessibility_problems, browser  # noqa: F401 - the fixture
from tests.conftest import DATA, free_port, wait_until
from tests.unit.test_auth import AUDIENCE, IdentityProvider
from triage_core.db import Database
from triage_core.models import Export, Study
from triage_core.settings import Settings
from triage_core.states import Role
from triage_core.users import create_user
from worker.export import export_once
from worker.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ANALYSED = [DATA / "cxr_dicom" / "nih_00000001_000_cardiomegaly.dcm", DATA / "cxr_dicom" / "nih_effusion_ap.dcm",
            DATA / "cxr_dicom" / "cr_chest_pa_mono1_10bit_explicit_le.dcm"]
NOT_CHEST = DATA / "not_cxr_dicom" / "bad_header_modality_ct.dcm"
BREAKS_THE_MODEL = DATA / "cxr_dicom" / "siim_chest_pa_jpeg_baseline_no_pneumothorax.dcm"
ROOT = "1.2.826.0.1.3680043.8.498.7702"
#: Made-up patients (the radiographs in tests/data are anonymised).
NAMES = ["Moreau^Camille", "Okafor^Chinedu", "Lindqvist^Astrid", "Tanaka^Hiro", "Rossi^Giulia", "Novak^Petra",
         "Haddad^Omar", "Byrne^Siobhan", "Kowalski^Marek", "Silva^Ana", "Nguyen^Linh", "Ferreira^Tiago",
         "Schmidt^Jonas", "Dubois^Claire", "Yilmaz^Emre", "Andersen^Freja", "Costa^Rafael"]
AWAITING = 12  # studies still awaiting analysis, so that the worklist has more than one page of 10


@dataclass
class Dataset:
    settings: Settings
    database: Database
    keys: dict[str, str]
    skipped: str = ""
    failed: str = ""
    analysed: list[str] = field(default_factory=list)


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _store(ingest: IngestService, ds: pydicom.Dataset, accession: str, name: str) -> str:
    """Receive a dataset as the node does, under a made-up accession number and patient name."""
    ds.AccessionNumber, ds.PatientName = accession, name
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    outcome = ingest.store(ds, buffer.getvalue(), calling_ae_title="MODALITY1",
                           transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID))
    assert outcome.status == 0x0000, outcome
    return str(ds.StudyInstanceUID)


def _receive_and_run(ingest: IngestService, database: Database, pipeline: Pipeline, path: Path, accession: str,
                     name: str) -> str:
    uid = _store(ingest, pydicom.dcmread(path), accession, name)
    (job_id,) = mark_quiet_studies_ready(database, 0, now=datetime.now(timezone.utc) + timedelta(seconds=1))
    pipeline.run_job(job_id)
    return uid


def _waited(database: Database, uid: str, minutes: float) -> None:
    """As if the study had arrived ``minutes`` ago (the policy's escalation counts from then)."""
    with database.session() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == uid))
        for column in ("received_at", "waiting_since", "last_instance_at"):
            setattr(study, column, getattr(study, column) - timedelta(minutes=minutes))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dataset:
    tmp = tmp_path_factory.mktemp("page")
    settings = Settings(data_dir=tmp / "var", model_runtime="torch", model_threads=1,
                        export_destinations=f"PACS@127.0.0.1:{free_port()}", worklist_refresh_seconds=2)
    upgrade_database(settings)
    database = Database(settings.database_url)
    ingest = IngestService(settings, database)
    pipeline = Pipeline(settings, database, lambda: load_model_for(settings))
    data = Dataset(settings, database, {})
    people = iter(NAMES)
    for n, (path, minutes) in enumerate(zip(ANALYSED, (7, 95, 260))):
        data.analysed.append(_receive_and_run(ingest, database, pipeline, path, f"ACC-{2410 + n}", next(people)))
        _waited(database, data.analysed[-1], minutes)
    data.skipped = _receive_and_run(ingest, database, pipeline, NOT_CHEST, "ACC-2420", next(people))
    _waited(database, data.skipped, 50)  # not analysed for more than 30 min: raised to urgent
    broken = Pipeline(settings, database, lambda: load_model_for(settings, path=tmp / "no-such-model"))
    data.failed = _receive_and_run(ingest, database, broken, BREAKS_THE_MODEL, "ACC-2421", next(people))
    _waited(database, data.failed, 12)
    with database.session() as session:
        export_ids = list(session.scalars(select(Export.id).order_by(Export.id)))
    export_once(settings, database, export_ids[0])  # the PACS does not answer: pending, with its error
    for n in range(AWAITING):  # more studies arrive; the worker has not got to them yet
        ds = pydicom.dcmread(ANALYSED[0])
        ds.StudyInstanceUID = f"{ROOT}.1{n:02d}"
        ds.SeriesInstanceUID = f"{ROOT}.1{n:02d}.1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ROOT}.1{n:02d}.1.1"
        uid = _store(ingest, ds, f"ACC-{2430 + n}", next(people))
        _waited(database, uid, {0: 25, 1: 300}.get(n, n * 0.4))  # two have waited beyond analysis
    with database.session() as session:
        for name, role in (("dr.house", Role.RADIOLOGIST), ("ann.audit", Role.AUDITOR)):
            data.keys[name] = create_user(session, name=name, role=role, actor="cli:test").key
    yield data
    database.dispose()


def _api_json(server: ApiServer, path: str, key: str):
    request = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


@pytest.fixture
def served(dataset):
    with ApiServer(create_app(dataset.settings, dataset.database)) as server:
        yield server


def test_sign_in_with_an_api_key_see_the_worklist_in_priority_order_and_open_a_study(browser, dataset, served,
                                                                                    tmp_path):
    tab = Page(browser, served.url)
    try:
        tab.sign_in_with_key(dataset.keys["dr.house"])
        page = tab.page
        expected = [item["study_instance_uid"] for item in
                    _api_json(served, "worklist?read=false&limit=25", dataset.keys["dr.house"])["data"]]
        assert tab.row_uids() == expected
        levels = page.eval_on_selector_all("#worklist-rows tr[data-uid] .badge[class*=level-]",
                                           "badges => badges.map(b => b.textContent)")
        order = ["Critical", "Urgent", "Not analysed", "Routine", "Minor", "Nothing flagged", "Awaiting analysis"]
        ranks = [order.index(level) if level != "Awaiting analysis" else order.index("Nothing flagged")
                 for level in levels]
        assert ranks == sorted(ranks), levels
        assert page.locator("#demo-banner").is_visible()  # the bundled demo weights say so
        assert "oidc" not in " ".join(tab.requests)
        assert page.locator("#session-user").inner_text() == "dr.house (radiologist)"

        # SKIPPED and FAILED: not analysed, with their reasons, distinct from "nothing flagged"; the skipped
        # study has waited 50 min, beyond not analysed's 30: age raised it to urgent.
        skipped = page.locator(f'tr[data-uid="{dataset.skipped}"]')
        assert skipped.locator(".badge.level-urgent").inner_text() == "Urgent"
        assert skipped.locator(".escalated").inner_text() == "raised by age"
        assert skipped.locator(".status-SKIPPED").inner_text() == "Skipped"
        assert skipped.get_by_text("not analysed", exact=True).count() == 1  # no findings: not "nothing flagged"
        assert "modality CT" in skipped.locator(".reason").inner_text()
        skipped.get_by_text("Why?").click()
        why = skipped.locator(".why p").inner_text()
        assert why.startswith("Not analysed (SKIPPED: ") and "Escalated by age to urgent at 30 min" in why, why
        failed = page.locator(f'tr[data-uid="{dataset.failed}"]')
        assert failed.locator(".badge.level-not_analysed").inner_text() == "Not analysed"
        assert failed.locator(".status-FAILED").inner_text() == "Failed"
        assert "ModelError" in failed.locator(".reason").inner_text()
        failed.get_by_text("Why?").click()
        assert "Not analysed (FAILED: ModelError" in failed.locator(".why p").inner_text()
        tab.screenshot(tmp_path, "worklist")

        # Open the study at the top that has heatmaps: radiograph, heatmaps, 14 findings, SR, exports.
        top = next(uid for uid in expected if uid in dataset.analysed)
        page.locator(f'tr[data-uid="{top}"] a.open').click()
        page.locator("#study-title").wait_for()
        heatmaps = page.locator("figure img[alt^='Heatmap of']")
        heatmaps.first.wait_for()
        wait_until(lambda: page.eval_on_selector_all("figure img", "imgs => imgs.every(i => i.complete && i.naturalWidth > 0)"),
                   30, 0.2, what="radiograph and heatmaps to load")
        widths = page.eval_on_selector_all("figure img", "imgs => imgs.map(i => [i.alt, i.naturalWidth])")
        assert widths and all(width > 0 for _, width in widths), widths
        assert any(alt.startswith("Radiograph") for alt, _ in widths)
        assert page.locator("table:has(caption:text('All findings')) tbody tr").count() == 14
        wait_until(lambda: "Imaging Measurement Report" in page.locator(".sr-text").inner_text(), 20,
                   what="the SR text")
        sr = page.locator(".sr-text").inner_text()
        assert "NUM Probability = " in sr and "Algorithm Name" in sr, sr[:2000]
        assert page.locator("#priority-explanation").inner_text().strip()
        assert "PACS@127.0.0.1" in page.locator("table:has(caption:text('Export status')) tbody").inner_text()
        assert page.locator("#viewer-link").count() == 0  # no viewer template configured
        tab.screenshot(tmp_path, "study")
        assert not tab.foreign_requests(), tab.foreign_requests()
        assert not tab.errors, tab.errors
    finally:
        tab.close()


def test_the_skipped_and_failed_study_views_say_why(browser, dataset, served, tmp_path):
    tab = Page(browser, served.url)
    try:
        tab.sign_in_with_key(dataset.keys["dr.house"])
        page = tab.page
        for uid, status, level, words in ((dataset.skipped, "Skipped", "urgent", "modality CT"),
                                          (dataset.failed, "Failed", "not_analysed", "no model_card.json")):
            page.goto(f"{served.url}#/study/{uid}")
            page.locator("#study-title").wait_for()
            explanation = page.locator("#priority-explanation").inner_text()
            assert explanation.startswith("Not analysed (") and words in explanation, explanation
            assert page.locator(f".study-head .badge.level-{level}").count() == 1
            assert page.locator(f".study-head .badge.status-{status.upper()}").inner_text() == status
            assert page.locator("figure img[alt^='Heatmap']").count() == 0
            wait_until(lambda: "No structured report" in page.locator(".sr-text").inner_text(), 10,
                       what="the SR panel")
            if status == "Skipped":  # no frontal chest image at all
                assert "No radiograph" in page.locator("#images-title + *").inner_text()
            else:  # its radiograph was eligible; the model never ran
                wait_until(lambda: page.eval_on_selector_all(
                    "figure img", "imgs => imgs.length == 1 && imgs[0].complete && imgs[0].naturalWidth > 0"), 20,
                    what="the failed study's radiograph")
            tab.screenshot(tmp_path, f"study-{status.lower()}")
        assert "no model_card.json" in page.locator("table:has(caption:text('Analysis jobs'))").inner_text()
        assert not tab.errors, tab.errors
    finally:
        tab.close()


def test_filters_paging_read_state_and_refreshing_on_its_own(browser, dataset, served):
    tab = Page(browser, served.url)
    key = dataset.keys["dr.house"]
    try:
        tab.sign_in_with_key(key)
        page = tab.page
        total = _api_json(served, "worklist?read=false", key)["count"]
        assert page.locator("#page-info").inner_text() == f"Studies 1-{min(total, 25)} of {total}"
        page.get_by_label("Per page").select_option("25")
        # Paging through 10 at a time gives the API's order, page by page.
        page.evaluate("document.getElementById('f-size').add(new Option('10', '10'))")  # after the default
        page.get_by_label("Per page").select_option("10")
        page.get_by_role("button", name="Apply filters").click()
        wait_until(lambda: len(tab.row_uids()) == 10, 10, what="a page of 10")
        first_page = tab.row_uids()
        page.get_by_role("button", name="Next page").click()
        wait_until(lambda: tab.row_uids() and tab.row_uids()[0] not in first_page, 10, what="page 2")
        expected = [i["study_instance_uid"] for i in _api_json(served, "worklist?read=false&limit=20", key)["data"]]
        assert first_page + tab.row_uids()[:10] == expected[:len(first_page) + len(tab.row_uids()[:10])]
        assert page.locator("#page-info").inner_text().startswith("Studies 11-")

        # Status and finding filters.
        page.get_by_label("Status").select_option("SKIPPED")
        page.get_by_role("button", name="Apply filters").click()
        wait_until(lambda: tab.row_uids() == [dataset.skipped], 10, what="only the skipped study")
        page.get_by_role("button", name="Clear").click()
        wait_until(lambda: len(tab.row_uids()) > 1, 10, what="the filters cleared")
        flagged = _api_json(served, f"studies/{dataset.analysed[0]}", key)["priority"]["flagged"]
        if flagged:
            name = flagged[0]["finding"]
            page.get_by_label("Flagged finding").fill(name)
            page.get_by_role("button", name="Apply filters").click()
            wanted = [i["study_instance_uid"] for i in
                      _api_json(served, f"worklist?read=false&finding={name}", key)["data"]]
            wait_until(lambda: tab.row_uids() == wanted, 10, what=f"studies with {name} flagged")
            page.get_by_role("button", name="Clear").click()
        # Received on a day long ago: nothing.
        page.get_by_label("Received to").fill("2001-01-01")
        page.get_by_role("button", name="Apply filters").click()
        wait_until(lambda: page.locator("#worklist-rows").inner_text().strip() == "No study matches.", 10,
                   what="an empty worklist")
        page.get_by_role("button", name="Clear").click()

        # Mark a study read: it leaves the waiting list, and shows among all studies as read.
        uid = dataset.analysed[1]
        page.goto(f"{served.url}#/study/{uid}")
        page.get_by_role("button", name="Mark as read").click()
        page.get_by_role("button", name="Mark as not read").wait_for()
        assert "Read by dr.house" in page.locator("#priority-explanation").inner_text()
        page.get_by_role("link", name="Back to the worklist").click()
        wait_until(lambda: tab.row_uids() and uid not in tab.row_uids(), 10, what="the read study to leave")
        page.get_by_label("Show").select_option("")
        page.get_by_role("button", name="Apply filters").click()
        wait_until(lambda: uid in tab.row_uids(), 10, what="the read study among all studies")
        assert "read" in page.locator(f'tr[data-uid="{uid}"]').get_attribute("class")
        page.goto(f"{served.url}#/study/{uid}")
        page.get_by_role("button", name="Mark as not read").click()
        page.get_by_role("button", name="Mark as read").wait_for()

        # The worklist reloads itself (every 2 s here): a study that arrives appears without a click.
        page.get_by_role("link", name="Back to the worklist").click()
        before = page.locator("#worklist-status").inner_text()
        with dataset.database.session() as session:
            study = session.scalar(select(Study).where(Study.study_instance_uid == dataset.skipped))
            arrived = Study(study_instance_uid=f"{dataset.skipped}.77", accession_number="NEW77", patient_id="P77",
                            patient_name="New^Arrival", status="FAILED", status_reason="worker lost 3 times",
                            received_at=datetime.now(timezone.utc), priority_level=3,
                            priority_detail={"analysis": "not_analysed", "status": "FAILED",
                                             "reason": "worker lost 3 times", "flagged": []})
            session.add(arrived)
        try:
            wait_until(lambda: f"{dataset.skipped}.77" in tab.row_uids(), 15, what="the page to refresh itself")
            assert page.locator("#worklist-status").inner_text() != before
        finally:
            with dataset.database.session() as session:
                session.delete(session.scalar(select(Study).where(Study.study_instance_uid == f"{dataset.skipped}.77")))
        assert not tab.errors, tab.errors
    finally:
        tab.close()


def test_accessibility_labels_contrast_and_keyboard(browser, dataset, served):
    tab = Page(browser, served.url)
    try:
        page = tab.page
        page.goto(served.url)
        page.get_by_label("API key").wait_for()
        # The first stop is a link past the header to the content.
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Skip to content"
        page.keyboard.press("Enter")
        assert page.evaluate("document.activeElement.id") == "main"
        unlabelled, low, checked = accessibility_problems(page)
        assert not unlabelled and not low and checked > 5, (unlabelled, low)
        # Keyboard only: type the key, submit with Enter, Tab to the first worklist row, open it with Enter.
        page.get_by_label("API key").focus()
        page.keyboard.type(dataset.keys["dr.house"])
        page.keyboard.press("Enter")
        page.locator("#worklist-rows tr[data-uid]").first.wait_for()
        unlabelled, low, checked = accessibility_problems(page)
        assert not unlabelled and not low and checked > 100, (unlabelled, low)
        page.locator("body").focus()
        for _ in range(40):
            page.keyboard.press("Tab")
            if page.evaluate("!!document.activeElement.closest('#worklist-rows tr[data-uid]')"):
                break
        else:
            pytest.fail("Tab never reached a worklist row")
        first = tab.row_uids()[0]
        assert page.evaluate("document.activeElement.closest('tr').dataset.uid") == first
        # The row's first stop is its "Why?": Enter opens the explanation; the next stop opens the study.
        assert page.evaluate("document.activeElement.tagName") == "SUMMARY"
        page.keyboard.press("Enter")
        assert page.locator(f'tr[data-uid="{first}"] .why p').is_visible()
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.className") == "open"
        page.keyboard.press("Enter")
        page.locator("#study-title").wait_for()
        assert page.evaluate("document.activeElement.id") == "study-title"  # focus moves to the study
        assert page.url.endswith(f"#/study/{first}")
        page.eval_on_selector_all("figure img", "imgs => imgs.length")
        wait_until(lambda: page.eval_on_selector_all("figure img", "i => i.every(x => x.complete)"), 30,
                   what="images")
        unlabelled, low, checked = accessibility_problems(page)
        assert not unlabelled and not low and checked > 50, (unlabelled, low)
    finally:
        tab.close()


def test_an_auditor_signs_in_but_sees_no_studies(browser, dataset, served):
    tab = Page(browser, served.url)
    try:
        page = tab.page
        page.goto(served.url)
        page.get_by_label("API key").fill(dataset.keys["ann.audit"])
        page.get_by_role("button", name="Sign in with API key").click()
        message = page.locator("#login-message")
        wait_until(lambda: "may not read studies" in message.inner_text(), 10, what="the refusal")
        assert "ann.audit" in message.inner_text()
        assert not [url for url in tab.requests if "/worklist" in url or "/studies" in url]
        # A wrong key: told so, nothing shown.
        page.get_by_label("API key").fill("cxrk_" + "B" * 43)
        page.get_by_role("button", name="Sign in with API key").click()
        wait_until(lambda: "unknown or revoked API key" in message.inner_text(), 10, what="the refusal")
    finally:
        tab.close()


def test_single_sign_on_with_pkce_against_a_real_provider(browser, dataset, tmp_path):
    with IdentityProvider() as idp:
        settings = dataset.settings.model_copy(update={
            "oidc_issuer": idp.issuer, "oidc_audience": AUDIENCE, "oidc_client_id": IdentityProvider.CLIENT_ID,
            "oidc_role_claim": "realm_access.roles",
            "oidc_role_map": {"CXR-Radiologists": "radiologist", "CXR-Audit": "auditor"}})
        with ApiServer(create_app(settings, dataset.database)) as server:
            idp.redirect_uris.add(server.url)
            tab = Page(browser, server.url)
            try:
                page = tab.page
                page.goto(server.url)
                page.get_by_role("button", name="Sign in with single sign-on").click()
                page.wait_for_url(re.compile(re.escape(idp.issuer) + "/auth"))
                page.get_by_label("User").select_option("dr.grey")
                page.get_by_role("button", name="Sign in", exact=True).click()
                page.locator("#worklist-rows tr[data-uid]").first.wait_for()
                assert page.locator("#session-user").inner_text() == "oidc:dr.grey (radiologist)"
                assert "code=" not in page.url and "state=" not in page.url  # the code left the address bar
                [exchange] = idp.token_requests
                assert exchange["grant_type"] == "authorization_code" and len(exchange["code_verifier"]) >= 43
                assert "client_secret" not in exchange  # a public client
                authorize = next(r for r in idp.requests if r.startswith("/realms/hospital/auth?"))
                assert "code_challenge_method=S256" in authorize
                with dataset.database.session() as session:
                    from triage_core.models import AuditEvent

                    actors = set(session.scalars(select(AuditEvent.actor).where(AuditEvent.action == "READ_WORKLIST")))
                assert "oidc:dr.grey" in actors

                # The user cancels at the provider: told so, not signed in.
                page.get_by_role("button", name="Sign out").click()
                page.get_by_role("button", name="Sign in with single sign-on").click()
                page.wait_for_url(re.compile(re.escape(idp.issuer) + "/auth"))
                page.get_by_role("button", name="Cancel").click()
                message = page.locator("#login-message")
                wait_until(lambda: "the user cancelled" in message.inner_text(), 10, what="the refusal")
                # An answer this tab did not ask for (forged state) is refused before any token request.
                page.goto(f"{server.url}?code=stolen&state=forged")
                wait_until(lambda: "state mismatch" in message.inner_text(), 10, what="the state check")
                assert len(idp.token_requests) == 1
                # An auditor's sign-in works but shows no studies.
                page.get_by_role("button", name="Sign in with single sign-on").click()
                page.wait_for_url(re.compile(re.escape(idp.issuer) + "/auth"))
                page.get_by_label("User").select_option("ann.audit")
                page.get_by_role("button", name="Sign in", exact=True).click()
                wait_until(lambda: "may not read studies" in message.inner_text(), 10, what="the auditor's view")
                assert not tab.foreign_requests(idp.issuer), tab.foreign_requests(idp.issuer)
            finally:
                tab.close()


def test_swagger_ui_and_redoc_load_from_the_package_with_no_request_elsewhere(browser, dataset, served):
    tab = Page(browser, served.url)
    try:
        page = tab.page
        page.goto(served.url + "docs")
        page.locator(".swagger-ui .info .title").wait_for(timeout=20000)
        assert "CXR Triage API" in page.locator(".swagger-ui .info .title").inner_text()
        page.locator(".opblock-summary-path", has_text="/worklist").first.wait_for()
        page.goto(served.url + "redoc")
        page.locator("h1", has_text="CXR Triage API").wait_for(timeout=30000)
        page.get_by_text("/worklist").first.wait_for()
        assert not tab.foreign_requests(), tab.foreign_requests()
        assert not [e for e in tab.errors if "Content Security Policy" in e or "Refused" in e], tab.errors
    finally:
        tab.close()
