"""The bundled demo model: seeded random weights, clearly labelled as such.

Run ``python -m cxr_model.demo OUT_DIR`` (or call :func:`build_demo_model`) to
rebuild ``src/cxr_model/bundled/demo-densenet121``; the output is
byte-for-byte reproducible on the same torch version.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .card import ModelCard
from .labels import DEFAULT_URGENCY, FINDINGS
from .network import build_network
from .paths import bundled_demo_path
from .store import write_model_dir

DEMO_NAME = "cxr-triage-demo-densenet121"
DEMO_VERSION = "0.1.0-demo"
DEMO_SEED = 0
DEMO_INTENDED_USE = (
    "DEMO WEIGHTS. This model is a MONAI DenseNet121 with random weights (torch.manual_seed(0)); "
    "it has never been trained on clinical or any other data. Its outputs are meaningless and it is "
    "NOT FOR DIAGNOSTIC USE. It exists only so that the software can be installed and exercised "
    "end to end without real weights. Import real weights with 'cxr-triage model import' or train them."
)


def build_demo_model(out_dir: str | os.PathLike[str], *, input_size: int = 224, seed: int = DEMO_SEED) -> ModelCard:
    """Write the demo model (float16 state dict + card) into ``out_dir`` and return its card."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = build_network(in_channels=3, out_channels=len(FINDINGS)).eval()
    card = write_model_dir(
        out,
        net.state_dict(),
        name=DEMO_NAME,
        version=DEMO_VERSION,
        labels=FINDINGS,
        input_size=input_size,
        in_channels=3,
        normalization="imagenet",
        thresholds={f: 0.5 for f in FINDINGS},
        calibration={},
        evaluation={"note": "not evaluated: random demo weights, no clinical performance whatsoever"},
        intended_use=DEMO_INTENDED_USE,
        demo=True,
        weights_dtype="float16",  # halves the file (~14 MB); cast back to float32 on load
        provenance={
            "source": "cxr_model.demo.build_demo_model",
            "seed": seed,
            "torch": torch.__version__.split("+")[0],
            "thresholds": "0.5 for every finding: an arbitrary placeholder, not an operating point",
            "weights_dtype_note": "stored as float16 to keep the package small; cast to float32 on load",
        },
        urgency={f: DEFAULT_URGENCY[f] for f in FINDINGS},
    )
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=str(bundled_demo_path()))
    args = parser.parse_args(argv)
    card = build_demo_model(args.out_dir)
    print(f"wrote {card.name} {card.version} to {args.out_dir} (sha256 {card.weights_sha256})")


if __name__ == "__main__":
    main()
