"""Throughput of the cxr_model DenseNet121 on this machine: prints numbers, asserts nothing.

    python bench/model_bench.py            # full run (a few minutes on 2 CPU cores)
    python bench/model_bench.py --quick    # smoke run, under a minute
    python bench/model_bench.py --json results.json

Measures images/s and achieved GFLOP/s (DenseNet121 ~ 2.87 GFLOPs per 224x224
image, scaled by (size/224)^2) for batch 1 and 8 at 224 and 512:

- "forward": the network alone on a prepared batch;
- "predict+cams": the whole Model.predict path (preprocessing, forward,
  calibrated probabilities and all 14 CAMs mapped back to the image grid);

for eager PyTorch fp32, ONNX Runtime fp32 and (full run) PyTorch bf16 +
channels_last; then two single-thread processes against one two-thread
process at 224; and, when CUDA is available, fp32 and AMP (fp16) on the GPU
with batch sizes up to 256.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxr_model import load_model
from cxr_model.demo import build_demo_model
from cxr_model.network import LogitsAndFeatures, load_network
from cxr_model.card import load_card
from cxr_model.cam import raw_cams

GFLOPS_224 = 2.87


def gflops_per_image(size: int) -> float:
    return GFLOPS_224 * (size / 224) ** 2


def timed(fn, *, min_time: float, min_iters: int, warmup: int) -> tuple[float, int]:
    """Seconds per call (mean) after warm-up, running at least min_iters calls and min_time seconds."""
    for _ in range(warmup):
        fn()
    n, start = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - start < min_time:
        fn()
        n += 1
    return (time.perf_counter() - start) / n, n


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def test_images(size: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random((size, size), dtype=np.float32) for _ in range(n)]


class Recorder:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, **row) -> None:
        sec, batch, size = row["sec_per_batch"], row["batch"], row["size"]
        ips = batch / sec
        row.update(images_per_s=round(ips, 2), gflops_per_s=round(ips * gflops_per_image(size), 1),
                   ms_per_image=round(1000 * sec / batch, 2))
        row["sec_per_batch"] = round(sec, 4)
        self.rows.append(row)
        print(f"  {row['device']:<4} {row['runtime']:<6} {row['precision']:<14} {size:>4}px  batch {batch:>3}  "
              f"{row['mode']:<13} {ips:8.2f} img/s  {row['ms_per_image']:8.2f} ms/img  "
              f"{row['gflops_per_s']:8.1f} GFLOP/s", flush=True)


def bench_cpu(rec: Recorder, model_dirs: dict[int, Path], cache: Path, args) -> None:
    timing = dict(min_time=args.min_time, min_iters=1, warmup=1)
    for size, d in model_dirs.items():
        for runtime in ("torch", "onnx"):
            model = load_model(d, runtime, cache_dir=cache)
            for batch in (1, 8):
                images = test_images(size, batch)
                from cxr_model.preprocess import preprocess

                prepared = np.stack([preprocess(im, model.card)[0] for im in images])
                sec, _ = timed(lambda: model.backend.forward(prepared), **timing)
                rec.add(device="cpu", runtime=runtime, precision="fp32", size=size, batch=batch, mode="forward",
                        sec_per_batch=sec, threads=torch.get_num_threads() if runtime == "torch" else "ort-default")
                model.batch_size = batch
                sec, _ = timed(lambda: model.predict(images, cams=True), **timing)
                rec.add(device="cpu", runtime=runtime, precision="fp32", size=size, batch=batch,
                        mode="predict+cams", sec_per_batch=sec,
                        threads=torch.get_num_threads() if runtime == "torch" else "ort-default")
        if not args.quick:
            bench_bf16(rec, d, size, timing)


def bench_bf16(rec: Recorder, model_dir: Path, size: int, timing: dict) -> None:
    card = load_card(model_dir)
    module = LogitsAndFeatures(load_network(model_dir, card)).to(memory_format=torch.channels_last).eval()
    weight = module.net.class_layers.out.weight.detach()
    for batch in (1, 8):
        x = torch.randn(batch, card.in_channels, size, size).to(memory_format=torch.channels_last)

        def fwd(cams: bool) -> None:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                logits, feats = module(x)
            if cams:
                maps = raw_cams(feats.float(), weight)
                torch.nn.functional.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)

        for mode, cams in (("forward", False), ("forward+cams", True)):
            try:
                sec, _ = timed(lambda: fwd(cams), **timing)
            except Exception as exc:  # bf16 kernels missing on this CPU
                print(f"  cpu  torch  bf16 {size}px batch {batch}: unavailable ({exc})")
                return
            rec.add(device="cpu", runtime="torch", precision="bf16+chlast", size=size, batch=batch, mode=mode,
                    sec_per_batch=sec, threads=torch.get_num_threads())


def _worker(model_dir: str, cache: str, runtime: str, threads: int, seconds: float, barrier, queue) -> None:
    torch.set_num_threads(threads)
    model = load_model(model_dir, runtime, cache_dir=cache, threads=threads)
    from cxr_model.preprocess import preprocess

    x = preprocess(test_images(model.card.input_size, 1)[0], model.card)[0][None]
    model.backend.forward(x)
    barrier.wait()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.backend.forward(x)
        n += 1
    queue.put((n, time.perf_counter() - start))


def bench_processes(rec: Recorder, model_dir: Path, cache: Path, args) -> None:
    ctx = mp.get_context("spawn")
    runtimes = ("onnx",) if args.quick else ("onnx", "torch")
    for runtime in runtimes:
        for procs, threads in ((2, 1), (1, 2)):
            barrier, queue = ctx.Barrier(procs), ctx.Queue()
            ps = [ctx.Process(target=_worker, args=(str(model_dir), str(cache), runtime, threads, args.proc_seconds,
                                                     barrier, queue)) for _ in range(procs)]
            for p in ps:
                p.start()
            results = [queue.get(timeout=300) for _ in ps]
            for p in ps:
                p.join()
            ips = sum(n / t for n, t in results)
            rec.add(device="cpu", runtime=runtime, precision="fp32", size=224, batch=1,
                    mode=f"{procs}proc x {threads}thr", sec_per_batch=1 / ips, threads=threads, processes=procs)


def bench_cuda(rec: Recorder, model_dirs: dict[int, Path], args) -> None:
    dev = torch.device("cuda")
    print(f"\nCUDA: {torch.cuda.get_device_name(dev)}")
    batches = (1, 8, 32) if args.quick else (1, 8, 32, 64, 128, 256)
    for size, d in model_dirs.items():
        model = load_model(d, "auto", device="cuda")  # the production path: fp32, CAMs mapped on the CPU
        for batch in (1, 8, 32):
            images = test_images(size, batch)
            model.batch_size = batch
            sec, _ = timed(lambda: model.predict(images, cams=True), min_time=args.min_time, min_iters=2, warmup=1)
            rec.add(device="cuda", runtime=model.runtime, precision="fp32", size=size, batch=batch,
                    mode="predict+cams", sec_per_batch=sec, threads=torch.get_num_threads())
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

                for mode, cams in (("forward", False), ("forward+cams", True)):
                    try:
                        sec, _ = timed(lambda: fwd(cams), min_time=args.min_time, min_iters=3, warmup=2)
                    except torch.cuda.OutOfMemoryError:
                        print(f"  cuda {precision} {size}px batch {batch}: out of memory")
                        torch.cuda.empty_cache()
                        break
                    rec.add(device="cuda", runtime="torch", precision=precision, size=size, batch=batch, mode=mode,
                            sec_per_batch=sec, threads=None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="cxr_model throughput benchmark (prints numbers)")
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--skip-cpu", action="store_true", help="only the CUDA measurements")
    parser.add_argument("--min-time", type=float, help="seconds per measurement (default 0.3 quick, 3 full)")
    args = parser.parse_args(argv)
    args.min_time = args.min_time or (0.3 if args.quick else 3.0)
    args.proc_seconds = 2.0 if args.quick else 10.0

    import onnxruntime

    print(f"cxr_model benchmark{' (quick)' if args.quick else ''}: {cpu_name()}, {os.cpu_count()} logical CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}, "
          f"python {sys.version.split()[0]}")
    print(f"GFLOP/s assumes {GFLOPS_224} GFLOPs per 224x224 image, scaled by (size/224)^2")
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} (other processes on these cores distort CPU numbers)\n")
    rec = Recorder()
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        tmp_path = Path(tmp)
        cache = tmp_path / "onnx-cache"
        model_dirs = {}
        for size in args.sizes:
            model_dirs[size] = tmp_path / f"demo-{size}"
            build_demo_model(model_dirs[size], input_size=size)
        if not args.skip_cpu:
            print("CPU, per configuration:")
            bench_cpu(rec, model_dirs, cache, args)
        if 224 in model_dirs and not args.skip_cpu:
            print("\nCPU, 224px batch 1, two single-thread processes vs one two-thread process (total):")
            bench_processes(rec, model_dirs[224], cache, args)
        if torch.cuda.is_available():
            bench_cuda(rec, model_dirs, args)
        else:
            print("\nCUDA: not available, GPU path skipped")
    load_after = os.getloadavg()
    print(f"\nload average after: {load_after[0]:.2f}")
    if args.json:
        meta = {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__, "quick": args.quick, "gflops_per_224_image": GFLOPS_224,
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                "loadavg_before": load_before[0], "loadavg_after": load_after[0]}
        args.json.write_text(json.dumps({"meta": meta, "results": rec.rows}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
