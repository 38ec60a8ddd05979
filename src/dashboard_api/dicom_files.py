"""Serving stored result objects: single DICOM files and DICOMweb-style multipart/related bundles."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence

from fastapi import HTTPException, status
from fastapi.responses import Response

from triage_core.models import ResultObject
from triage_core.storage import ObjectStore

log = logging.getLogger(__name__)

DICOM_MEDIA_TYPE = "application/dicom"
MULTIPART_MEDIA_TYPE = f'multipart/related; type="{DICOM_MEDIA_TYPE}"'


class DicomResponse(Response):
    media_type = DICOM_MEDIA_TYPE


class MultipartDicomResponse(Response):
    """``multipart/related; type="application/dicom"; boundary=...`` (PS3.18 8.7.1)."""

    media_type = MULTIPART_MEDIA_TYPE

    def __init__(
        self, parts: Sequence[bytes], status_code: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        boundary = secrets.token_hex(16)
        while any(boundary.encode() in part for part in parts):  # pragma: no cover - 2**-128
            boundary = secrets.token_hex(16)
        chunks: list[bytes] = []
        for part in parts:
            chunks += [
                f"--{boundary}\r\nContent-Type: {DICOM_MEDIA_TYPE}\r\nContent-Length: {len(part)}\r\n\r\n".encode(),
                part,
                b"\r\n",
            ]
        chunks.append(f"--{boundary}--\r\n".encode())
        super().__init__(
            content=b"".join(chunks),
            status_code=status_code,
            headers=headers,
            media_type=f"{MULTIPART_MEDIA_TYPE}; boundary={boundary}",
        )


def read_result_file(results: ObjectStore, result: ResultObject) -> bytes:
    """The bytes of a stored result object; its key must stay inside the results store."""
    try:
        results.check_key(result.path)
    except FileNotFoundError:
        log.error("result %s (id %s) has a path outside the results directory", result.sop_instance_uid, result.id)
        raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, "result object has an invalid storage path")
    try:
        return results.read_bytes(result.path)
    except FileNotFoundError:
        log.error("result file of %s (id %s) is missing", result.sop_instance_uid, result.id)
        raise HTTPException(
            status.HTTP_500_INTERNAL_SERVER_ERROR,
            f"result object {result.sop_instance_uid} is recorded but its file is missing from storage",
        ) from None
