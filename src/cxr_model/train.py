"""Training a DenseNet121 on ChestX-ray14 or CheXpert into a model directory the service loads.

The protocol follows CheXNet (Rajpurkar et al. 2017): DenseNet121, Adam
(lr 1e-3, betas 0.9/0.999), per-class weighted BCE, the model kept from the
epoch with the best validation mean AUROC.  Inputs are prepared with the very
:func:`cxr_model.preprocess.preprocess` used at inference, so training and
serving see the same pixels.

Every epoch writes ``checkpoint.pt`` (weights, optimiser, history) in the
output directory; ``resume=True`` continues from it.  Shuffling and
augmentation use generators seeded with (seed, epoch), so a resumed run is
identical to an uninterrupted one; on CPU the run is deterministic
(``torch.use_deterministic_algorithms``) and uses no loader workers.  On CUDA
it uses AMP and loader workers.

With ``metadata=True`` the network also takes each image's age, sex and view
position (:mod:`cxr_model.metadata`; read from the data set's CSV, unknown
values encoded as missing) through a linear layer beside the classifier; the
card records the encoding.  Off by default.
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .card import ModelCard, load_card, write_bytes_atomic
from .datasets import DATASETS, SPLIT_SCHEMES, LabelledSet, load_splits
from .errors import ModelError
from .image_io import load_image_file
from .losses import LOSSES, class_weights, focal_loss, masked_bce
from .metadata import FEATURES as METADATA_FEATURES
from .metadata import card_entry as metadata_card_entry
from .metrics import auroc
from .network import METADATA_WEIGHT, build_network, load_network
from .phantoms import PHANTOM_NOTE, read_manifest
from .preprocess import preprocess
from .store import write_model_dir

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "train_history.json"
NORMALIZATION = "imagenet"  # 3 channels: matches torchvision / CheXNet initialisations
IN_CHANNELS = 3


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (recorded in the card's provenance)."""

    dataset: str
    data_dir: str
    out_dir: str
    split: str = "official"
    image_size: int = 224
    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-3
    loss: str = "weighted-bce"
    focal_gamma: float = 2.0
    init: str | None = None
    seed: int = 0
    resume: bool = False
    uncertainty: str = "ignore"
    augment: bool = True
    device: str | None = None
    workers: int | None = None
    amp: bool | None = None
    name: str | None = None
    version: str | None = None
    max_train_images: int | None = None
    #: also feed age, sex and view position (cxr_model.metadata) to the classifier.
    metadata: bool = False

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ModelError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.split not in SPLIT_SCHEMES:
            raise ModelError(f"split must be one of {SPLIT_SCHEMES}, got {self.split!r}")
        if self.loss not in LOSSES:
            raise ModelError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not 32 <= self.image_size <= 4096:
            raise ModelError(f"image_size must be in [32, 4096], got {self.image_size}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ModelError("epochs, batch_size and lr must be positive")
        if self.init is not None and not (self.init.startswith("torchvision:") or self.init.startswith("model:")):
            raise ModelError(f"init must be 'torchvision:PATH' or 'model:DIR', got {self.init!r}")


class ImageSet(Dataset):
    """(C, S, S) network inputs, labels and masks of a :class:`LabelledSet`, read lazily; for a card that
    takes metadata also the image's metadata vector, as a fourth item."""

    def __init__(self, data: LabelledSet, card: ModelCard):
        self.data, self.card = data, card
        self.metadata = data.metadata_matrix() if card.takes_metadata else None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        image = load_image_file(self.data.paths[i])
        x, _ = preprocess(image, self.card)
        item = (torch.from_numpy(x), torch.from_numpy(self.data.labels[i]), torch.from_numpy(self.data.mask[i]))
        if self.metadata is not None:
            item += (torch.from_numpy(self.metadata[i]),)
        return item


def forward(net: torch.nn.Module, x: torch.Tensor, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Logits of an :class:`ImageSet` batch (``x`` = its images, possibly augmented and moved)."""
    if len(batch) > 3:
        return net(x, batch[3].to(x.device, non_blocking=True))
    return net(x)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random affine per image (scale 0.9-1.1, shift +-5%, rotation +-5 degrees); no flips
    (the heart is on the left)."""
    b = x.shape[0]
    u = torch.rand(b, 4, generator=gen)
    scale = 0.9 + 0.2 * u[:, 0]
    angle = (u[:, 1] - 0.5) * (10.0 * math.pi / 180.0)
    tx, ty = (u[:, 2] - 0.5) * 0.1, (u[:, 3] - 0.5) * 0.1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _card_template(cfg: TrainConfig, labels: tuple[str, ...], phantom: bool) -> dict[str, Any]:
    intended = (
        f"DenseNet121 trained with cxr_model.train on {cfg.dataset} ({cfg.split} split). Not validated in this "
        "installation: NOT FOR DIAGNOSTIC USE until evaluated on local data and approved. Operating thresholds are "
        "0.5 placeholders until 'cxr-triage model calibrate' sets them."
    )
    if phantom:
        intended = (
            f"PIPELINE TEST, NOT CLINICAL: trained on SYNTHETIC PHANTOMS ({PHANTOM_NOTE}). "
            "It has never seen a radiograph; NOT FOR DIAGNOSTIC USE. " + intended
        )
    return {
        "name": cfg.name or f"densenet121-{cfg.dataset}{'-phantoms' if phantom else ''}",
        "version": cfg.version or f"trained-seed{cfg.seed}-{cfg.image_size}px",
        "labels": labels,
        "input_size": cfg.image_size,
        "in_channels": IN_CHANNELS,
        "normalization": NORMALIZATION,
        "thresholds": {label: 0.5 for label in labels},
        "calibration": {},
        "intended_use": intended,
        "demo": False,
        "metadata_inputs": metadata_card_entry() if cfg.metadata else {},
    }


def _initial_state(cfg: TrainConfig, labels: tuple[str, ...], scratch: Path) -> tuple[dict[str, torch.Tensor], str]:
    torch.manual_seed(cfg.seed)
    net = build_network(IN_CHANNELS, len(labels), _metadata_features(cfg))
    if cfg.init is None:
        return net.state_dict(), f"random (torch.manual_seed({cfg.seed}))"
    kind, _, where = cfg.init.partition(":")
    if kind == "torchvision":
        from .importers import import_checkpoint

        card = import_checkpoint("torchvision", where, scratch)
        src_dir = scratch
    else:
        src_dir, card = Path(where), load_card(where)
    if card.in_channels != IN_CHANNELS:
        raise ModelError(f"init model takes {card.in_channels} channel(s); training uses {IN_CHANNELS} (imagenet)")
    state = load_network(src_dir, card).state_dict()
    fresh = net.state_dict()
    if tuple(card.labels) != tuple(labels):  # keep the backbone, fresh head for another label set
        state["class_layers.out.weight"] = fresh["class_layers.out.weight"]
        state["class_layers.out.bias"] = fresh["class_layers.out.bias"]
        state.pop(METADATA_WEIGHT, None)
    if METADATA_WEIGHT in fresh:  # an image-only init: metadata weights start at zero (the init's outputs)
        state.setdefault(METADATA_WEIGHT, fresh[METADATA_WEIGHT])
    else:
        state.pop(METADATA_WEIGHT, None)
    return state, f"{cfg.init} (sha256 {card.weights_sha256})"


def _metadata_features(cfg: TrainConfig) -> int:
    return len(METADATA_FEATURES) if cfg.metadata else 0


def _loss_fn(cfg: TrainConfig, train: LabelledSet, device: torch.device) -> Callable[..., torch.Tensor]:
    if cfg.loss == "bce":
        return lambda z, y, m: masked_bce(z, y, m)
    if cfg.loss == "focal":
        return lambda z, y, m: focal_loss(z, y, m, gamma=cfg.focal_gamma)
    w_pos, w_neg = class_weights(train.positives(), train.negatives())
    wp, wn = torch.from_numpy(w_pos).to(device), torch.from_numpy(w_neg).to(device)
    return lambda z, y, m: masked_bce(z, y, m, wp, wn)


class Progress:
    """A one-line progress bar with the running loss (redrawn on a terminal, sparse lines otherwise)."""

    def __init__(self, stream: TextIO, total: int, prefix: str):
        self.stream, self.total, self.prefix = stream, max(total, 1), prefix
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.start, self.last_pct = time.perf_counter(), -1

    def update(self, done: int, loss: float) -> None:
        pct = int(100 * done / self.total)
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        bar = "#" * (pct // 5) + "-" * (20 - pct // 5)
        line = f"{self.prefix} [{bar}] {done}/{self.total} loss {loss:.4f} {rate:.1f} img/s"
        if self.tty:
            self.stream.write("\r" + line)
        elif pct // 25 != self.last_pct // 25 or done == self.total:
            self.stream.write(line + "\n")
        self.last_pct = pct
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


@torch.no_grad()
def predict_logits(net: torch.nn.Module, loader: DataLoader, device: torch.device, amp: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Logits of every image the loader yields; ``progress(done, total)`` after each batch."""
    net.eval()
    out = []
    done, total = 0, len(loader.dataset) if hasattr(loader, "dataset") else 0
    for batch in loader:
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            out.append(forward(net, batch[0].to(device, non_blocking=True), batch).float().cpu())
        done += len(batch[0])
        if progress is not None:
            progress(done, total)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def per_label_auroc(data: LabelledSet, scores: np.ndarray) -> dict[str, float | None]:
    res = {}
    for j, label in enumerate(data.labels_names):
        keep = data.mask[:, j] > 0
        res[label] = auroc(data.labels[keep, j], scores[keep, j]) if keep.any() else None
    return res


def mean_defined(values: dict[str, float | None]) -> float | None:
    defined = [v for v in values.values() if v is not None]
    return float(np.mean(defined)) if defined else None


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes_atomic(path, buf.getvalue())


def train(cfg: TrainConfig, *, stream: TextIO | None = None) -> dict[str, Any]:
    """Run the training; return a summary (also in ``train_history.json``).  The model directory is
    rewritten whenever validation mean AUROC improves."""
    stream = stream or sys.stderr
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(cfg.data_dir)
    phantom = manifest is not None
    if phantom:
        stream.write(f"*** {PHANTOM_NOTE} ***\n")
    device = _device(cfg)
    cuda = device.type == "cuda"
    amp = cuda if cfg.amp is None else (cfg.amp and cuda)
    workers = cfg.workers if cfg.workers is not None else (min(8, torch.get_num_threads()) if cuda else 0)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if not cuda:
        torch.use_deterministic_algorithms(True)
    try:
        splits, _ = load_splits(cfg.dataset, cfg.data_dir, scheme=cfg.split, seed=cfg.seed, uncertainty=cfg.uncertainty)
        train_set, val_set = splits["train"], splits["val"]
        if cfg.max_train_images is not None and len(train_set) > cfg.max_train_images:
            train_set = train_set.subset(np.arange(cfg.max_train_images))
        if len(train_set) == 0 or len(val_set) == 0:
            raise ModelError(f"empty split: {len(train_set)} training and {len(val_set)} validation images")
        labels = train_set.labels_names
        template = _card_template(cfg, labels, phantom)
        # A card with placeholder hash, only to drive preprocessing (input size, normalisation).
        prep_card = ModelCard(weights_file="weights.pt", weights_sha256="0" * 64, evaluation={}, **template)
        ckpt_path = out / CHECKPOINT_FILE
        start_epoch, history, best = 1, [], {"epoch": None, "val_mean_auroc": None}
        if cfg.metadata and not train_set.metadata:
            stream.write("--metadata: the data set has no age/sex/view columns; every image counts as unknown\n")
        torch.manual_seed(cfg.seed)
        net = build_network(IN_CHANNELS, len(labels), _metadata_features(cfg))
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
        if cfg.resume and ckpt_path.is_file():
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            if tuple(ckpt["labels"]) != tuple(labels):
                raise ModelError(f"checkpoint {ckpt_path} was trained on other labels")
            if bool(ckpt.get("metadata", False)) != cfg.metadata:
                raise ModelError(f"checkpoint {ckpt_path} was trained {'with' if ckpt.get('metadata') else 'without'} "
                                 "--metadata; resume it the same way")
            net.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            start_epoch, history, best = int(ckpt["epoch"]) + 1, list(ckpt["history"]), dict(ckpt["best"])
            init_note = str(ckpt["init"])
            stream.write(f"resuming from {ckpt_path} after epoch {ckpt['epoch']}\n")
        else:
            if cfg.resume:
                stream.write(f"no {CHECKPOINT_FILE} in {out}: starting from scratch\n")
            state, init_note = _initial_state(cfg, labels, out / ".init")
            net.load_state_dict(state)
        net.to(device)
        for st in opt.state.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    st[k] = v.to(device)
        loss_fn = _loss_fn(cfg, train_set, device)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        val_loader = DataLoader(ImageSet(val_set, prep_card), batch_size=cfg.batch_size, shuffle=False,
                                num_workers=workers, pin_memory=cuda)
        stream.write(
            f"training {template['name']} on {cfg.dataset} ({cfg.split} split): {len(train_set)} train / "
            f"{len(val_set)} val images, {cfg.image_size} px, loss {cfg.loss}, device {device}"
            f"{' (AMP)' if amp else ''}, seed {cfg.seed}{', metadata inputs (age, sex, view)' if cfg.metadata else ''}\n"
        )
        for epoch in range(start_epoch, cfg.epochs + 1):
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            loader = DataLoader(ImageSet(train_set, prep_card), batch_size=cfg.batch_size, shuffle=True,
                                generator=gen, num_workers=workers, pin_memory=cuda, drop_last=False,
                                persistent_workers=False)
            aug_gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch + 7919)
            net.train()
            bar = Progress(stream, len(train_set), f"epoch {epoch}/{cfg.epochs}")
            t0, seen, loss_sum = time.perf_counter(), 0, 0.0
            for batch in loader:
                x, y, m = batch[:3]
                if cfg.augment:
                    x = augment(x, aug_gen)
                x, y, m = x.to(device, non_blocking=True), y.to(device), m.to(device)
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                    logits = forward(net, x, batch)
                loss = loss_fn(logits.float(), y, m)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                seen += x.shape[0]
                loss_sum += float(loss.detach()) * x.shape[0]
                bar.update(seen, loss_sum / seen)
            bar.close()
            if cuda:
                torch.cuda.synchronize()
            train_seconds = time.perf_counter() - t0
            val_logits = predict_logits(net, val_loader, device, amp)
            with torch.no_grad():
                val_loss = float(loss_fn(torch.from_numpy(val_logits).to(device), torch.from_numpy(val_set.labels).to(device),
                                         torch.from_numpy(val_set.mask).to(device)))
            val_auc = per_label_auroc(val_set, val_logits)
            val_mean = mean_defined(val_auc)
            record = {
                "epoch": epoch, "train_loss": loss_sum / max(seen, 1), "val_loss": val_loss,
                "val_mean_auroc": val_mean, "val_auroc": val_auc, "train_seconds": train_seconds,
                "images_per_second": seen / max(train_seconds, 1e-9),
            }
            history.append(record)
            mean_txt = "n/a" if val_mean is None else f"{val_mean:.4f}"
            stream.write(
                f"epoch {epoch}/{cfg.epochs}: train loss {record['train_loss']:.4f}, val loss {val_loss:.4f}, "
                f"val mean AUROC {mean_txt}, {train_seconds:.1f} s ({record['images_per_second']:.1f} images/s)\n"
            )
            improved = best["epoch"] is None or (
                val_mean is not None and (best["val_mean_auroc"] is None or val_mean > best["val_mean_auroc"])
            )
            if improved:
                best = {"epoch": epoch, "val_mean_auroc": val_mean}
                _write_model(out, net, template, cfg, record, init_note, phantom, len(train_set), len(val_set))
            state_cpu = {k: v.detach().cpu() for k, v in net.state_dict().items()}
            _save_checkpoint(ckpt_path, {
                "epoch": epoch, "model": state_cpu, "optimizer": _optimizer_cpu(opt), "history": history,
                "best": best, "labels": list(labels), "init": init_note, "metadata": cfg.metadata,
            })
        summary = {
            "note": PHANTOM_NOTE if phantom else None,
            "config": asdict(cfg), "best": best, "history": history, "model_dir": str(out),
        }
        (out / HISTORY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if phantom:
            stream.write(f"*** {PHANTOM_NOTE} ***\n")
        return summary
    finally:
        torch.use_deterministic_algorithms(deterministic_before)


def _optimizer_cpu(opt: torch.optim.Optimizer) -> dict[str, Any]:
    sd = opt.state_dict()
    return {
        "state": {k: {n: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for n, v in s.items()}
                  for k, s in sd["state"].items()},
        "param_groups": sd["param_groups"],
    }


def _write_model(out: Path, net: torch.nn.Module, template: dict[str, Any], cfg: TrainConfig, record: dict[str, Any],
                 init_note: str, phantom: bool, n_train: int, n_val: int) -> ModelCard:
    evaluation = {
        "dataset": cfg.dataset, "split": cfg.split, "selected_on": "validation mean AUROC",
        "epoch": record["epoch"], "val_mean_auroc": record["val_mean_auroc"], "val_auroc": record["val_auroc"],
        "n_train": n_train, "n_val": n_val,
    }
    if phantom:
        evaluation["note"] = PHANTOM_NOTE
    provenance = {
        "trainer": "cxr_model.train.train", "init": init_note, "torch": torch.__version__.split("+")[0],
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "resume")},
        "synthetic_phantoms": phantom,
        "thresholds": "0.5 placeholders: run 'cxr-triage model calibrate' to set operating points",
    }
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return write_model_dir(out, state, evaluation=evaluation, provenance=provenance, **template)
