"""`cxr-triage demo`: send the bundled sample studies to a running node, then print the worklist."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from triage_core.settings import Settings

SAMPLES = Path(__file__).with_name("samples")


def send_samples(settings: Settings, host: str) -> list[tuple[str, str]]:
    files = sorted(SAMPLES.glob("*.dcm"))
    datasets = [(path, dcmread(path)) for path in files]
    ae = AE(ae_title="CXR_DEMO")
    # A context per (class, stored syntax), so compressed samples go as stored (our SCP prefers
    # uncompressed when one context offers both), plus an uncompressed one per class.
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets}):
        ae.add_requested_context(sop_class, syntax)
    for sop_class in sorted({str(ds.SOPClassUID) for _, ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(host, settings.dicom_port, ae_title=settings.ae_title)
    if not assoc.is_established:
        raise SystemExit(f"cxr-triage demo: cannot associate with {settings.ae_title}@{host}:{settings.dicom_port} "
                         "(CXR_TRIAGE_AE_TITLE / CXR_TRIAGE_DICOM_PORT): is the node running?")
    sent = []
    try:
        for path, ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            sent.append((path.name, f"0x{code:04X}" if code is not None else "no response"))
    finally:
        assoc.release()
    return sent


def api_url(settings: Settings, host: str) -> str:
    api_host = host if settings.api_host in ("0.0.0.0", "::") else settings.api_host
    return f"http://{api_host}:{settings.api_port}"


def check_api(settings: Settings, host: str) -> None:
    """Before sending anything: the API answers, else one line naming the setting."""
    url = api_url(settings, host)
    try:
        with urllib.request.urlopen(f"{url}/health/live", timeout=10):
            pass
    except urllib.error.HTTPError:
        return  # it answers (an older API without /health/live)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SystemExit(f"cxr-triage demo: the API at {url} does not answer ({reason}; CXR_TRIAGE_API_HOST / "
                         "CXR_TRIAGE_API_PORT): is `cxr-triage api` or `cxr-triage serve` running?") from None


def fetch_worklist(settings: Settings, host: str, api_key: str = "") -> dict:
    """The worklist, read with ``api_key`` (an API key or an OIDC access token) when one is given."""
    url = f"{api_url(settings, host)}/worklist"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise SystemExit(
                f"the API refused to show the worklist ({exc.code}): pass a radiologist's key with --api-key or "
                "CXR_TRIAGE_API_KEY (cxr-triage user add NAME --role radiologist prints one)") from None
        raise


def run_demo(settings: Settings, host: str = "127.0.0.1", timeout: float = 180.0, api_key: str | None = None) -> int:
    api_key = api_key if api_key is not None else settings.api_key
    check_api(settings, host)
    sent = send_samples(settings, host)
    for name, status in sent:
        print(f"C-STORE {name}: {status}")
    studies = {str(dcmread(SAMPLES / name, stop_before_pixels=True).StudyInstanceUID) for name, _ in sent}
    deadline = time.monotonic() + timeout
    settled = {"DONE", "SKIPPED", "FAILED"}

    def pending(worklist: dict) -> set[str]:
        done = {item["study_instance_uid"] for item in worklist["data"] if item["status"] in settled}
        return studies - done

    worklist = fetch_worklist(settings, host, api_key)
    while time.monotonic() < deadline and pending(worklist):
        time.sleep(1)
        worklist = fetch_worklist(settings, host, api_key)
    print(f"\nWorklist ({worklist['count']} studies, priority order):")
    for item in worklist["data"]:
        findings = ", ".join(f"{f['finding']} {f['probability']:.2f}" for f in item.get("top_findings", [])) or "-"
        model = item.get("model") or {}
        label = f"{model.get('name', '')} {model.get('version', '')}".strip()
        if model.get("demo"):
            label += " (DEMO WEIGHTS)"
        print(f"  {item['priority']['name']:<17} {item['status']:<10} {item['study_instance_uid']}  "
              f"acc={item.get('accession_number') or '-'}  {findings}  {item.get('status_reason', '')}  {label}")
    waiting = pending(worklist)
    if waiting:
        print(f"\n{len(waiting)} sample studies not settled after {timeout:.0f}s: is a worker running?")
    if any(status != "0x0000" for _, status in sent):
        return 1
    return 1 if waiting else 0
