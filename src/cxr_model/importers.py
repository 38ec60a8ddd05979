"""Import DenseNet121 checkpoints from other projects into a model directory.

Supported sources (state dicts only; loaded with ``torch.load(weights_only=True)``):

``chexnet``
    CheXNet re-implementations (e.g. arnoweng/CheXNet ``model.pth.tar``):
    legacy torchvision names ``module.densenet121.features...norm.1.weight``,
    classifier ``module.densenet121.classifier.0.{weight,bias}`` with 14
    outputs in ChestX-ray14 order; 3 channels, ImageNet normalisation.
``torchxrayvision``
    torchxrayvision DenseNet121 (``features...norm1.weight``, ``classifier``
    with 18 outputs in xrv's pathology order); outputs are mapped to ours by
    *name*, the four extra outputs are dropped; 1 channel, "xrv" normalisation.
    An ``op_threshs`` tensor, if present, becomes the operating thresholds.
    xrv ships pickled whole models: save ``model.state_dict()`` first.
``torchvision``
    ImageNet DenseNet121 (``features...``, ``classifier`` with 1000 outputs):
    backbone only; the 14-output head is freshly initialised (seeded), so the
    card is marked demo/untrained-head until the model is trained.

Every source tensor must be consumed exactly once and every target tensor
filled exactly once, otherwise the import fails naming the keys.  The only
exceptions, both explicit: ``num_batches_tracked`` counters absent from old
checkpoints are filled with 0 (they do not affect inference), and the
torchvision ImageNet classifier is discarded on purpose.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch

from .card import ModelCard, sha256_file
from .errors import ModelError
from .labels import FINDINGS
from .network import CLASSIFIER_BIAS, CLASSIFIER_WEIGHT, build_network
from .store import write_model_dir

log = logging.getLogger(__name__)

Source = Literal["chexnet", "torchxrayvision", "torchvision"]
SOURCES: tuple[str, ...] = ("chexnet", "torchxrayvision", "torchvision")

#: torchxrayvision's DenseNet pathology order (xrv.datasets.default_pathologies).
XRV_LABELS: tuple[str, ...] = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
    "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
    "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)
#: CheXNet (Rajpurkar et al. 2017; arnoweng/CheXNet CLASS_NAMES) uses the ChestX-ray14 order.
CHEXNET_LABELS: tuple[str, ...] = FINDINGS

_SOURCE_SETTINGS = {
    "chexnet": {"in_channels": 3, "normalization": "imagenet", "input_size": 224},
    "torchxrayvision": {"in_channels": 1, "normalization": "xrv", "input_size": 224},
    "torchvision": {"in_channels": 3, "normalization": "imagenet", "input_size": 224},
}

# torchvision (new and legacy "norm.1") dense-layer names -> MONAI's ".layers." names.
_DENSE_LAYER = re.compile(
    r"^features\.(denseblock\d+\.denselayer\d+)\.(norm|relu|conv)\.?([12])\.(weight|bias|running_mean|running_var|num_batches_tracked)$"
)
_PREFIXES = ("module.", "densenet121.", "model.")


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(
            f"{path} is not a state dict of tensors (nor a checkpoint with a 'state_dict' entry); "
            "for a pickled whole model, save model.state_dict() first"
        )
    return dict(obj)


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _target_name(key: str) -> str:
    """Map a torchvision-style DenseNet121 key (prefixes already stripped) to MONAI's name."""
    m = _DENSE_LAYER.match(key)
    if m:
        block, kind, idx, param = m.groups()
        return f"features.{block}.layers.{kind}{idx}.{param}"
    if key.startswith("classifier."):
        rest = key[len("classifier."):]
        rest = rest[2:] if rest.startswith("0.") else rest  # CheXNet: Sequential(Linear, Sigmoid)
        return f"class_layers.out.{rest}"
    return key  # features.conv0 / norm0 / transitionN / norm5 keep their names


def _map_state_dict(source: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename every source tensor; fail loudly on leftovers, duplicates, shape mismatches or missing keys."""
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    leftovers, shape_errors, notes = [], [], []
    for key, value in source.items():
        name = _target_name(_strip_prefixes(key))
        if name in origin:
            raise ModelError(f"source keys {origin[name]!r} and {key!r} both map to {name!r}")
        if name not in target:
            leftovers.append(key)
            continue
        if tuple(value.shape) != tuple(target[name].shape):
            shape_errors.append(f"{key} {tuple(value.shape)} -> {name} {tuple(target[name].shape)}")
            continue
        mapped[name], origin[name] = value, key
    missing = [k for k in target if k not in mapped]
    nbt = [k for k in missing if k.endswith("num_batches_tracked")]
    if nbt and len(nbt) == len(missing):
        for k in nbt:
            mapped[k] = torch.zeros_like(target[k])
        notes.append(f"filled {len(nbt)} num_batches_tracked counters absent from the checkpoint with 0")
        missing = []
    problems = []
    if leftovers:
        problems.append(f"{len(leftovers)} unused source tensor(s): {leftovers[:10]}{' ...' if len(leftovers) > 10 else ''}")
    if missing:
        problems.append(f"{len(missing)} target tensor(s) not provided: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if shape_errors:
        problems.append(f"shape mismatch: {shape_errors[:10]}")
    if problems:
        raise ModelError("checkpoint does not map exactly onto monai DenseNet121: " + "; ".join(problems))
    return mapped, notes


def import_checkpoint(
    source: Source,
    checkpoint_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    name: str | None = None,
    version: str | None = None,
) -> ModelCard:
    """Convert a checkpoint into a model directory (float32 MONAI state dict + model card)."""
    if source not in SOURCES:
        raise ModelError(f"unknown checkpoint source {source!r}; expected one of {SOURCES}")
    path = Path(checkpoint_path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"checkpoint not found: {path}") from None
    except Exception as exc:
        raise ModelError(
            f"cannot load {path} with weights_only=True ({exc}); only plain state dicts are accepted"
        ) from exc
    state = _unwrap(obj, path)
    src_sha = sha256_file(path)
    settings = _SOURCE_SETTINGS[source]
    notes: list[str] = []
    thresholds = {f: 0.5 for f in FINDINGS}

    if source == "torchxrayvision" and "op_threshs" in state:
        op = state.pop("op_threshs").float().flatten()
        if op.numel() != len(XRV_LABELS):
            raise ModelError(f"op_threshs has {op.numel()} entries, expected {len(XRV_LABELS)}")
        for f in FINDINGS:
            t = float(op[XRV_LABELS.index(f)])
            if 0.0 < t < 1.0:
                thresholds[f] = t
        notes.append("operating thresholds taken from the checkpoint's op_threshs")
    head_keys = {k: _target_name(_strip_prefixes(k)) for k in state}
    src_w_key = next((k for k, v in head_keys.items() if v == CLASSIFIER_WEIGHT), None)
    src_b_key = next((k for k, v in head_keys.items() if v == CLASSIFIER_BIAS), None)
    if src_w_key is None or src_b_key is None:
        raise ModelError(f"{path}: no classifier weight/bias found (keys ending in classifier[.0].weight/bias)")
    head_w, head_b = state[src_w_key].float(), state[src_b_key].float()

    conv0 = state.get(next((k for k, v in head_keys.items() if v == "features.conv0.weight"), ""), None)
    if conv0 is None:
        raise ModelError(f"{path}: no features.conv0.weight; not a DenseNet121 checkpoint")
    if conv0.shape[1] != settings["in_channels"]:
        raise ModelError(
            f"{path}: first convolution takes {conv0.shape[1]} channel(s) but {source} checkpoints take "
            f"{settings['in_channels']}"
        )

    torch.manual_seed(0)  # only the torchvision case initialises anything fresh
    target_net = build_network(settings["in_channels"], len(FINDINGS))
    target = target_net.state_dict()

    if source == "chexnet":
        source_labels = CHEXNET_LABELS
    elif source == "torchxrayvision":
        source_labels = XRV_LABELS
    else:
        source_labels = ()
    if source_labels:
        if head_w.shape[0] != len(source_labels) or head_b.shape[0] != len(source_labels):
            raise ModelError(
                f"label mismatch: {source} classifier has {head_w.shape[0]} outputs, expected "
                f"{len(source_labels)} ({', '.join(source_labels)})"
            )
        rows = [source_labels.index(f) for f in FINDINGS]  # by name, never by position
        dropped = [label for label in source_labels if label not in FINDINGS]
        if dropped:
            notes.append(f"dropped source outputs not in ChestX-ray14: {dropped}")
        state[src_w_key] = head_w[rows].contiguous()
        state[src_b_key] = head_b[rows].contiguous()
    else:  # torchvision: keep the backbone, replace the ImageNet head explicitly
        if head_w.shape[0] != 1000:
            raise ModelError(f"label mismatch: torchvision ImageNet classifier should have 1000 outputs, has {head_w.shape[0]}")
        del state[src_w_key], state[src_b_key]
        state["class_layers.out.weight"] = target[CLASSIFIER_WEIGHT].clone()
        state["class_layers.out.bias"] = target[CLASSIFIER_BIAS].clone()
        notes.append("ImageNet classifier discarded; 14-output head freshly initialised (seed 0), UNTRAINED")
    mapped, map_notes = _map_state_dict(state, target)
    notes += map_notes
    mapped = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in mapped.items()}
    target_net.load_state_dict(mapped, strict=True)  # belt and braces: MONAI agrees with the mapping

    untrained = source == "torchvision"
    intended = (
        f"Imported from a {source} checkpoint ({path.name}). Not validated in this installation: "
        "NOT FOR DIAGNOSTIC USE until evaluated on local data and approved."
    )
    if untrained:
        intended = (
            "UNTRAINED HEAD: ImageNet DenseNet121 backbone with a randomly initialised 14-finding classifier. "
            "Outputs are meaningless until the model is trained; NOT FOR DIAGNOSTIC USE. "
        ) + intended
    for note in notes:
        log.info("import %s: %s", path.name, note)
    return write_model_dir(
        out_dir,
        mapped,
        name=name or f"{source}-densenet121",
        version=version or f"imported-{src_sha[:12]}",
        labels=FINDINGS,
        input_size=settings["input_size"],
        in_channels=settings["in_channels"],
        normalization=settings["normalization"],
        thresholds=thresholds,
        calibration={},
        evaluation={},
        intended_use=intended,
        demo=untrained,
        provenance={
            "importer": "cxr_model.importers.import_checkpoint",
            "source": source,
            "checkpoint": path.name,
            "checkpoint_sha256": src_sha,
            "untrained_head": untrained,
            "notes": notes,
        },
    )
