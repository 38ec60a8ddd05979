"""Reading ChestX-ray14 and CheXpert metadata into labelled image lists, and patient-wise splits.

Nothing here opens an image: a :class:`LabelledSet` is a list of image paths
with a label matrix, a mask (1 = the label counts in the loss and the
metrics, 0 = unknown, e.g. a CheXpert "uncertain" label under U-Ignore) and
the patient of every image.  Splits are always patient-wise: no patient has
images on two sides.

ChestX-ray14 (NIH Clinical Center, Wang et al. 2017) layout under ``data_dir``::

    Data_Entry_2017*.csv      one row per image (2017 and v2020 column spellings)
    train_val_list.txt        official split (image names)
    test_list.txt
    images/*.png              (images/ may be nested one level, as in the NIH tarballs)
    BBox_List_2017.csv        optional: 984 radiologist boxes on 880 test images

CheXpert (Irvin et al. 2019): ``train.csv`` / ``valid.csv`` with a ``Path``
column and one column per observation holding 1, 0, -1 (uncertain) or empty.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ModelError
from .labels import FINDINGS
from .metadata import ImageMetadata, encode_many, parse_age_years

DATASETS = ("chestxray14", "chexpert")
SPLIT_SCHEMES = ("official", "random")
SPLIT_NAMES = ("train", "val", "test")
UNCERTAINTY_POLICIES = ("ignore", "zeros", "ones")
#: fraction of train_val *patients* carved out for validation in the official scheme.
OFFICIAL_VAL_FRACTION = 0.1
#: patient fractions of the random scheme (CheXNet: 70/10/20).
RANDOM_FRACTIONS = (0.7, 0.1, 0.2)
#: BBox_List_2017.csv spells one finding differently from Data_Entry_2017.csv.
BBOX_NAME_FIX = {"Infiltrate": "Infiltration"}

#: CheXpert observations in the order of its CSV; "Pleural Effusion" is stored under
#: the ChestX-ray14 spelling "Effusion" so that the overlapping findings share names.
CHEXPERT_COLUMNS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
CHEXPERT_LABELS: tuple[str, ...] = tuple("Effusion" if c == "Pleural Effusion" else c for c in CHEXPERT_COLUMNS)


@dataclass(frozen=True)
class Box:
    """A radiologist's box in original-image pixels (x, y = top-left corner)."""

    image: str
    finding: str
    x: float
    y: float
    w: float
    h: float

    def __post_init__(self) -> None:
        if self.finding not in FINDINGS:
            raise ModelError(f"box on {self.image}: unknown finding {self.finding!r}")
        if not (self.w > 0 and self.h > 0):
            raise ModelError(f"box on {self.image}: width and height must be positive, got {self.w} x {self.h}")


@dataclass(frozen=True)
class LabelledSet:
    """Images with labels: ``labels`` and ``mask`` are (N, C) float32, ``patients`` one id per image."""

    labels_names: tuple[str, ...]
    paths: tuple[Path, ...]
    patients: tuple[str, ...]
    labels: np.ndarray
    mask: np.ndarray
    names: tuple[str, ...] = ()  # image names as the metadata spells them (for boxes); defaults to file names
    meta: dict[str, object] = field(default_factory=dict)
    #: age, sex and view of every image; () = not known for any image (encoded as unknown).
    metadata: tuple[ImageMetadata, ...] = ()

    def __post_init__(self) -> None:
        n, c = len(self.paths), len(self.labels_names)
        labels = np.asarray(self.labels, dtype=np.float32).reshape(n, c)
        mask = np.asarray(self.mask, dtype=np.float32).reshape(n, c)
        if len(self.patients) != n:
            raise ModelError(f"patients: {len(self.patients)} entries for {n} images")
        if not np.isin(labels, (0.0, 1.0)).all():
            raise ModelError("labels must be 0 or 1 (uncertain labels are resolved by a policy first)")
        if not np.isin(mask, (0.0, 1.0)).all():
            raise ModelError("mask must be 0 or 1")
        names = tuple(self.names) or tuple(p.name for p in self.paths)
        if len(names) != n:
            raise ModelError(f"names: {len(names)} entries for {n} images")
        if self.metadata and len(self.metadata) != n:
            raise ModelError(f"metadata: {len(self.metadata)} entries for {n} images")
        object.__setattr__(self, "metadata", tuple(self.metadata))
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "paths", tuple(Path(p) for p in self.paths))

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: Sequence[int] | np.ndarray) -> LabelledSet:
        idx = np.asarray(index, dtype=np.int64)
        return LabelledSet(
            self.labels_names,
            tuple(self.paths[i] for i in idx),
            tuple(self.patients[i] for i in idx),
            self.labels[idx],
            self.mask[idx],
            tuple(self.names[i] for i in idx),
            dict(self.meta),
            tuple(self.metadata[i] for i in idx) if self.metadata else (),
        )

    def metadata_matrix(self) -> np.ndarray:
        """(N, M) float32 metadata inputs of every image (all unknown where the data set has none)."""
        return encode_many(self.metadata or [None] * len(self))

    def positives(self) -> np.ndarray:
        """Positive count per label among the labels that count (mask = 1)."""
        return (self.labels * self.mask).sum(0)

    def negatives(self) -> np.ndarray:
        return ((1.0 - self.labels) * self.mask).sum(0)


# --------------------------------------------------------------------------- CSV helpers


@contextlib.contextmanager
def _csv(path: Path) -> Iterator[tuple[list[str], Iterator[list[str]]]]:
    """(header, remaining rows) of a CSV file, optionally gzipped; an empty file raises ModelError."""
    fh = (io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="") if path.suffix == ".gz"
          else open(path, encoding="utf-8", newline=""))
    with fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ModelError(f"{path} is empty")
        yield header, reader


def _norm(col: str) -> str:
    return re.sub(r"[^a-z0-9]", "", col.lower())


def _optional_column(header: Sequence[str], name: str) -> int | None:
    return next((i for i, h in enumerate(header) if _norm(h) == _norm(name)), None)


def _column(header: Sequence[str], *candidates: str, path: Path) -> int:
    normed = [_norm(h) for h in header]
    for cand in candidates:
        if _norm(cand) in normed:
            return normed.index(_norm(cand))
    raise ModelError(f"{path}: no column {candidates[0]!r} (header: {list(header)[:12]})")


@dataclass(frozen=True)
class NihEntry:
    """One row of Data_Entry_2017*.csv."""

    image: str
    findings: tuple[str, ...]
    patient_id: str
    age_years: float | None
    sex: str
    view: str

    @property
    def metadata(self) -> ImageMetadata:
        return ImageMetadata(self.age_years, self.sex, self.view)


def read_nih_entries(path: str | Path) -> list[NihEntry]:
    """Parse Data_Entry_2017.csv / Data_Entry_2017_v2020.csv (optionally .gz); unknown findings raise."""
    path = Path(path)
    known = set(FINDINGS)
    entries = []
    with _csv(path) as (header, reader):
        c_img = _column(header, "Image Index", path=path)
        c_lab = _column(header, "Finding Labels", path=path)
        c_pat = _column(header, "Patient ID", path=path)
        c_age = _column(header, "Patient Age", path=path)
        c_sex = _column(header, "Patient Gender", "Patient Sex", path=path)
        c_view = _column(header, "View Position", path=path)
        for lineno, row in enumerate(reader, start=2):
            if not row or not any(row):
                continue
            try:
                image, labels = row[c_img].strip(), row[c_lab].strip()
                patient = row[c_pat].strip()
            except IndexError:
                raise ModelError(f"{path}:{lineno}: short row") from None
            findings = tuple(x for x in labels.split("|") if x and x != "No Finding")
            bad = [x for x in findings if x not in known]
            if bad:
                raise ModelError(f"{path}:{lineno}: unknown finding(s) {bad}")
            if not image or not patient:
                raise ModelError(f"{path}:{lineno}: missing image name or patient id")
            entries.append(NihEntry(
                image, findings, str(int(patient)) if patient.isdigit() else patient,
                parse_age_years(row[c_age]), row[c_sex].strip().upper(), row[c_view].strip().upper(),
            ))
    return entries


def read_nih_boxes(path: str | Path) -> list[Box]:
    """Parse BBox_List_2017.csv (optionally .gz): image, finding, x, y, w, h."""
    path = Path(path)
    boxes = []
    with _csv(path) as (header, reader):
        c_img = _column(header, "Image Index", path=path)
        c_lab = _column(header, "Finding Label", path=path)
        c_box = next((i for i, h in enumerate(header) if _norm(h).startswith("bbox")), None)
        if c_box is None:
            raise ModelError(f"{path}: no 'Bbox [x,y,w,h]' column")
        for lineno, row in enumerate(reader, start=2):
            if not row or not any(row):
                continue
            try:
                x, y, w, h = (float(v) for v in row[c_box : c_box + 4])
            except (ValueError, IndexError):
                raise ModelError(f"{path}:{lineno}: box needs four numbers x, y, w, h") from None
            finding = BBOX_NAME_FIX.get(row[c_lab].strip(), row[c_lab].strip())
            boxes.append(Box(row[c_img].strip(), finding, x, y, w, h))
    return boxes


def _find_file(data_dir: Path, pattern: str) -> Path | None:
    hits = sorted(data_dir.glob(pattern))
    return hits[0] if hits else None


def _image_index(data_dir: Path) -> dict[str, Path]:
    """Map image name -> path for images/*.png and images_*/images/*.png (the NIH tarball layout)."""
    found: dict[str, Path] = {}
    for pattern in ("images/*.png", "images*/images/*.png", "images/*/*.png"):
        for p in data_dir.glob(pattern):
            found.setdefault(p.name, p)
    return found


def load_chestxray14(data_dir: str | Path, *, require_images: bool = True) -> tuple[LabelledSet, list[Box]]:
    """All labelled images of a ChestX-ray14 directory (in CSV order) and its boxes (possibly none).

    With ``require_images`` rows whose PNG is absent are dropped (a partial
    download); an empty result raises.
    """
    data_dir = Path(data_dir)
    entry_file = _find_file(data_dir, "Data_Entry_2017*.csv") or _find_file(data_dir, "Data_Entry_2017*.csv.gz")
    if entry_file is None:
        raise ModelError(f"{data_dir}: no Data_Entry_2017*.csv (ChestX-ray14 layout expected)")
    entries = read_nih_entries(entry_file)
    index = _image_index(data_dir) if require_images else {}
    if require_images:
        entries = [e for e in entries if e.image in index]
        if not entries:
            raise ModelError(f"{data_dir}: none of the images listed in {entry_file.name} is under images/")
    col = {f: j for j, f in enumerate(FINDINGS)}
    labels = np.zeros((len(entries), len(FINDINGS)), dtype=np.float32)
    for i, e in enumerate(entries):
        for f in e.findings:
            labels[i, col[f]] = 1.0
    paths = tuple(index.get(e.image, data_dir / "images" / e.image) for e in entries)
    ds = LabelledSet(
        FINDINGS, paths, tuple(e.patient_id for e in entries), labels, np.ones_like(labels),
        names=tuple(e.image for e in entries),
        meta={"dataset": "chestxray14", "entries_file": entry_file.name},
        metadata=tuple(e.metadata for e in entries),
    )
    box_file = _find_file(data_dir, "BBox_List_2017.csv") or _find_file(data_dir, "BBox_List_2017.csv.gz")
    boxes = read_nih_boxes(box_file) if box_file else []
    return ds, boxes


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- splits


def _patient_groups(patients: Sequence[str]) -> tuple[list[str], dict[str, list[int]]]:
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        groups.setdefault(p, []).append(i)
    return sorted(groups), groups


def patient_split(patients: Sequence[str], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Shuffle *patients* with ``seed`` and cut them by ``fractions``; return image indices per part.

    The cut points are on patients, so every patient's images land in one part.
    """
    if not fractions or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ModelError(f"split fractions must be non-negative and sum to 1, got {list(fractions)}")
    ids, groups = _patient_groups(patients)
    order = np.random.default_rng(seed).permutation(len(ids))
    cuts = np.round(np.cumsum(fractions)[:-1] * len(ids)).astype(int)
    parts = np.split(order, cuts)
    return [np.sort(np.asarray([i for k in part for i in groups[ids[k]]], dtype=np.int64)) for part in parts]


def split_chestxray14(ds: LabelledSet, data_dir: str | Path, scheme: str, seed: int) -> dict[str, LabelledSet]:
    """``official``: test_list.txt, validation = 10% of the train_val *patients*; ``random``: patient-wise 70/10/20."""
    if scheme not in SPLIT_SCHEMES:
        raise ModelError(f"split must be one of {SPLIT_SCHEMES}, got {scheme!r}")
    if scheme == "random":
        parts = patient_split(ds.patients, RANDOM_FRACTIONS, seed)
        return {name: ds.subset(idx) for name, idx in zip(SPLIT_NAMES, parts)}
    data_dir = Path(data_dir)
    tv_file, test_file = data_dir / "train_val_list.txt", data_dir / "test_list.txt"
    for f in (tv_file, test_file):
        if not f.is_file():
            raise ModelError(f"official split needs {f.name} in {data_dir} (or use --split random)")
    position = {name: i for i, name in enumerate(ds.names)}
    train_val = np.asarray(sorted(position[n] for n in set(_read_list(tv_file)) if n in position), dtype=np.int64)
    test = np.asarray(sorted(position[n] for n in set(_read_list(test_file)) if n in position), dtype=np.int64)
    shared = {ds.patients[i] for i in train_val} & {ds.patients[i] for i in test}
    if shared:
        raise ModelError(
            f"official lists put {len(shared)} patient(s) on both train_val and test (e.g. {sorted(shared)[:3]}); "
            "a patient-wise split is required"
        )
    if len(train_val) == 0 or len(test) == 0:
        raise ModelError(f"official split of {data_dir}: {len(train_val)} train_val and {len(test)} test images found")
    tv = ds.subset(train_val)
    tr_idx, va_idx = patient_split(tv.patients, (1.0 - OFFICIAL_VAL_FRACTION, OFFICIAL_VAL_FRACTION), seed)
    return {"train": tv.subset(tr_idx), "val": tv.subset(va_idx), "test": ds.subset(test)}


# --------------------------------------------------------------------------- CheXpert


def parse_uncertainty(spec: str | Mapping[str, str] | None, labels: Sequence[str] = CHEXPERT_LABELS) -> dict[str, str]:
    """'ones', or 'ignore,Atelectasis=ones,Edema=ones', or a mapping -> policy per label."""
    policies = {name: "ignore" for name in labels}
    if spec is None:
        return policies
    items: Iterable[tuple[str | None, str]]
    if isinstance(spec, Mapping):
        items = [(k, v) for k, v in spec.items()]
    else:
        items = []
        for part in (p.strip() for p in str(spec).split(",") if p.strip()):
            if "=" in part:
                k, v = part.split("=", 1)
                items.append((k.strip(), v.strip()))
            else:
                items.append((None, part))
    lookup = {_norm(n): n for n in labels} | {_norm("Pleural Effusion"): "Effusion"}
    for key, value in items:
        value = value.lower().removeprefix("u-").removeprefix("u")
        if value not in UNCERTAINTY_POLICIES:
            raise ModelError(f"uncertainty policy must be one of {UNCERTAINTY_POLICIES}, got {value!r}")
        if key is None:
            policies = {name: value for name in labels}
        else:
            name = lookup.get(_norm(key))
            if name is None:
                raise ModelError(f"uncertainty policy for unknown finding {key!r}")
            policies[name] = value
    return policies


def apply_uncertainty(raw: np.ndarray, policies: Mapping[str, str], labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """CheXpert values (1, 0, -1, NaN = not mentioned) -> (labels, mask) under per-finding policies.

    Not mentioned counts as negative (CheXpert convention).  Uncertain (-1):
    U-Ignore masks it out of the loss and the metrics, U-Zeros makes it 0,
    U-Ones makes it 1.
    """
    raw = np.asarray(raw, dtype=np.float64)
    values = np.where(np.isnan(raw), 0.0, raw)
    if not np.isin(values, (-1.0, 0.0, 1.0)).all():
        raise ModelError("CheXpert labels must be 1, 0, -1 or empty")
    out = np.clip(values, 0.0, 1.0).astype(np.float32)
    mask = np.ones_like(out)
    for j, name in enumerate(labels):
        unc = values[:, j] == -1.0
        policy = policies.get(name, "ignore")
        if policy == "ignore":
            mask[unc, j] = 0.0
        elif policy == "ones":
            out[unc, j] = 1.0
        elif policy == "zeros":
            out[unc, j] = 0.0
        else:
            raise ModelError(f"unknown uncertainty policy {policy!r} for {name}")
    return out, mask


def _chexpert_patient(path_text: str) -> str:
    m = re.search(r"(patient\d+)", path_text)
    return m.group(1) if m else path_text


def _resolve_chexpert_path(data_dir: Path, text: str) -> Path:
    rel = Path(text)
    for candidate in (data_dir / rel, data_dir.parent / rel, data_dir / Path(*rel.parts[1:]) if len(rel.parts) > 1 else None):
        if candidate is not None and candidate.exists():
            return candidate
    return data_dir / Path(*rel.parts[1:]) if len(rel.parts) > 1 else data_dir / rel


def read_chexpert_csv(
    path: str | Path, data_dir: str | Path | None = None, *, uncertainty: str | Mapping[str, str] | None = "ignore",
    frontal_only: bool = True,
) -> LabelledSet:
    """Parse a CheXpert ``train.csv``/``valid.csv``; labels under the given uncertainty policies."""
    path = Path(path)
    data_dir = Path(data_dir) if data_dir is not None else path.parent
    policies = parse_uncertainty(uncertainty)
    with _csv(path) as (header, reader):
        c_path = _column(header, "Path", path=path)
        cols = [_column(header, c, path=path) for c in CHEXPERT_COLUMNS]
        c_front = _optional_column(header, "Frontal/Lateral")
        c_sex, c_age, c_view = (_optional_column(header, c) for c in ("Sex", "Age", "AP/PA"))
        rows = []
        for lineno, row in enumerate(reader, start=2):
            if not row or not any(row):
                continue
            if frontal_only and c_front is not None and row[c_front].strip().lower() == "lateral":
                continue
            values = []
            for c in cols:
                text = row[c].strip() if c < len(row) else ""
                try:
                    values.append(float(text) if text else np.nan)
                except ValueError:
                    raise ModelError(f"{path}:{lineno}: label {text!r} is not 1, 0, -1 or empty") from None
            cell = lambda c: row[c] if c is not None and c < len(row) else ""  # noqa: E731
            rows.append((row[c_path].strip(), values,
                         ImageMetadata(parse_age_years(cell(c_age)), cell(c_sex), cell(c_view))))
    if not rows:
        raise ModelError(f"{path}: no images")
    raw = np.asarray([v for _, v, _ in rows], dtype=np.float64)
    labels, mask = apply_uncertainty(raw, policies, CHEXPERT_LABELS)
    return LabelledSet(
        CHEXPERT_LABELS,
        tuple(_resolve_chexpert_path(data_dir, p) for p, _, _ in rows),
        tuple(_chexpert_patient(p) for p, _, _ in rows),
        labels, mask,
        names=tuple(p for p, _, _ in rows),
        meta={"dataset": "chexpert", "uncertainty": policies},
        metadata=tuple(m for _, _, m in rows),
    )


def split_chexpert(data_dir: str | Path, *, uncertainty: str | Mapping[str, str] | None, seed: int) -> dict[str, LabelledSet]:
    """train.csv minus 10% of its patients -> train/val; valid.csv (radiologist consensus) -> test."""
    data_dir = Path(data_dir)
    train_csv = _find_file(data_dir, "train.csv") or _find_file(data_dir, "*/train.csv")
    valid_csv = _find_file(data_dir, "valid.csv") or _find_file(data_dir, "*/valid.csv")
    if train_csv is None or valid_csv is None:
        raise ModelError(f"{data_dir}: CheXpert needs train.csv and valid.csv")
    train_all = read_chexpert_csv(train_csv, data_dir, uncertainty=uncertainty)
    test = read_chexpert_csv(valid_csv, data_dir, uncertainty="zeros")  # valid.csv has no uncertain labels
    tr, va = patient_split(train_all.patients, (1.0 - OFFICIAL_VAL_FRACTION, OFFICIAL_VAL_FRACTION), seed)
    return {"train": train_all.subset(tr), "val": train_all.subset(va), "test": test}


def load_splits(
    dataset: str, data_dir: str | Path, *, scheme: str = "official", seed: int = 0,
    uncertainty: str | Mapping[str, str] | None = "ignore",
) -> tuple[dict[str, LabelledSet], list[Box]]:
    """Train/val/test sets of a data directory and its boxes (ChestX-ray14 only)."""
    if dataset == "chestxray14":
        ds, boxes = load_chestxray14(data_dir)
        return split_chestxray14(ds, data_dir, scheme, seed), boxes
    if dataset == "chexpert":
        return split_chexpert(data_dir, uncertainty=uncertainty, seed=seed), []
    raise ModelError(f"dataset must be one of {DATASETS}, got {dataset!r}")
