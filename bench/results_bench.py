"""Build + encode time of the result objects of one study: SR, heatmap SCs, Parametric Maps.

For every real chest radiograph in tests/data/cxr_dicom/ (each one study of one
image), builds the objects with `dicom_io.results.build_results` and encodes
each to bytes as the pipeline writes it (Part 10 file, explicit VR little
endian), and prints the median and worst time per study over --repeat runs,
split into SR, heatmaps and parametric maps.

Not timed: reading and decoding the source (the pipeline has done that for the
model) and the CAMs, which are made here as the model makes them: a 7 x 7 map
upsampled bilinearly to the source's pixel grid, float32 in [0, 1]. The
findings are the 14 ChestX-ray14 labels with --positives of them above their
threshold (2 by default). The heatmaps follow the service's defaults
(dicom_io.sc.HeatmapOptions: 768 px JPEG, an image of its own for the 2 most
urgent positive findings plus one overview; the overview alone when none is
positive); one multi-frame Parametric Map per radiograph stores every finding's
CAM at the model's own 7 x 7 resolution. Wall-clock and CPU time are both
printed: on a shared machine other processes inflate the first.

The first build per model also builds the model's SR template (highdicom,
once per process); it is reported apart as "first build".

    python bench/results_bench.py [--repeat 10] [--positives 2] [--no-parametric-map] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dicom_io.pixels import display_array  # noqa: E402
from dicom_io.results import ResultObjects, build_results  # noqa: E402
from dicom_io.sc import HeatmapOptions  # noqa: E402
from cxr_model.labels import DEFAULT_URGENCY  # noqa: E402
from triage_core.priority import heatmap_rank  # noqa: E402
from triage_core.values import AlgorithmInfo, FindingResult, ImageResult  # noqa: E402

DATA = ROOT / "tests" / "data" / "cxr_dicom"
FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
ALGORITHM = AlgorithmInfo(
    name="cxr-densenet121", version="0.1.0-demo", weights_sha256="ab" * 32, demo=True,
    parameters={"architecture": "densenet121", "input_size": "224", "normalization": "imagenet"},
)

#: The service's defaults (768 px JPEG, the 2 most urgent positives and an overview).
HEATMAPS = HeatmapOptions(rank=heatmap_rank(FINDINGS, DEFAULT_URGENCY))


def study_inputs(path: Path, positives: int, seed: int) -> tuple:
    source = pydicom.dcmread(path, force=True)
    display = display_array(source)
    rng = np.random.default_rng(seed)
    findings, cams, native = [], {}, {}
    for index, name in enumerate(FINDINGS):
        probability = float(rng.uniform(0.6, 0.95) if index < positives else rng.uniform(0.01, 0.4))
        findings.append(FindingResult(name, probability, 0.5, probability >= 0.5))
        native[name] = rng.random((7, 7), dtype=np.float32)  # the model's own resolution (the PM stores it)
        coarse = Image.fromarray(native[name], mode="F")
        cams[name] = np.asarray(coarse.resize((int(source.Columns), int(source.Rows)), Image.Resampling.BILINEAR))
    return source, display, ImageResult(str(source.SOPInstanceUID), tuple(findings)), cams, native


def encode(ds: pydicom.Dataset) -> int:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.tell()


def run_once(inputs: tuple, parametric_maps: bool) -> dict[str, float]:
    source, display, result, cams, native = inputs
    c0 = time.process_time()
    t0 = time.perf_counter()
    objects: ResultObjects = build_results([source], [display], [result], [cams], ALGORITHM, parametric_maps=parametric_maps,
                                           heatmaps=HEATMAPS, native_cams_per_image=[native])
    t1 = time.perf_counter()
    size = encode(objects.sr)
    t2 = time.perf_counter()
    for image in objects.heatmaps:
        size += encode(image)
    t3 = time.perf_counter()
    for image in objects.parametric_maps:
        size += encode(image)
    t4 = time.perf_counter()
    c4 = time.process_time()
    return {
        "cpu_ms": 1000 * (c4 - c0),
        "build_ms": 1000 * (t1 - t0),
        "encode_sr_ms": 1000 * (t2 - t1),
        "encode_heatmaps_ms": 1000 * (t3 - t2),
        "encode_parametric_maps_ms": 1000 * (t4 - t3),
        "total_ms": 1000 * (t4 - t0),
        "objects": 1 + len(objects.heatmaps) + len(objects.parametric_maps),
        "heatmaps": len(objects.heatmaps), "parametric_maps": len(objects.parametric_maps),
        "megabytes": size / 1e6,
    }


def build_parts(inputs: tuple, parametric_maps: bool) -> dict[str, float]:
    """The build time split by object kind (separate calls, same inputs)."""
    from dicom_io.pm import parametric_maps_by_finding
    from dicom_io.sc import heatmaps_by_finding
    from dicom_io.sr import build_sr

    source, display, result, cams, native = inputs
    t0 = time.perf_counter()
    build_sr([source], [result], ALGORITHM)
    t1 = time.perf_counter()
    heatmaps_by_finding(source, display, result, cams, ALGORITHM, HEATMAPS)
    t2 = time.perf_counter()
    if parametric_maps:
        parametric_maps_by_finding(source, result, native, ALGORITHM)
    t3 = time.perf_counter()
    return {"build_sr_ms": 1000 * (t1 - t0), "build_heatmaps_ms": 1000 * (t2 - t1), "build_parametric_maps_ms": 1000 * (t3 - t2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per study (default 10)")
    parser.add_argument("--positives", type=int, default=2, choices=range(0, 15), metavar="0..14")
    parser.add_argument("--no-parametric-map", action="store_true", help="as with CXR_TRIAGE_PARAMETRIC_MAP=false")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    parametric_maps = not args.no_parametric_map

    paths = sorted(DATA.glob("*.dcm"))
    studies = {path.name: study_inputs(path, args.positives, seed) for seed, path in enumerate(paths)}
    t0 = time.perf_counter()
    first = run_once(next(iter(studies.values())), parametric_maps)
    first_ms = 1000 * (time.perf_counter() - t0)

    report: dict = {
        "positives": args.positives, "parametric_maps": parametric_maps, "repeat": args.repeat,
        "first_build_ms": round(first_ms, 1), "studies": {},
    }
    print(f"result objects per study: SR + {first['heatmaps']} heatmap(s) + {first['parametric_maps']} parametric map(s) "
          f"({args.positives} finding(s) positive; the service's heatmap defaults); {args.repeat} runs each; "
          f"first build (SR template, imports) {first_ms:.0f} ms")
    print(f"{'study':52s} {'rows x cols':>11s} {'median':>8s} {'max':>8s} {'cpu':>6s}  {'build':>6s} {'enc SR':>6s} "
          f"{'enc SC':>6s} {'enc PM':>6s}  {'SR':>5s} {'SC':>5s} {'PM':>5s}  {'MB':>6s}")
    medians = []
    for name, inputs in studies.items():
        runs = [run_once(inputs, parametric_maps) for _ in range(args.repeat)]
        parts = [build_parts(inputs, parametric_maps) for _ in range(max(3, args.repeat // 2))]
        med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        med.update({key: statistics.median(p[key] for p in parts) for key in parts[0]})
        worst = max(run["total_ms"] for run in runs)
        medians.append(med["total_ms"])
        rows, columns = inputs[0].Rows, inputs[0].Columns
        print(f"{name:52s} {f'{rows}x{columns}':>11s} {med['total_ms']:7.1f}ms {worst:7.1f}ms {med['cpu_ms']:6.1f}  "
              f"{med['build_ms']:6.1f} {med['encode_sr_ms']:6.1f} {med['encode_heatmaps_ms']:6.1f} "
              f"{med['encode_parametric_maps_ms']:6.1f}  {med['build_sr_ms']:5.1f} {med['build_heatmaps_ms']:5.1f} "
              f"{med['build_parametric_maps_ms']:5.1f}  {med['megabytes']:6.2f}")
        report["studies"][name] = {
            "rows": int(rows), "columns": int(columns), "max_total_ms": round(worst, 2),
            **{key: round(value, 2) for key, value in med.items()},
        }
    report["median_total_ms"] = round(statistics.median(medians), 2)
    report["median_cpu_ms"] = round(statistics.median(study["cpu_ms"] for study in report["studies"].values()), 2)
    try:
        report["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        report["load_average"] = None
    report["max_median_total_ms"] = round(max(medians), 2)
    print(f"median over studies {report['median_total_ms']:.1f} ms per study (CPU {report['median_cpu_ms']:.1f} ms); "
          f"slowest study {report['max_median_total_ms']:.1f} ms; load average {report['load_average']}")
    print("columns: wall-clock median and max per study, CPU time of this process (median); build; encode SR, SC, PM; "
          "build split SR, SC, PM (separate calls); megabytes written. On a shared machine the CPU column is the steadier one.")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
