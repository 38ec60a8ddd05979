"""DIMSE status codes and A-ASSOCIATE-RJ reasons this node answers with.

PS3.4 B.2.3 (C-STORE), C.4.1.1.4 (C-FIND), C.4.2.1.5 (C-MOVE), C.4.3.1.4
(C-GET), PS3.7 C (general statuses), PS3.8 9.3.4 (A-ASSOCIATE-RJ).
Constants, not literals, so that "which status for which refusal" has one
answer; pynetdicom's `status.code_to_category` classifies them.
"""

from __future__ import annotations

from pynetdicom.status import code_to_category

__all__ = [
    "CANNOT_UNDERSTAND",
    "DATASET_DOES_NOT_MATCH_SOP_CLASS",
    "DUPLICATE_SOP_INSTANCE",
    "FIND_UNABLE_TO_PROCESS",
    "GET_UNABLE_TO_PROCESS",
    "IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS",
    "MOVE_DESTINATION_UNKNOWN",
    "MOVE_UNABLE_TO_PROCESS",
    "OUT_OF_RESOURCES",
    "PENDING",
    "REJECT_LOCAL_LIMIT_EXCEEDED",
    "SUCCESS",
    "is_success",
]

SUCCESS = 0x0000
#: A C-FIND match, or a C-GET/C-MOVE sub-operation under way.
PENDING = 0xFF00
#: Storage could not keep the dataset (disk or database error): try again later.
OUT_OF_RESOURCES = 0xA700
#: Identifying attributes missing or invalid, or contradicting the request.
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: The dataset cannot be parsed, or its pixel data contradicts its header.
CANNOT_UNDERSTAND = 0xC000
#: The SOP Instance UID is already stored here as part of another study (PS3.7 C.4.? general status).
DUPLICATE_SOP_INSTANCE = 0x0111

#: A query/retrieve identifier without a valid level or unique key (C-FIND, C-GET, C-MOVE).
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: A query or retrieve failed on our side (database, files).
FIND_UNABLE_TO_PROCESS = 0xC000
GET_UNABLE_TO_PROCESS = 0xC000
MOVE_UNABLE_TO_PROCESS = 0xC000
#: The Move Destination is no AE title we know (settings: export and move destinations).
MOVE_DESTINATION_UNKNOWN = 0xA801

#: A-ASSOCIATE-RJ (result, source, reason): rejected-transient, service-provider (presentation), local limit exceeded.
REJECT_LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)


def is_success(status: int) -> bool:
    return code_to_category(status) == "Success"
