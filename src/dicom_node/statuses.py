"""DIMSE status codes this node answers with (PS3.4 B.2.3 for C-STORE, PS3.7 C for the general ones).

Constants, not literals, so that "which status for which refusal" has one
answer; pynetdicom's `status.code_to_category` classifies them.
"""

from __future__ import annotations

from pynetdicom.status import code_to_category

__all__ = [
    "CANNOT_UNDERSTAND",
    "DATASET_DOES_NOT_MATCH_SOP_CLASS",
    "DUPLICATE_SOP_INSTANCE",
    "OUT_OF_RESOURCES",
    "SUCCESS",
    "is_success",
]

SUCCESS = 0x0000
#: Storage could not keep the dataset (disk or database error): try again later.
OUT_OF_RESOURCES = 0xA700
#: Identifying attributes missing or invalid, or contradicting the request.
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: The dataset cannot be parsed, or its pixel data contradicts its header.
CANNOT_UNDERSTAND = 0xC000
#: The SOP Instance UID is already stored here as part of another study (PS3.7 C.4.? general status).
DUPLICATE_SOP_INSTANCE = 0x0111


def is_success(status: int) -> bool:
    return code_to_category(status) == "Success"
