"""The model as equipment: IHE AI Results (AIR) Contributing Equipment, shared by every result object."""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes

from triage_core.values import AlgorithmInfo

from .render import NOT_FOR_DIAGNOSTIC_USE
from .uids import device_uid

__all__ = ["contributing_equipment"]


def contributing_equipment(algorithm: AlgorithmInfo) -> hd.ContributingEquipment:
    """IHE AIR: the algorithm as Processing Equipment (DCM 109102)."""
    item = hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        # The weights' SHA-256 identifies this model instance as a serial
        # number identifies a device (LO, 64 characters: it fits exactly).
        device_serial_number=algorithm.weights_sha256,
        contribution_description=(  # ST: up to 1024 characters
            f"AI triage of chest radiographs by {algorithm.display_name}; weights SHA-256 "
            f"{algorithm.weights_sha256}; {NOT_FOR_DIAGNOSTIC_USE.lower()}"
        ),
    )
    # Device UID (0018,1002), allowed in Contributing Equipment items
    # (PS3.3 C.12.1): IHE AIR identifies the algorithm instance by it, and it
    # changes with the weights (`device_uid`).
    item.DeviceUID = device_uid(algorithm)
    return item
