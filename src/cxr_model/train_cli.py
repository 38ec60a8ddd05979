"""Dispatch for ``cxr-triage model train | evaluate | calibrate | make-phantoms``.

The project's CLI parses the arguments (without importing torch, so that
its other commands start fast) and calls :func:`run`; the work is done by
:mod:`cxr_model.train`, :mod:`cxr_model.evaluate` and :mod:`cxr_model.phantoms`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from .errors import ModelError

COMMANDS = ("train", "evaluate", "calibrate", "make-phantoms")


def run(args: argparse.Namespace, stream: TextIO | None = None) -> int:
    """Execute one of :data:`COMMANDS`; ModelError becomes a message and exit status 2."""
    stream = stream or sys.stdout
    try:
        return _run(args, stream)
    except ModelError as exc:
        print(f"cxr-triage model {args.model_command}: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, stream: TextIO) -> int:
    cmd = args.model_command
    if cmd == "make-phantoms":
        from .phantoms import PhantomSpec, make_phantoms

        m = make_phantoms(args.out, PhantomSpec(n=args.n, size=args.size, seed=args.seed, prevalence=args.prevalence))
        stream.write(f"wrote {m['n']} phantoms of {m['size']} px to {args.out} ({m['train_val_images']} train_val, "
                     f"{m['test_images']} test, {m['boxes']} boxes)\n*** {m['note']} ***\n")
        return 0
    if cmd == "train":
        from .train import TrainConfig, train

        cfg = TrainConfig(
            dataset=args.dataset, data_dir=str(args.data_dir), out_dir=str(args.out), split=args.split,
            image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, loss=args.loss,
            focal_gamma=args.focal_gamma, init=args.init, seed=args.seed, resume=args.resume,
            uncertainty=args.uncertainty, augment=args.augment, device=args.device, workers=args.workers,
            amp=args.amp, name=args.name, version=args.version, metadata=args.metadata,
        )
        summary = train(cfg, stream=stream)
        best = summary["best"]
        score = best["val_mean_auroc"]
        stream.write(f"model directory {args.out}: epoch {best['epoch']} kept (val mean AUROC "
                     f"{'n/a' if score is None else f'{score:.4f}'})\n")
        if summary.get("note"):
            stream.write(f"*** {summary['note']} ***\n")
        return 0
    if cmd == "evaluate":
        from .evaluate import evaluate

        evaluate(args.model_dir, args.dataset, args.data_dir, args.out, split=args.split, scheme=args.scheme, seed=args.seed,
                 uncertainty=args.uncertainty, n_boot=args.bootstrap, batch_size=args.batch_size, device=args.device,
                 stream=stream, progress=getattr(args, "on_progress", None))
        stream.write(f"wrote {Path(args.out) / 'metrics.json'}, roc.png, reliability.png\n")
        return 0
    if cmd == "calibrate":
        from .evaluate import calibrate

        card = calibrate(args.model_dir, args.dataset, args.data_dir, split=args.split, scheme=args.scheme, seed=args.seed,
                         uncertainty=args.uncertainty, specificity=args.specificity, method=args.method,
                         batch_size=args.batch_size, device=args.device, stream=stream,
                         progress=getattr(args, "on_progress", None), warn=getattr(args, "on_warning", None))
        fitted = "temperatures" if args.method == "temperature" else "Platt parameters (a, b)"
        stream.write(f"wrote thresholds and {fitted} into {Path(args.model_dir) / 'model_card.json'} "
                     f"({card.name} {card.version}; weights unchanged, sha256 {card.weights_sha256})\n")
        return 0
    raise ModelError(f"unknown model command {cmd!r}")
