"""`cxr-triage health`: the deployment's readiness (as /health/ready), or one service's liveness on
this host for a container healthcheck (`--service node|worker|api`)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from datetime import timedelta

from triage_core import health, work
from triage_core.db import Database
from triage_core.settings import Settings


def health_command(settings: Settings, *, service: str | None, as_json: bool) -> int:
    if service is None:
        database = Database(settings.database_url)
        try:
            result = health.readiness(settings, database)
        finally:
            database.dispose()
        checks = [{"name": c.name, "status": c.status, "detail": c.detail} for c in result.checks]
        if as_json:
            print(json.dumps({"status": result.status, "checks": checks}, indent=2))
        else:
            print(result.status)
            for check in checks:
                print(f"  {check['name']:<9} {check['status']:<9} {check['detail']}")
        return 0 if result.ready else 1
    ok, detail = {"node": _node, "worker": _worker, "api": _api}[service](settings)
    if as_json:
        print(json.dumps({"service": service, "status": "ok" if ok else "fail", "detail": detail}))
    else:
        print(f"{service}: {'ok' if ok else 'FAIL'}: {detail}")
    return 0 if ok else 1


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _node(settings: Settings) -> tuple[bool, str]:
    """A C-ECHO to the node's SCP on this host."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="CXR_HEALTH")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    host = _local(settings.dicom_host)
    assoc = ae.associate(host, settings.dicom_port, ae_title=settings.ae_title)
    if not assoc.is_established:
        return False, f"no association with {settings.ae_title}@{host}:{settings.dicom_port}"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    return code == 0, f"C-ECHO {settings.ae_title}@{host}:{settings.dicom_port}: " + (
        f"0x{code:04X}" if code is not None else "no answer")


def _worker(settings: Settings) -> tuple[bool, str]:
    """A model process of this host reported within three heartbeats, its model loaded."""
    database = Database(settings.database_url)
    hostname = socket.gethostname()
    try:
        with database.session() as session:
            beats = [b for b in work.live_heartbeats(session, "worker",
                                                     timedelta(seconds=3 * settings.heartbeat_seconds))
                     if b.hostname == hostname]
    finally:
        database.dispose()
    loaded = [b for b in beats if b.model_loaded]
    if loaded:
        return True, f"{len(loaded)} model process(es) on {hostname} ready ({loaded[0].model_name} " \
                     f"{loaded[0].model_version}, {loaded[0].model_runtime})"
    if beats:
        return False, f"model not loaded on {hostname}: {beats[0].model_error or 'still loading'}"
    return False, f"no model process on {hostname} reported in the last {3 * settings.heartbeat_seconds:g} s"


def _api(settings: Settings) -> tuple[bool, str]:
    url = f"http://{_local(settings.api_host)}:{settings.api_port}/health/live"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200, f"{url}: {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {getattr(exc, 'reason', exc)}"
