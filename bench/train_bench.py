"""Train and evaluate a DenseNet121 on synthetic phantoms; print timing, AUROC and localisation numbers.

    python bench/train_bench.py                       # 800 phantoms, 224 px, 3 epochs (CPU: tens of minutes)
    python bench/train_bench.py --n 480 --image-size 64 --epochs 4 --json
    python bench/train_bench.py --epochs 1            # on a GPU: one epoch with AMP, images/s

Synthetic phantoms: tests of the pipeline, not clinical claims.  The
localisation numbers are printed beside a random-map control.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from cxr_model.evaluate import evaluate
from cxr_model.phantoms import PHANTOM_NOTE, PhantomSpec, make_phantoms
from cxr_model.train import TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=800, help="phantom images")
    ap.add_argument("--size", type=int, default=None, help="phantom side in pixels (default: --image-size)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--work-dir", type=Path, default=None, help="keep phantoms, model and report here")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="cxr-train-bench-"))
    data, model, report = work / "phantoms", work / "model", work / "report"
    quiet = io.StringIO() if args.json else sys.stderr
    t0 = time.perf_counter()
    make_phantoms(data, PhantomSpec(n=args.n, size=args.size or args.image_size, seed=args.seed))
    t_data = time.perf_counter() - t0
    summary = train(TrainConfig(dataset="chestxray14", data_dir=str(data), out_dir=str(model), image_size=args.image_size,
                                epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device=args.device),
                    stream=quiet)
    t1 = time.perf_counter()
    metrics = evaluate(model, "chestxray14", data, report, n_boot=args.bootstrap, device=args.device,
                       stream=quiet if args.json else sys.stdout)
    t_eval = time.perf_counter() - t1
    loc = metrics.get("localization") or {}
    result = {
        "notice": PHANTOM_NOTE,
        "machine": {"device": str(args.device or ("cuda" if torch.cuda.is_available() else "cpu")),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "cpu_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "setup": {"phantoms": args.n, "image_size": args.image_size, "epochs": args.epochs, "batch_size": args.batch_size,
                  "seed": args.seed, "train_val_images": len((data / "train_val_list.txt").read_text().split()),
                  "test_images": metrics["data"]["images"]},
        "seconds": {"make_phantoms": t_data, "evaluate": t_eval,
                    "per_epoch": [h["train_seconds"] for h in summary["history"]]},
        "images_per_second": [h["images_per_second"] for h in summary["history"]],
        "val_mean_auroc": [h["val_mean_auroc"] for h in summary["history"]],
        "test_mean_auroc": metrics["mean_auroc"],
        "test_auroc": {k: v for k, v in metrics["auroc"].items() if v is not None},
        "pointing_game": loc.get("pointing_game"),
        "random_pointing_game": loc.get("random_pointing_game"),
        "iobb": loc.get("iobb"),
        "random_iobb": loc.get("random_iobb"),
        "boxes": loc.get("boxes"),
        "mean_box_area_fraction": loc.get("mean_box_area_fraction"),
        "work_dir": str(work),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"\n*** {PHANTOM_NOTE} ***")
        print(f"per-epoch seconds: {', '.join(f'{s:.1f}' for s in result['seconds']['per_epoch'])}; "
              f"images/s: {', '.join(f'{s:.1f}' for s in result['images_per_second'])}")
        print(f"test mean AUROC (drawn findings): {metrics['mean_auroc']:.4f}")
        if loc:
            print("pointing game, model vs random map:")
            for f, v in loc["pointing_game"].items():
                print(f"  {f:<14} {v:.3f} vs {loc['random_pointing_game'][f]:.3f}  (box area {loc['mean_box_area_fraction'][f]:.1%})")
        print(f"work dir: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
