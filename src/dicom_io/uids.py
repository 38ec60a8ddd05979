"""Deterministic UIDs of our result objects and of the model as a device.

A UID written as ``2.25.<integer of a UUID>`` is a valid DICOM UID (PS3.5
B.2) that needs no registered organisation root; a name-based (version 5)
UUID makes it deterministic. A result's UID is derived from everything that
decides its content, so that:

* a retry or a re-run over the same inputs makes the same UID (it replaces,
  it does not duplicate), and
* different content never shares a UID (PS3.5 9.1): a source image resent
  with other pixels (its SHA-256 changes), new weights, another runtime
  precision or new operating thresholds all make new UIDs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from triage_core.values import AlgorithmInfo, ImageResult

__all__ = ["device_uid", "image_key", "result_uid", "study_key"]

# Namespace of our name-based UUIDs (RFC 4122 version 5).
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxr-triage:dicom-result-uid")
_SEP = "\x1f"


def _uid(*parts: str) -> str:
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, _SEP.join(parts)).int}"


def _model_key(algorithm: AlgorithmInfo) -> tuple[str, ...]:
    parameters = ";".join(f"{key}={value}" for key, value in sorted(algorithm.parameters.items()))
    return (algorithm.name, algorithm.version, algorithm.weights_sha256, parameters)


def image_key(result: ImageResult) -> str:
    """What identifies the analysis of one image: its SOP Instance UID, the
    SHA-256 of the stored instance when known, and the operating thresholds."""
    thresholds = ",".join(f"{f.finding}={f.threshold:.6f}" for f in result.findings)
    return _SEP.join((result.sop_instance_uid, result.source_sha256, thresholds))


def study_key(results: Iterable[ImageResult]) -> str:
    """The analysis of a set of images, whatever their order."""
    return "\x1e".join(sorted(image_key(result) for result in results))


def result_uid(source_key: str, algorithm: AlgorithmInfo, kind: str) -> str:
    """A UID that is the same whenever the same model makes the same object.

    `source_key` identifies the input (`image_key`, `study_key`, or a Study
    Instance UID for the series that gather one study's results); `kind`
    names the object (``"sr"``, ``"heatmap:Effusion"``...). Different inputs
    give different UIDs; equal inputs give equal UIDs on any machine.
    """
    if not source_key or not kind:
        raise ValueError("result_uid needs a source key and a kind")
    return _uid(source_key, *_model_key(algorithm), kind)


def device_uid(algorithm: AlgorithmInfo) -> str:
    """The UID of the model as a device: one per set of weights.

    Written as the Device Observer UID of the SR and the Device UID of the
    Contributing Equipment item; new weights make a new device.
    """
    return _uid("device", algorithm.name, algorithm.weights_sha256)
