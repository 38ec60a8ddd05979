"""Throughput of the cxr_model DenseNet121 on this machine: prints numbers, asserts nothing.

    python bench/model_bench.py                    # full run (several minutes on 2 CPU cores)
    python bench/model_bench.py --quick            # smoke run, about a minute
    python bench/model_bench.py --sizes 224 --min-time 1 --json results.json

What it measures, at batch 1 and 8 and input sizes 224 and 512:

- ``forward``: the network alone on a prepared batch;
- ``forward+cams``: the forward pass plus all 14 CAMs mapped onto the image
  grid (one matmul on the returned feature map, one batched mapping);
- ``predict``: the whole ``Model.predict`` path with CAMs (preprocessing,
  forward, calibrated probabilities, CAM objects);

for eager PyTorch fp32 (``torch.inference_mode``) and for ONNX Runtime fp32
(whose logits equal PyTorch's within 1e-4), both with the
same number of threads and measured in alternating rounds, so that the other
users of these cores slow both alike.  Each number is the median of the
per-call times.  Then:

- the CAM overhead on a real-sized 2048 x 2048 radiograph (one map read, all 14);
- PyTorch bf16 + channels_last (full run only) with its largest probability
  difference from fp32, as a reduced-precision candidate;
- the ``onnx-int8`` runtime (static int8 quantisation of the ONNX graph; the
  service's CPU default when its decision check passes), against eager and ONNX fp32, with its largest probability shift and
  changed decisions on the reference radiographs and the bench images;
- two single-thread processes against one two-thread process at 224, with the
  worker settings that follow from the better one;
- on CUDA, when present, fp32 and AMP (fp16) up to batch 256.

FLOPs are counted by ``torch.utils.flop_counter`` on the network (2 FLOPs per
multiply-add: 5.67 GFLOP per 224 x 224 image; the often quoted "2.87 GFLOPs"
of DenseNet121 counts multiply-adds).  The peak is cores x clock x FLOPs per
cycle from lscpu (assumptions printed), next to a measured single-precision
GEMM ceiling.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cxr_model import load_model
from cxr_model.cam import CamMaps, raw_cams
from cxr_model.card import load_card
from cxr_model.demo import build_demo_model
from cxr_model.network import LogitsAndFeatures, build_network, load_network
from cxr_model.preprocess import preprocess

# --- the machine ----------------------------------------------------------------------------------------------


def lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def physical_cores(info: dict[str, str]) -> int:
    try:
        cores = int(info["Core(s) per socket"]) * int(info.get("Socket(s)", "1"))
    except (KeyError, ValueError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores))


def cpu_peak(info: dict[str, str], cores: int) -> tuple[float, float, int, list[str]]:
    """(fp32, bf16) peak GFLOP/s = cores x GHz x FLOPs/cycle, fp32 FLOPs/cycle/core, and the assumptions made."""
    flags = set(info.get("Flags", "").split())
    vendor = info.get("Vendor ID", "")
    notes = []
    if info.get("CPU max MHz"):
        ghz = float(info["CPU max MHz"]) / 1000
        notes.append(f"clock {ghz:.2f} GHz = lscpu 'CPU max MHz'")
    elif info.get("BogoMIPS"):
        ghz = float(info["BogoMIPS"]) / 2000
        notes.append(f"clock {ghz:.2f} GHz = BogoMIPS / 2 (the TSC rate; lscpu gives no MHz under this "
                     "hypervisor, turbo may run higher)")
    else:
        ghz = 2.0
        notes.append("clock unknown, 2.0 GHz assumed")
    if "avx512f" in flags and vendor == "AuthenticAMD":
        fp32 = 32
        notes.append("fp32: 32 FLOPs/cycle/core (AMD Zen 4: AVX-512 on two 256-bit FMA pipes, 2 x 8 lanes x 2)")
    elif "avx512f" in flags:
        fp32 = 64
        notes.append("fp32: 64 FLOPs/cycle/core (AVX-512, two 512-bit FMA units assumed)")
    elif "avx2" in flags and "fma" in flags:
        fp32 = 32
        notes.append("fp32: 32 FLOPs/cycle/core (AVX2, two 256-bit FMA units)")
    else:
        fp32 = 8
        notes.append("fp32: 8 FLOPs/cycle/core (SSE, no FMA)")
    if "amx_bf16" in flags:
        bf16 = 2048
        notes.append("bf16: 2048 FLOPs/cycle/core (AMX tile multiply)")
    elif "avx512_bf16" in flags:
        bf16 = 2 * fp32
        notes.append(f"bf16: {bf16} FLOPs/cycle/core (AVX512_BF16 dot products, twice fp32; no AMX)")
    else:
        bf16 = fp32
        notes.append("bf16: no bf16 instructions, same as fp32")
    return cores * ghz * fp32, cores * ghz * bf16, fp32, notes


def gemm_ceiling(threads: int, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """GFLOP/s of a large square matmul with ``threads`` threads: the practical peak."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_time_once(lambda: a @ b) for _ in range(5))
    torch.set_num_threads(before)
    return 2 * n**3 / best / 1e9


def network_gflop(size: int, in_channels: int = 3) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    net = LogitsAndFeatures(build_network(in_channels, 14)).eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(torch.zeros(1, in_channels, size, size))
    return counter.get_total_flops() / 1e9


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --- timing ---------------------------------------------------------------------------------------------------


def _time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], object]], *, min_time: float, rounds: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, measured in alternating rounds after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            calls = 0
            while calls == 0 or time.perf_counter() - start < min_time / rounds:
                times[name].append(_time_once(fn))
                calls += 1
    return {name: float(np.median(t)) for name, t in times.items()}


def test_images(size: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.5 + 0.3 * np.sin(7 * xx) * np.cos(5 * yy)
    return [np.clip(base + 0.1 * rng.standard_normal((size, size)), 0, 1).astype(np.float32) for _ in range(n)]


class Recorder:
    """Prints and keeps one row per measurement; CPU rows are compared with the peak of the cores they used."""

    def __init__(self, gflop: dict[int, float], peak_per_core: dict[str, float], ceiling_per_core: dict[str, float],
                 cores: int) -> None:
        self.rows: list[dict] = []
        self.gflop, self.peak_per_core, self.ceiling_per_core, self.cores = gflop, peak_per_core, ceiling_per_core, cores

    def add(self, *, sec_per_batch: float, batch: int, size: int, **row) -> dict:
        ips = batch / sec_per_batch
        gflops = ips * self.gflop[size]
        row.update(size=size, batch=batch, sec_per_batch=round(sec_per_batch, 5), images_per_s=round(ips, 2),
                   ms_per_image=round(1000 / ips, 2), gflop_per_s=round(gflops, 1))
        pct = ""
        if row.get("device") == "cpu":
            used = min(self.cores, int(row.get("threads") or 1) * int(row.get("processes") or 1))
            kind = "bf16" if row["precision"].startswith("bf16") else "fp32"
            row.update(cores_used=used, pct_of_peak=round(100 * gflops / (used * self.peak_per_core[kind]), 1),
                       pct_of_gemm=round(100 * gflops / (used * self.ceiling_per_core[kind]), 1))
            pct = f"{row['pct_of_peak']:5.1f}% peak {row['pct_of_gemm']:5.1f}% gemm"
        self.rows.append(row)
        extra = f"  {row['note']}" if row.get("note") else ""
        print(f"  {row['runtime']:<7} {row['precision']:<11} {size:>4}px b{batch:<3} {row['mode']:<16} "
              f"{ips:8.2f} img/s {row['ms_per_image']:8.2f} ms/img {gflops:7.1f} GFLOP/s {pct}{extra}", flush=True)
        return row


# --- CPU ------------------------------------------------------------------------------------------------------


def cams_for_batch(model, batch: np.ndarray, geos) -> None:
    _, feats = model.backend.forward(batch)
    maps = raw_cams(torch.from_numpy(feats), model._weight)
    for i, geo in enumerate(geos):
        CamMaps(model.card.labels, maps[i], geo).stack()


def bench_cpu(rec: Recorder, model_dirs: dict[int, Path], cache: Path, threads: int, args) -> list[str]:
    summary = []
    for size, d in model_dirs.items():
        models = {"eager": load_model(d, "torch", threads=threads), "onnx": load_model(d, "onnx", cache_dir=cache,
                                                                                     threads=threads)}
        for batch in (1, 8):
            images = test_images(size, batch)
            prepared = [preprocess(im, models["eager"].card) for im in images]
            x = np.stack([p[0] for p in prepared])
            geos = [p[1] for p in prepared]
            fns: dict[tuple[str, str], Callable[[], object]] = {}
            for name, model in models.items():
                model.batch_size = batch
                fns[(name, "forward")] = lambda m=model: m.backend.forward(x)
                fns[(name, "forward+cams")] = lambda m=model: cams_for_batch(m, x, geos)
                fns[(name, "predict")] = lambda m=model: m.predict(images, cams=True)
            sec = interleaved(fns, min_time=args.min_time, rounds=args.rounds)
            for (name, mode), s in sec.items():
                note = ""
                if mode == "forward+cams":
                    note = f"CAM overhead {100 * (s / sec[(name, 'forward')] - 1):+.1f}%"
                if name == "onnx" and mode == "forward":
                    note = f"{sec[('eager', 'forward')] / s:.2f}x eager"
                rec.add(device="cpu", runtime="eager" if name == "eager" else "onnx", precision="fp32", size=size,
                        batch=batch, mode=mode, sec_per_batch=s, threads=threads, note=note)
            summary.append(f"{size}px batch {batch}: ONNX Runtime {sec[('eager', 'forward')] / sec[('onnx', 'forward')]:.2f}x "
                           f"eager (forward), CAM overhead eager "
                           f"{100 * (sec[('eager', 'forward+cams')] / sec[('eager', 'forward')] - 1):+.1f}%, onnx "
                           f"{100 * (sec[('onnx', 'forward+cams')] / sec[('onnx', 'forward')] - 1):+.1f}%")
    return summary


def bench_real_size_cams(rec: Recorder, model_dir: Path, cache: Path, threads: int, args) -> str:
    """CAMs mapped onto a 2048 x 2048 radiograph: the cost that grows with the image, not the network."""
    model = load_model(model_dir, "auto", cache_dir=cache, threads=threads)  # the service's default
    image = test_images(2048, 1)[0]
    x, geo = preprocess(image, model.card)
    batch = x[None]

    def cams(read: str) -> None:
        _, feats = model.backend.forward(batch)
        maps = CamMaps(model.card.labels, raw_cams(torch.from_numpy(feats), model._weight)[0], geo)
        if read == "one":
            maps["Effusion"]
        elif read == "all":
            maps.stack()

    sec = interleaved({"forward": lambda: model.backend.forward(batch), "one": lambda: cams("one"),
                       "all": lambda: cams("all")}, min_time=args.min_time, rounds=args.rounds)
    size = model.card.input_size
    for key, mode in (("forward", "forward"), ("one", "fwd+1 cam@2048"), ("all", "fwd+14 cams@2048")):
        note = "" if key == "forward" else f"CAM overhead {100 * (sec[key] / sec['forward'] - 1):+.1f}%"
        rec.add(device="cpu", runtime=model.runtime, precision="int8" if model.runtime.endswith("int8") else "fp32",
                size=size, batch=1, mode=mode,
                sec_per_batch=sec[key], threads=threads, note=note)
    return (f"2048x2048 radiograph, {size}px model: one CAM read {100 * (sec['one'] / sec['forward'] - 1):+.1f}%, "
            f"all 14 mapped {100 * (sec['all'] / sec['forward'] - 1):+.1f}% of the forward time")


def bench_bf16(rec: Recorder, model_dir: Path, size: int, threads: int, args) -> str:
    card = load_card(model_dir)
    torch.set_num_threads(threads)
    fp32 = LogitsAndFeatures(load_network(model_dir, card)).eval()
    cl = LogitsAndFeatures(load_network(model_dir, card)).to(memory_format=torch.channels_last).eval()
    x = torch.from_numpy(np.stack([preprocess(im, card)[0] for im in test_images(size, 8)]))
    xcl = x.to(memory_format=torch.channels_last)

    def run_bf16(inp: torch.Tensor):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return cl(inp)

    def run_fp32(inp: torch.Tensor):
        with torch.inference_mode():
            return fp32(inp)

    try:
        p32 = torch.sigmoid(run_fp32(x)[0])
        p16 = torch.sigmoid(run_bf16(xcl)[0].float())
    except Exception as exc:  # bf16 kernels missing on this CPU
        return f"bf16: unavailable ({exc})"
    diff = float((p32 - p16).abs().max())
    flips = int(((p32 >= 0.5) != (p16 >= 0.5)).sum())
    out = []
    for batch in (1, 8):
        sec = interleaved({"fp32": lambda b=batch: run_fp32(x[:b]), "bf16": lambda b=batch: run_bf16(xcl[:b])},
                          min_time=args.min_time, rounds=args.rounds)
        rec.add(device="cpu", runtime="eager", precision="bf16+chlast", size=size, batch=batch, mode="forward",
                sec_per_batch=sec["bf16"], threads=threads, note=f"{sec['fp32'] / sec['bf16']:.2f}x eager fp32")
        out.append(f"b{batch} {sec['fp32'] / sec['bf16']:.2f}x")
    return (f"bf16+channels_last at {size}px: " + ", ".join(out) + f" eager fp32; max |p - p_fp32| {diff:.4f}, "
            f"{flips} decision flip(s) at 0.5 on the 8 bench images (not equal within 1e-4: never the default)")


def bench_int8(rec: Recorder, model_dir: Path, cache: Path, size: int, threads: int, args) -> str:
    """The opt-in ``onnx-int8`` runtime (static int8, calibrated on the bundled reference radiographs)."""
    from cxr_model import load_image_file
    from cxr_model.paths import reference_radiograph_paths

    torch.set_num_threads(threads)
    card = load_card(model_dir)
    eager = LogitsAndFeatures(load_network(model_dir, card)).eval()
    fp32 = load_model(model_dir, "onnx", cache_dir=cache, threads=threads)
    int8 = load_model(model_dir, "onnx-int8", cache_dir=cache, threads=threads)
    if int8.runtime != "onnx-int8":
        return "int8: refused by its decision check for this model (see the log); nothing to measure"
    images = [load_image_file(p) for p in reference_radiograph_paths()] + test_images(size, 8)
    a, b = fp32.predict(images, cams=False), int8.predict(images, cams=False)
    shift = max(abs(x.probabilities[k] - y.probabilities[k]) for x, y in zip(a, b) for k in card.labels)
    flips = sum(x.positive != y.positive for x, y in zip(a, b))
    prepared = [preprocess(im, card) for im in test_images(size, 8)]
    x = np.stack([p[0] for p in prepared])
    geos = [p[1] for p in prepared]
    xt = torch.from_numpy(x)

    def run_eager(n: int):
        with torch.inference_mode():
            return eager(xt[:n])

    out = []
    for batch in (1, 8):
        sec = interleaved({"eager": lambda n=batch: run_eager(n), "onnx": lambda n=batch: fp32.backend.forward(x[:n]),
                           "int8": lambda n=batch: int8.backend.forward(x[:n]),
                           "int8+cams": lambda n=batch: cams_for_batch(int8, x[:n], geos[:n])},
                          min_time=args.min_time, rounds=args.rounds)
        rec.add(device="cpu", runtime="onnx-int8", precision="int8", size=size, batch=batch, mode="forward",
                sec_per_batch=sec["int8"], threads=threads,
                note=f"{sec['eager'] / sec['int8']:.2f}x eager fp32, {sec['onnx'] / sec['int8']:.2f}x onnx fp32")
        cam = 100 * (sec["int8+cams"] / sec["int8"] - 1)
        rec.add(device="cpu", runtime="onnx-int8", precision="int8", size=size, batch=batch, mode="forward+cams",
                sec_per_batch=sec["int8+cams"], threads=threads, note=f"CAM overhead {cam:+.1f}%")
        out.append(f"b{batch} {sec['eager'] / sec['int8']:.2f}x eager ({sec['onnx'] / sec['int8']:.2f}x onnx fp32), "
                   f"CAMs {cam:+.1f}%")
    return (f"onnx-int8 at {size}px (CPU default): " + ", ".join(out) + f"; on {len(images)} images (reference "
            f"radiographs + bench images) max |p - p_fp32| {shift:.4f}, {flips} image(s) with a changed decision")


def _worker(model_dir: str, cache: str, threads: int, seconds: float, barrier, queue) -> None:
    model = load_model(model_dir, "auto", cache_dir=cache, threads=threads)  # the service's default
    x = preprocess(test_images(model.card.input_size, 1)[0], model.card)[0][None]
    model.backend.forward(x)
    barrier.wait()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.backend.forward(x)
        n += 1
    queue.put((n, time.perf_counter() - start, model.runtime))


def bench_processes(rec: Recorder, model_dir: Path, cache: Path, cores: int, args) -> list[str]:
    """Total images/s of `cores` single-thread processes against one `cores`-thread process, alternated."""
    ctx = mp.get_context("spawn")
    configs = ((cores, 1), (1, cores))
    totals: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    for _ in range(args.proc_rounds):
        for procs, threads in configs:
            barrier, queue = ctx.Barrier(procs), ctx.Queue()
            ps = [ctx.Process(target=_worker, args=(str(model_dir), str(cache), threads, args.proc_seconds, barrier,
                                                     queue)) for _ in range(procs)]
            for p in ps:
                p.start()
            results = [queue.get(timeout=600) for _ in ps]
            for p in ps:
                p.join()
            totals[(procs, threads)].append(sum(n / t for n, t, _ in results))
            runtime = results[0][2]
    for (procs, threads), values in totals.items():
        ips = float(np.mean(values))
        rec.add(device="cpu", runtime=runtime, precision="int8" if runtime.endswith("int8") else "fp32", size=224,
                batch=1, mode=f"{procs}proc x {threads}thr",
                sec_per_batch=1 / ips, threads=threads, processes=procs,
                note="rounds: " + ", ".join(f"{v:.1f}" for v in values) + " img/s")
    many, one = (float(np.mean(totals[c])) for c in configs)
    if many >= one:
        verdict = [f"{cores} single-thread processes give {many / one:.2f}x the images/s of one {cores}-thread process",
                   f"worker default: CXR_TRIAGE_WORKER_CONCURRENCY={cores}, CXR_TRIAGE_MODEL_THREADS=1"]
    else:
        verdict = [f"one {cores}-thread process gives {one / many:.2f}x the images/s of {cores} single-thread processes",
                   f"worker default: CXR_TRIAGE_WORKER_CONCURRENCY=1, CXR_TRIAGE_MODEL_THREADS={cores} (or unset)"]
    return verdict


# --- CUDA -----------------------------------------------------------------------------------------------------


def bench_cuda(rec: Recorder, model_dirs: dict[int, Path], args) -> None:
    dev = torch.device("cuda")
    print(f"\nCUDA: {torch.cuda.get_device_name(dev)}")
    batches = (1, 8, 32) if args.quick else (1, 8, 32, 64, 128, 256)
    for size, d in model_dirs.items():
        model = load_model(d, "auto", device="cuda")  # the production path: fp32, CAM objects on the CPU
        for batch in (1, 8, 32):
            images = test_images(size, batch)
            model.batch_size = batch
            sec = interleaved({"p": lambda: model.predict(images, cams=True)}, min_time=args.min_time, rounds=1)["p"]
            rec.add(device="cuda", runtime=model.runtime, precision="fp32", size=size, batch=batch, mode="predict",
                    sec_per_batch=sec, threads=torch.get_num_threads())
    for size, d in model_dirs.items():
        card = load_card(d)
        module = LogitsAndFeatures(load_network(d, card)).to(dev).eval()
        weight = module.net.class_layers.out.weight.detach()
        for precision in ("fp32", "amp-fp16"):
            for batch in batches:
                x = torch.randn(batch, card.in_channels, size, size, device=dev)

                def fwd(cams: bool) -> None:
                    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16,
                                                                 enabled=precision != "fp32"):
                        logits, feats = module(x)
                        if cams:
                            maps = raw_cams(feats.float(), weight)
                            torch.nn.functional.interpolate(maps, size=(size, size), mode="bilinear",
                                                            align_corners=False)
                    torch.cuda.synchronize()

                try:
                    sec = interleaved({"forward": lambda: fwd(False), "forward+cams": lambda: fwd(True)},
                                      min_time=args.min_time, rounds=1)
                except torch.cuda.OutOfMemoryError:
                    print(f"  cuda {precision} {size}px batch {batch}: out of memory")
                    torch.cuda.empty_cache()
                    break
                for mode, s in sec.items():
                    rec.add(device="cuda", runtime="torch", precision=precision, size=size, batch=batch, mode=mode,
                            sec_per_batch=s, threads=None)


# --- main -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="cxr_model throughput benchmark (prints numbers)")
    parser.add_argument("--quick", action="store_true", help="smoke run, about a minute")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--threads", type=int, help="threads for both runtimes (default: physical cores)")
    parser.add_argument("--skip-cpu", action="store_true", help="only the CUDA measurements")
    parser.add_argument("--min-time", type=float, help="seconds per measurement (default 0.5 quick, 3 full)")
    parser.add_argument("--rounds", type=int, help="alternating rounds per measurement (default 2 quick, 3 full)")
    args = parser.parse_args(argv)
    args.min_time = args.min_time or (0.5 if args.quick else 3.0)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.proc_seconds = 2.0 if args.quick else 6.0
    args.proc_rounds = 1 if args.quick else 2

    import onnxruntime

    info = lscpu()
    cores = physical_cores(info)
    threads = args.threads or cores
    peak32, peak16, fp32_per_cycle, notes = cpu_peak(info, cores)
    ceiling1 = gemm_ceiling(1)
    ceiling1_bf16 = gemm_ceiling(1, torch.bfloat16)
    ceiling = gemm_ceiling(threads) if threads > 1 else ceiling1
    gflop = {size: network_gflop(size) for size in args.sizes}
    print(f"cxr_model benchmark{' (quick)' if args.quick else ''}: {cpu_name()}, {cores} physical core(s), "
          f"{os.cpu_count()} logical CPUs; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"python {sys.version.split()[0]}")
    print("DenseNet121 work: " + ", ".join(f"{g:.2f} GFLOP per {s}px image" for s, g in gflop.items())
          + " (flop_counter, 2 FLOPs per multiply-add)")
    print(f"CPU peak (assumed): fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s for {cores} core(s); "
          + "; ".join(notes))
    print(f"measured fp32 GEMM ceiling (2048^3 matmul): {ceiling:.0f} GFLOP/s with {threads} thread(s), "
          f"{ceiling1:.0f} with 1; bf16 {ceiling1_bf16:.0f} with 1 (bf16 rows are compared with the bf16 figures)")
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} (other processes on these cores slow every number; "
          "ratios are measured in alternating rounds)\n")
    rec = Recorder(gflop, {"fp32": peak32 / cores, "bf16": peak16 / cores},
                   {"fp32": ceiling1, "bf16": ceiling1_bf16}, cores)
    summary: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        tmp_path = Path(tmp)
        cache = tmp_path / "onnx-cache"
        model_dirs = {}
        for size in args.sizes:
            model_dirs[size] = tmp_path / f"demo-{size}"
            build_demo_model(model_dirs[size], input_size=size)
        if not args.skip_cpu:
            print(f"CPU, {threads} thread(s) for both runtimes (onnx = ONNX Runtime fp32; "
                  "median per call; % of the assumed peak and of the measured 1-thread GEMM ceiling, "
                  "times the cores used):")
            summary += bench_cpu(rec, model_dirs, cache, threads, args)
            first = min(model_dirs)
            print(f"\nCAMs on a real-sized radiograph ({first}px model, 2048x2048 image, maps read lazily):")
            summary.append(bench_real_size_cams(rec, model_dirs[first], cache, threads, args))
            if not args.quick:
                print("\nReduced precision candidate (eager PyTorch bf16 + channels_last, forward only):")
                summary.append(bench_bf16(rec, model_dirs[first], first, threads, args))
            print("\nONNX Runtime int8, the service's CPU default when its decision check passes (int8 rates are "
                  "compared with the fp32 peak):")
            summary.append(bench_int8(rec, model_dirs[first], cache, first, threads, args))
            if 224 in model_dirs and cores > 1:
                print(f"\nCPU, 224px batch 1, the service's default runtime: {cores} single-thread processes vs one "
                      f"{cores}-thread process (total images/s, alternated):")
                summary += bench_processes(rec, model_dirs[224], cache, cores, args)
        if torch.cuda.is_available():
            bench_cuda(rec, model_dirs, args)
        else:
            print("\nCUDA: not available, GPU path skipped")
    cpu32 = [r["gflop_per_s"] / r["cores_used"] for r in rec.rows if r["device"] == "cpu" and r["precision"] == "fp32"]
    if cpu32:
        summary.append(f"best fp32 rate {max(cpu32):.0f} GFLOP/s per core = {100 * max(cpu32) / (peak32 / cores):.0f}% "
                       f"of the assumed per-core peak, {100 * max(cpu32) / ceiling1:.0f}% of the measured GEMM; at "
                       f"{fp32_per_cycle} FLOPs/cycle it implies a clock of at least "
                       f"{max(cpu32) / fp32_per_cycle:.2f} GHz")
    load_after = os.getloadavg()
    print(f"\nload average after: {load_after[0]:.2f}")
    print("\nSummary:")
    for line in summary:
        print("  " + line)
    if args.json:
        meta = {"cpu": cpu_name(), "physical_cores": cores, "threads": threads, "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__, "quick": args.quick, "gflop_per_image": gflop,
                "peak_fp32_gflops": peak32, "peak_bf16_gflops": peak16, "peak_assumptions": notes,
                "gemm_ceiling_gflops": ceiling, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                else None, "loadavg_before": load_before[0], "loadavg_after": load_after[0], "summary": summary}
        args.json.write_text(json.dumps({"meta": meta, "results": rec.rows}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
