"""The service end to end against `predict` over the same files: studies/s, latency, result bytes.

Starts a real Orthanc (the PACS) and `cxr-triage serve` with N model processes, sends N distinct
1024x1024 8-bit chest studies on one association with dcmtk's storescu, and waits until every
study's results are in Orthanc. The model is the bundled demo model with its operating thresholds
set so that exactly `--positives` findings are positive on every image (the worst case of the
result volume). In the same run, N `predict` processes score the same files (decode, model, CAMs;
start-up excluded), and the bench prints:

* studies/s of the service and images/s of the N predict processes, and their ratio;
* per-study latency from the last instance received to the results stored in PACS (p50/p95),
  and the first study's;
* result bytes per study (SR, heatmaps, maps), and what Orthanc received;
* where a study's time goes in the worker: per-stage means from the worker's timing lines.

    python bench/pipeline_bench.py [--studies 40] [--processes 2] [--positives 8] [--quiet 1]
        [--database-url postgresql+psycopg2://...] [--broker-url redis://...] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from _harness import Orthanc, Service, load_average, wait_until  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from cxr_model import bundled_demo_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "data" / "cxr_dicom" / "nih_00000001_000_cardiomegaly.dcm"
LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
          "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
#: The order in which findings are made positive: the urgent first, as a real model would flag them.
POSITIVE_ORDER = ("Pneumothorax", "Effusion", "Pneumonia", "Consolidation", "Edema", "Mass", "Cardiomegaly",
                  "Atelectasis", "Nodule", "Infiltration", "Hernia", "Emphysema", "Fibrosis", "Pleural_Thickening")
STAGE = re.compile(r"(job|export) (\d+) stages ms: (.*)$")


def model_with_positives(out: Path, positives: int) -> Path:
    """The demo model with thresholds that make exactly `positives` findings positive on any image."""
    shutil.copytree(bundled_demo_path(), out)
    card_path = out / "model_card.json"
    card = json.loads(card_path.read_text())
    chosen = set(POSITIVE_ORDER[:positives])
    card["thresholds"] = {label: (0.0001 if label in chosen else 0.9999) for label in card["labels"]}
    card["version"] = f"{card['version']}-bench{positives}"
    card_path.write_text(json.dumps(card, indent=2))
    return out


def make_studies(n: int, out: Path) -> list[Path]:
    """n single-image studies of 1024x1024 8-bit pixels, each slightly different (a real radiograph
    with its own noise), so that no two studies are the same input."""
    out.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(SOURCE)
    pixels = base.pixel_array.astype(np.int16)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        ds = copy.deepcopy(base)
        noisy = np.clip(pixels + rng.integers(-3, 4, pixels.shape), 0, 255).astype(np.uint8)
        ds.PixelData = noisy.tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = f"BENCH{i:05d}"
        path = out / f"study-{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


_PREDICT = r"""
import json, sys, time
from pathlib import Path
from cxr_triage.dicom_input import read_radiograph_and_metadata
from cxr_triage.runtime import load_model_for
from triage_core.settings import Settings
model_dir, files = sys.argv[1], [Path(p) for p in sys.argv[2:]]
model = load_model_for(Settings(model_threads=1), model_dir, threads=1)
image, meta = read_radiograph_and_metadata(files[0])
model.predict([image], cams=True, metadata=[meta])  # warm
start, cpu = time.perf_counter(), time.process_time()
for path in files:
    image, meta = read_radiograph_and_metadata(path)
    prediction = model.predict([image], cams=True, metadata=[meta])[0]
    [prediction.cams[f] for f in prediction.positive]  # the maps a heatmap needs, on the image grid
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"images": len(files), "seconds": seconds, "cpu_seconds": cpu, "runtime": model.runtime}))
"""


def predict_baseline(model_dir: Path, files: list[Path], processes: int, env: dict) -> dict:
    """`processes` predict processes over `files` (split evenly), start-up excluded."""
    shares = [files[i::processes] for i in range(processes)]
    procs = [subprocess.Popen([sys.executable, "-c", _PREDICT, str(model_dir), *map(str, share)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
             for share in shares]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    per_process = [r["images"] / r["seconds"] for r in results]
    cpu_ms = 1000 * sum(r["cpu_seconds"] for r in results) / sum(r["images"] for r in results)
    return {"images_per_s": sum(per_process), "per_process": per_process, "runtime": results[0]["runtime"],
            "cpu_ms_per_image": cpu_ms}


def study_times(database_url: str) -> dict[str, dict]:
    """Per study: last instance received, job created/started/finished, export done (from SQL)."""
    from sqlalchemy import func, select

    from triage_core.db import Database
    from triage_core.models import Export, Instance, Job, ResultObject, Study

    database = Database(database_url)
    out = {}
    with database.session() as session:
        for study in session.scalars(select(Study)):
            received = session.scalar(select(func.max(Instance.received_at)).where(Instance.study_id == study.id))
            job = session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id.desc())).first()
            export = session.scalar(select(Export).where(Export.study_id == study.id))
            results = session.scalars(select(ResultObject).where(ResultObject.study_id == study.id,
                                                                 ResultObject.superseded_at.is_(None))).all()
            out[study.study_instance_uid] = {
                "status": study.status, "received": received, "job": job, "export": export,
                "result_paths": [r.path for r in results], "result_uids": [r.sop_instance_uid for r in results],
            }
    database.dispose()
    return out


def stage_means(log: str) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for line in log.splitlines():
        if line.startswith("{"):  # the service's JSON log lines (CXR_TRIAGE_LOG_FORMAT=json)
            try:
                line = json.loads(line).get("message", "")
            except ValueError:
                pass
        match = STAGE.search(line)
        if match:
            for part in match.group(3).split():
                name, value = part.split("=")
                key = name if match.group(1) == "job" else f"export_{name}"
                totals.setdefault(key, []).append(float(value))
    return {name: statistics.mean(values) for name, values in totals.items()}


def cpu_by_role(session_id: int, orthanc_pid: int) -> dict[str, float]:
    """CPU seconds used so far by the service's processes (its session), by role, and by Orthanc."""
    tick = os.sysconf("SC_CLK_TCK")
    roles: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        session, seconds = int(fields[3]), (int(fields[11]) + int(fields[12])) / tick
        if int(entry.name) == orthanc_pid:
            role = "orthanc"
        elif session != session_id:
            continue
        else:
            role = next((r for r in ("node", "worker", "api") if f"cxr_triage.cli {r}" in cmdline),
                        "node" if "multiprocessing" in cmdline else "serve")
        roles[role] = roles.get(role, 0.0) + seconds
    return roles


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--processes", type=int, default=2, help="model processes (and predict processes)")
    parser.add_argument("--positives", type=int, default=8, choices=range(0, 15), metavar="0..14")
    parser.add_argument("--quiet", type=float, default=1.0, help="CXR_TRIAGE_SERIES_QUIET_SECONDS")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--broker-url", default="")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra service settings, e.g. CXR_TRIAGE_PARAMETRIC_MAP=false")
    parser.add_argument("--pacs-nagle", action="store_true",
                        help="leave Nagle's algorithm on in Orthanc (dcmtk's default: ~40 ms more per stored object)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    load_before = load_average()
    orthanc = Orthanc(work, nodelay=not args.pacs_nagle).start()
    service = None
    try:
        model_dir = model_with_positives(work / "model", args.positives)
        files = make_studies(args.studies, work / "studies")
        env = {
            "CXR_TRIAGE_MODEL_PATH": str(model_dir),
            "CXR_TRIAGE_EXPORT_DESTINATIONS": f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}",
            "CXR_TRIAGE_WORKER_CONCURRENCY": str(args.processes),
            "CXR_TRIAGE_SERIES_QUIET_SECONDS": str(args.quiet),
        }
        if args.database_url:
            env["CXR_TRIAGE_DATABASE_URL"] = args.database_url
        if args.broker_url:
            env["CXR_TRIAGE_BROKER_URL"] = args.broker_url
        env.update(dict(item.split("=", 1) for item in args.env))
        service = Service(work, env).start(args.processes)
        database_url = args.database_url or f"sqlite:///{work / 'var' / 'triage.sqlite'}"

        cpu_before = cpu_by_role(service.process.pid, orthanc.process.pid)
        started = time.time()
        sent = subprocess.run(["storescu", "-aec", service.ae_title, "127.0.0.1", str(service.dicom_port),
                               *map(str, files)], capture_output=True, text=True, env={**service.env, "TCP_NODELAY": "1"})
        if sent.returncode != 0:
            raise SystemExit(f"storescu failed: {sent.stderr[-2000:]}")
        sent_at = time.time()

        def all_exported():
            times = study_times(database_url)
            done = [t for t in times.values() if t["export"] is not None and t["export"].status == "EXPORTED"]
            return len(done) == args.studies and times

        times = wait_until(all_exported, 60 + 10 * args.studies, interval=0.5, what="every study in PACS")
        finished = max(t["export"].updated_at.timestamp() for t in times.values())
        cpu_after = cpu_by_role(service.process.pid, orthanc.process.pid)
        cpu_ms = {role: 1000 * (cpu_after[role] - cpu_before.get(role, 0.0)) / args.studies for role in cpu_after}
        log = service.log_path.read_text(errors="replace")
    finally:
        if service is not None:
            service.stop()
    try:
        # The PACS holds exactly each study's current result set.
        in_pacs = 0
        for uid, t in times.items():
            stored = orthanc.sop_instance_uids(uid)
            assert sorted(stored) == sorted(t["result_uids"]), f"study {uid}: PACS differs from the results"
            in_pacs += len(stored)
        baseline = predict_baseline(model_dir, files, args.processes, service.env)
    finally:
        orthanc.stop()

    latencies = sorted(t["export"].updated_at.timestamp() - t["received"].timestamp() for t in times.values())
    first = min(times.values(), key=lambda t: t["received"])
    first_latency = first["export"].updated_at.timestamp() - first["received"].timestamp()
    results_dir = work / "var" / "results"
    sizes = [sum((results_dir / p).stat().st_size for p in t["result_paths"]) for t in times.values()]
    objects = [len(t["result_paths"]) for t in times.values()]
    service_rate = args.studies / (finished - started)
    stages = stage_means(log)
    numbers = {
        "studies": args.studies, "processes": args.processes, "positives": args.positives, "quiet_s": args.quiet,
        "database": "postgresql" if args.database_url else "sqlite",
        "broker": "redis" if args.broker_url else "embedded",
        "send_s": sent_at - started,
        "service_studies_per_s": service_rate,
        "predict_images_per_s": baseline["images_per_s"],
        "predict_per_process": baseline["per_process"],
        "runtime": baseline["runtime"],
        "ratio_service_to_predict": service_rate / baseline["images_per_s"],
        "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
        "first_study_latency_s": first_latency,
        "result_bytes_per_study_mean": statistics.mean(sizes), "result_bytes_per_study_max": max(sizes),
        "result_objects_per_study": statistics.mean(objects),
        "objects_in_pacs": in_pacs,
        "worker_stage_means_ms": stages,
        "cpu_ms_per_study": cpu_ms,
        "predict_cpu_ms_per_image": baseline.get("cpu_ms_per_image"),
        "load_average_before": load_before, "load_average_after": load_average(),
        "extra_settings": args.env, "pacs_tcp_nodelay": not args.pacs_nagle,
    }
    print(f"{args.studies} studies, {args.positives} positive findings each, {args.processes} model process(es), "
          f"{numbers['database']} + {numbers['broker']} broker, quiet period {args.quiet:g} s")
    print(f"  service:  {service_rate:6.2f} studies/s  (first send to last result in PACS)")
    print(f"  predict:  {baseline['images_per_s']:6.2f} images/s with {args.processes} process(es) "
          f"({', '.join(f'{r:.1f}' for r in baseline['per_process'])}; {baseline['runtime']})")
    print(f"  ratio:    {numbers['ratio_service_to_predict']:.2f}x")
    print(f"  latency (last instance received -> results in PACS): p50 {numbers['latency_p50_s']:.2f} s, "
          f"p95 {numbers['latency_p95_s']:.2f} s, first study {first_latency:.2f} s")
    print(f"  results per study: {numbers['result_bytes_per_study_mean'] / 1e6:.2f} MB mean, "
          f"{numbers['result_bytes_per_study_max'] / 1e6:.2f} MB max, {numbers['result_objects_per_study']:.0f} objects")
    if stages:
        job_total = stages.get("total", 0.0)
        total = job_total + stages.get("export_send", 0.0)
        print("  worker stages (mean ms per study): " + ", ".join(
            f"{k} {v:.1f} ({100 * v / total:.0f}%)" for k, v in stages.items()
            if k not in ("total", "export_objects")) + f"; job {job_total:.1f} + export = {total:.1f}")
    print("  CPU per study (ms, all cores): " + ", ".join(f"{role} {ms:.0f}" for role, ms in sorted(cpu_ms.items()))
          + f"; total {sum(cpu_ms.values()):.0f}"
          + (f" vs predict {baseline['cpu_ms_per_image']:.0f} per image" if baseline.get("cpu_ms_per_image") else ""))
    print(f"  load average before/after: {load_before} / {numbers['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2, default=str))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"  work directory: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
