"""Optional patient metadata inputs (age, sex, view position) and their fixed encoding.

A model trained with ``--metadata`` takes, beside the image, a small vector
per image (encoding ``age-sex-view-v1``, recorded in the model card)::

    age          age in years / 100, clipped to [0, 1.2]; 0 when unknown
    age_missing  1 when the age is unknown (or implausible: above 120 years), else 0
    sex_male     1 for male, else 0     } both 0 when the sex is unknown or other
    sex_female   1 for female, else 0   } (DICOM PatientSex "O", CheXpert "Unknown")
    view_ap      1 for an AP view       } both 0 when the view is unknown or neither
    view_pa      1 for a PA view        } (no ViewPosition, PNG/JPEG input, LL, ...)

A one-hot pair that is all zero already says "unknown", so only the age
needs its own missing indicator (age 0 would otherwise mean a newborn).
Images that come without metadata (PNG/JPEG files) are encoded as missing
throughout, which is what the network saw for such rows in training.

Where the values come from: ChestX-ray14's ``Patient Age``, ``Patient
Gender``, ``View Position``; CheXpert's ``Age``, ``Sex``, ``AP/PA``; DICOM's
PatientAge (AS, e.g. ``045Y``, ``006M``), PatientSex and ViewPosition.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ModelError

ENCODING = "age-sex-view-v1"
FEATURES: tuple[str, ...] = ("age", "age_missing", "sex_male", "sex_female", "view_ap", "view_pa")
#: ages above this many years are treated as unknown (data-entry errors such as ChestX-ray14 2017's 414).
MAX_AGE_YEARS = 120.0
AGE_SCALE_YEARS = 100.0
DESCRIPTION = (
    "float32 vector [age, age_missing, sex_male, sex_female, view_ap, view_pa]: age = years / 100 clipped to "
    "[0, 1.2] (0 when unknown); age_missing = 1 when the age is unknown or above 120 years; sex and view one-hot, "
    "all zero when unknown or other (PatientSex 'O', a view that is neither AP nor PA). DICOM inputs use "
    "PatientAge, PatientSex and ViewPosition; PNG/JPEG inputs have no metadata and are encoded as all unknown."
)
#: DICOM keywords read by :func:`metadata_from_dicom`.
DICOM_KEYWORDS = ("PatientAge", "PatientSex", "ViewPosition")


def card_entry() -> dict[str, Any]:
    """What a model card records about a model that takes metadata (its ``metadata_inputs`` field)."""
    return {"encoding": ENCODING, "features": list(FEATURES), "description": DESCRIPTION}


def check_card_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a card's ``metadata_inputs``; {} = the model takes no metadata.  Raises ValueError."""
    entry = dict(entry)
    if not entry:
        return {}
    if entry.get("encoding") != ENCODING:
        raise ValueError(f"unsupported metadata encoding {entry.get('encoding')!r} (this software knows {ENCODING!r})")
    if list(entry.get("features", ())) != list(FEATURES):
        raise ValueError(f"encoding {ENCODING!r} has features {list(FEATURES)}, card says {entry.get('features')!r}")
    unknown = set(entry) - {"encoding", "features", "description"}
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}")
    entry["features"] = list(FEATURES)
    return entry


def parse_age_years(text: str | None) -> float | None:
    """'57' (ChestX-ray14 v2020), '057Y', '006M', '002W' or '010D' (DICOM AS, ChestX-ray14 2017) -> years;
    '' or nonsense -> None."""
    m = re.fullmatch(r"\s*0*(\d+)\s*([YMDW]?)\s*", text or "", flags=re.IGNORECASE)
    if not m:
        return None
    value = float(m.group(1))
    unit = m.group(2).upper() or "Y"
    return value / {"Y": 1.0, "M": 12.0, "W": 52.0, "D": 365.25}[unit]


def parse_sex(text: str | None) -> str:
    """'M', 'Male', 'F', 'Female' (any case) -> 'M' / 'F'; anything else ('O', 'Unknown', '') -> ''."""
    t = (text or "").strip().upper()
    return {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}.get(t, "")


def parse_view(text: str | None) -> str:
    """'AP' / 'PA' (any case) -> itself; anything else (LL, RL, LATERAL, '') -> ''."""
    t = (text or "").strip().upper()
    return t if t in ("AP", "PA") else ""


@dataclass(frozen=True)
class ImageMetadata:
    """Age (years, None = unknown), sex ('M', 'F', '' = unknown/other) and view ('AP', 'PA', '' = unknown/other)."""

    age_years: float | None = None
    sex: str = ""
    view: str = ""

    def __post_init__(self) -> None:
        age = self.age_years
        if age is not None:
            age = float(age)
            if not math.isfinite(age) or age < 0 or age > MAX_AGE_YEARS:
                age = None
        object.__setattr__(self, "age_years", age)
        object.__setattr__(self, "sex", parse_sex(self.sex))
        object.__setattr__(self, "view", parse_view(self.view))

    def encode(self) -> np.ndarray:
        """The (len(FEATURES),) float32 vector of encoding :data:`ENCODING`."""
        age = self.age_years
        return np.asarray([
            0.0 if age is None else min(max(age / AGE_SCALE_YEARS, 0.0), MAX_AGE_YEARS / AGE_SCALE_YEARS),
            1.0 if age is None else 0.0,
            float(self.sex == "M"), float(self.sex == "F"),
            float(self.view == "AP"), float(self.view == "PA"),
        ], dtype=np.float32)


UNKNOWN = ImageMetadata()


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str) and isinstance(value, Iterable):  # a multi-valued element: the first value
        value = next(iter(value), None)
        return None if value is None else str(value)
    return str(value)


def metadata_from_dicom(ds: Any) -> ImageMetadata:
    """PatientAge (AS), PatientSex and ViewPosition of a DICOM data set (a pydicom Dataset, or any object with
    those attributes, or a mapping keyed by those keywords); absent or odd values count as unknown."""
    if isinstance(ds, Mapping):
        get = ds.get
    else:
        def get(keyword: str, default: Any = None) -> Any:
            try:
                return getattr(ds, keyword, default)
            except Exception:  # a malformed element that pydicom cannot convert
                return default

    age, sex, view = (_text(get(k, None)) for k in DICOM_KEYWORDS)
    return ImageMetadata(parse_age_years(age), sex or "", view or "")


def as_metadata(obj: Any) -> ImageMetadata:
    """None (unknown), an :class:`ImageMetadata`, or a DICOM data set / keyword mapping -> ImageMetadata."""
    if obj is None:
        return UNKNOWN
    if isinstance(obj, ImageMetadata):
        return obj
    return metadata_from_dicom(obj)


def encode_many(items: Iterable[Any]) -> np.ndarray:
    """(N, len(FEATURES)) float32 matrix for N items accepted by :func:`as_metadata`."""
    rows = [as_metadata(x).encode() for x in items]
    if not rows:
        return np.zeros((0, len(FEATURES)), dtype=np.float32)
    return np.stack(rows)


def check_matrix(metadata: np.ndarray, n: int) -> np.ndarray:
    arr = np.ascontiguousarray(metadata, dtype=np.float32)
    if arr.shape != (n, len(FEATURES)):
        raise ModelError(f"metadata must be a ({n}, {len(FEATURES)}) matrix, got {arr.shape}")
    return arr
