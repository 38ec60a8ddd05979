"""Our storage SCP against dcmtk's storescp: the same files, the same sender (dcmtk storescu), one association.

Prints instances/s and MB/s for each receiver and their ratio; --json writes them too.

Our node does more per instance than storescp: UID validation, a temp file, fsync, rename,
a directory fsync, and a committed database row (SQLite by default, or --database-url)
before it answers 0x0000. storescp only writes the file. The ratio is the price of
"never lose a study".

    python bench/scp_bench.py [--n 200] [--file tests/data/cxr_dicom/...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
#: dcmtk leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment; with it on, each
#: C-STORE waits for a delayed ACK (~45 ms here) and storescp looks 20x slower than it is.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
DEFAULT_FILE = ROOT / "tests" / "data" / "cxr_dicom" / "cr_chest_pa_mono1_10bit_explicit_le.dcm"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_copies(source: Path, n: int, out: Path) -> list[Path]:
    """n instances of one series of one study, each with its own SOP Instance UID."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = out / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def wait_for_echo(port: int, aet: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["echoscu", "-aec", aet, "127.0.0.1", str(port)], capture_output=True,
                          env=DCMTK_ENV).returncode == 0:
            return
        time.sleep(0.3)
    raise SystemExit(f"no C-ECHO answer from {aet} on port {port}")


def send(port: int, aet: str, files_dir: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(["storescu", "-aec", aet, "+sd", "127.0.0.1", str(port), str(files_dir)],
                            capture_output=True, text=True, env=DCMTK_ENV)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"storescu to {aet} failed:\n{result.stderr[-2000:]}")
    return elapsed


def run_storescp(files_dir: Path, work: Path) -> float:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    process = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), "--bit-preserving", "--max-pdu", "131072", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DCMTK_ENV)
    try:
        wait_for_echo(port, "STORESCP")
        return send(port, "STORESCP", files_dir)
    finally:
        process.terminate()
        process.wait(timeout=10)


def run_node(files_dir: Path, work: Path, database_url: str | None) -> float:
    port = free_port()
    env = {
        **os.environ,
        "CXR_TRIAGE_DATA_DIR": str(work / "node"),
        "CXR_TRIAGE_DICOM_PORT": str(port),
        "CXR_TRIAGE_DICOM_HOST": "127.0.0.1",
        "CXR_TRIAGE_AE_TITLE": "CXR_BENCH",
        "CXR_TRIAGE_SERIES_QUIET_SECONDS": "3600",  # measure reception only
        "CXR_TRIAGE_LOG_LEVEL": "WARNING",
    }
    if database_url:
        env["CXR_TRIAGE_DATABASE_URL"] = database_url
    cli = [sys.executable, "-m", "cxr_triage.cli"]
    subprocess.run(cli + ["db", "upgrade"], env=env, check=True, capture_output=True)
    process = subprocess.Popen(cli + ["node"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_echo(port, "CXR_BENCH")
        return send(port, "CXR_BENCH", files_dir)
    finally:
        process.terminate()
        process.wait(timeout=20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="instances to send (default 200)")
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE, help="the instance to copy")
    parser.add_argument("--database-url", help="our node's database (default: SQLite in a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install dcmtk")

    with tempfile.TemporaryDirectory(prefix="scp-bench-") as tmp:
        work = Path(tmp)
        files_dir = work / "files"
        files_dir.mkdir()
        files = make_copies(args.file, args.n, files_dir)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        dcmtk = run_storescp(files_dir, work)
        ours = run_node(files_dir, work, args.database_url)

    results = {
        "instances": args.n,
        "megabytes": round(megabytes, 2),
        "storescp_seconds": round(dcmtk, 3),
        "node_seconds": round(ours, 3),
        "storescp_instances_per_s": round(args.n / dcmtk, 1),
        "node_instances_per_s": round(args.n / ours, 1),
        "node_vs_storescp_throughput": round(dcmtk / ours, 3),
        "database": "SQLite (embedded default)" if not args.database_url else "given URL",
    }
    print(f"{args.n} instances, {megabytes:.1f} MB, one storescu association each")
    print(f"  dcmtk storescp : {dcmtk:7.2f} s  {args.n / dcmtk:7.1f} inst/s  {megabytes / dcmtk:7.1f} MB/s")
    print(f"  cxr-triage node: {ours:7.2f} s  {args.n / ours:7.1f} inst/s  {megabytes / ours:7.1f} MB/s"
          f"  ({results['database']}; fsync + DB commit per instance)")
    print(f"  node throughput = {dcmtk / ours:.2f} x storescp")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
