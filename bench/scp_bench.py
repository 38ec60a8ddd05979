"""C-STORE reception: our node against Orthanc and dcmtk's storescp, on the same files from the same sender.

For each case (small ~375 KB CR instances and large ~8 MB 2048x2048 16-bit
instances, 1 and 4 concurrent senders) every receiver starts fresh on its own
port and directory, dcmtk's storescu sends the same files (4 senders: 4
storescu processes, one association each, a quarter of the files each), and
the wall time from the first connection to the last response is measured.
The bench then checks that every receiver holds every instance.

- cxr-triage node (`cxr-triage node`, its defaults: receiving processes, group
  commit): each instance is checked, fsynced, renamed, its directory fsynced and
  its row committed (SQLite synchronous=FULL, or --database-url) before 0x0000.
- Orthanc (started here): SyncStorageArea true (fsync of every file), its
  SQLite index, no plugins, DicomThreadsCount 4, MaximumPduLength 131072,
  TCP_NODELAY=1 like the dcmtk tools (its DICOM server is DCMTK's).
- storescp: writes the files (--bit-preserving), no fsync, no index: the
  ceiling of the network stack, not a durable receiver. --max-pdu 131072.

Prints a table with instances/s and the ratios node/Orthanc and node/storescp;
--json writes the same numbers.

    python bench/scp_bench.py [--small 200] [--large 32] [--senders 1,4] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
#: dcmtk leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment; with it on, each
#: C-STORE waits for a delayed ACK (~45 ms here) and every receiver looks 20x slower than it is.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
DEFAULT_FILE = ROOT / "tests" / "data" / "cxr_dicom" / "cr_chest_pa_mono1_10bit_explicit_le.dcm"
PEER_MAX_PDU = "131072"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_copies(source: Path, n: int, out: Path, *, large: bool = False) -> list[Path]:
    """n instances of one series of one study, each with its own SOP Instance UID.
    `large`: the image tiled to 2048 x 2048 at 16 bits (8 MiB of pixel data)."""
    ds = pydicom.dcmread(source)
    if large:
        pixels = ds.pixel_array.astype(np.uint16)
        tiled = np.tile(pixels, (2048 // pixels.shape[0] + 1, 2048 // pixels.shape[1] + 1))[:2048, :2048]
        ds.Rows, ds.Columns = 2048, 2048
        ds.BitsAllocated = 16
        ds.PixelData = np.ascontiguousarray(tiled).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = out / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def split(paths: list[Path], senders: int, out: Path) -> list[Path]:
    """`senders` directories holding hard links to an equal share of the files."""
    dirs = []
    for index in range(senders):
        directory = out / f"sender{index}"
        directory.mkdir(parents=True)
        for path in paths[index::senders]:
            os.link(path, directory / path.name)
        dirs.append(directory)
    return dirs


def wait_for_echo(port: int, aet: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["echoscu", "-aec", aet, "127.0.0.1", str(port)], capture_output=True,
                          env=DCMTK_ENV).returncode == 0:
            return
        time.sleep(0.3)
    raise SystemExit(f"no C-ECHO answer from {aet} on port {port}")


def send(port: int, aet: str, dirs: list[Path]) -> float:
    """All senders at once; the seconds until the last one has its last response."""
    started = time.perf_counter()
    senders = [subprocess.Popen(["storescu", "-aec", aet, "+sd", "127.0.0.1", str(port), str(d)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=DCMTK_ENV)
               for d in dirs]
    errors = [s.communicate()[1] for s in senders]
    elapsed = time.perf_counter() - started
    for sender, error in zip(senders, errors):
        if sender.returncode != 0:
            raise SystemExit(f"storescu to {aet} failed:\n{error[-2000:]}")
    return elapsed


class Receiver:
    name = ""
    aet = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def stored(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class StoreSCP(Receiver):
    name, aet = "storescp", "STORESCP"

    def start(self) -> None:
        self.out = self.work / "storescp"
        self.out.mkdir()
        self.process = subprocess.Popen(["storescp", "-aet", self.aet, "-od", str(self.out), "--bit-preserving",
                                         "--max-pdu", PEER_MAX_PDU, str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DCMTK_ENV)
        wait_for_echo(self.port, self.aet)

    def stored(self) -> int:
        return sum(1 for p in self.out.iterdir() if p.is_file())


class Orthanc(Receiver):
    name, aet = "Orthanc", "ORTHANC_BENCH"

    def start(self) -> None:
        storage = self.work / "orthanc"
        storage.mkdir()
        self.http_port = free_port()
        config = {
            "Name": "scp-bench", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "DicomAet": self.aet, "DicomPort": self.port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True, "Plugins": [], "SyncStorageArea": True, "StorageCompression": False,
            "DicomThreadsCount": 4, "MaximumPduLength": int(PEER_MAX_PDU), "StableAge": 3600,
            "SaveJobs": False, "HttpServerEnabled": True,
        }
        (self.work / "orthanc.json").write_text(json.dumps(config))
        # Orthanc's DICOM server is DCMTK's: TCP_NODELAY=1 in its environment switches Nagle off as for
        # storescu and storescp (without it every C-STORE response waits ~45 ms for a delayed ACK).
        self.process = subprocess.Popen(["Orthanc", str(self.work / "orthanc.json")], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env=DCMTK_ENV)
        wait_for_echo(self.port, self.aet)

    def stored(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/statistics", timeout=30) as response:
            return int(json.load(response)["CountInstances"])


class Node(Receiver):
    name, aet = "cxr-triage node", "CXR_BENCH"

    def __init__(self, work: Path, database_url: str | None, receivers: int | None) -> None:
        super().__init__(work)
        self.database_url = database_url
        self.receivers = receivers

    def start(self) -> None:
        self.data = self.work / "node"
        env = {
            **os.environ,
            "CXR_TRIAGE_DATA_DIR": str(self.data),
            "CXR_TRIAGE_DICOM_PORT": str(self.port),
            "CXR_TRIAGE_DICOM_HOST": "127.0.0.1",
            "CXR_TRIAGE_AE_TITLE": self.aet,
            "CXR_TRIAGE_SERIES_QUIET_SECONDS": "3600",  # measure reception only
            "CXR_TRIAGE_LOG_LEVEL": "WARNING",
        }
        if self.database_url:
            env["CXR_TRIAGE_DATABASE_URL"] = self.database_url
        if self.receivers:
            env["CXR_TRIAGE_DICOM_RECEIVERS"] = str(self.receivers)
        cli = [sys.executable, "-m", "cxr_triage.cli"]
        subprocess.run(cli + ["db", "upgrade"], env=env, check=True, capture_output=True)
        self.process = subprocess.Popen(cli + ["node"], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for_echo(self.port, self.aet)

    def stored(self) -> int:
        if self.database_url:
            return -1  # counted by the caller's database tools
        with sqlite3.connect(self.data / "triage.sqlite") as connection:
            return connection.execute("SELECT count(*) FROM instances").fetchone()[0]


@dataclass
class Case:
    label: str
    files: list[Path]
    senders: int


def run_case(case: Case, work: Path, args: argparse.Namespace) -> dict:
    """Every receiver `args.rounds` times, interleaved (noise on a shared machine hits all of them);
    the median of each receiver's rounds is its figure."""
    dirs = split(case.files, case.senders, work / "split")
    megabytes = sum(p.stat().st_size for p in case.files) / 1e6
    n = len(case.files)
    row: dict = {"case": case.label, "instances": n, "senders": case.senders, "megabytes": round(megabytes, 1),
                 "rounds": args.rounds}
    makers = {"storescp": lambda w: StoreSCP(w), "Orthanc": lambda w: Orthanc(w),
              "cxr-triage node": lambda w: Node(w, args.database_url, args.receivers)}
    seconds: dict[str, list[float]] = {name: [] for name in makers}
    for round_index in range(args.rounds):
        for name, make in makers.items():
            receiver = make(work / f"{name.split()[0]}-{round_index}")
            receiver.work.mkdir()
            receiver.start()
            try:
                elapsed = send(receiver.port, receiver.aet, dirs)
                time.sleep(0.2)
                stored = receiver.stored()
            finally:
                receiver.stop()
            if stored not in (-1, n):
                raise SystemExit(f"{receiver.name} holds {stored} of {n} instances after {case.label}")
            seconds[name].append(elapsed)
            shutil.rmtree(receiver.work, ignore_errors=True)
    for name, values in seconds.items():
        median = statistics.median(values)
        row[name] = {"seconds": round(median, 3), "instances_per_s": round(n / median, 1),
                     "megabytes_per_s": round(megabytes / median, 1),
                     "instances_per_s_each_round": [round(n / v, 1) for v in values]}
    node, orthanc, storescp = row["cxr-triage node"], row["Orthanc"], row["storescp"]
    row["node_vs_orthanc"] = round(node["instances_per_s"] / orthanc["instances_per_s"], 2)
    row["node_vs_storescp"] = round(node["instances_per_s"] / storescp["instances_per_s"], 2)
    shutil.rmtree(work / "split", ignore_errors=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200, help="small instances per case (default 200)")
    parser.add_argument("--large", type=int, default=32, help="large instances per case (default 32)")
    parser.add_argument("--senders", default="1,4", help="concurrent senders, comma list (default 1,4)")
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE, help="the instance to copy")
    parser.add_argument("--database-url", help="our node's database (default: SQLite in a temp dir)")
    parser.add_argument("--receivers", type=int, help="our node's receiving processes (default: its own)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each receiver per case (median; default 3)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    for tool in ("storescu", "storescp", "echoscu", "Orthanc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install dcmtk orthanc")
    senders = [int(s) for s in args.senders.split(",") if s.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="scp-bench-") as tmp:
        work = Path(tmp)
        sets = []
        if args.small:
            sets.append(("small", make_copies(args.file, args.small, work / "small")))
        if args.large:
            sets.append(("large", make_copies(args.file, args.large, work / "large", large=True)))
        for size, files in sets:
            for count in senders:
                label = f"{size} ({files[0].stat().st_size / 1e6:.2f} MB) x {count} sender{'s' if count > 1 else ''}"
                case_dir = work / f"case-{size}-{count}"
                case_dir.mkdir()
                rows.append(run_case(Case(label, files, count), case_dir, args))
                print(f"done: {label}", file=sys.stderr)
    print(f"C-STORE reception, instances/s (MB/s), median of {args.rounds} interleaved round(s); cxr-triage node on "
          f"{'SQLite (embedded default)' if not args.database_url else 'the given database'}, "
          f"{args.receivers or 'default'} receiving process(es)")
    header = f"{'case':34} {'storescp':>16} {'Orthanc':>16} {'node':>16} {'node/Orthanc':>13} {'node/storescp':>14}"
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = [f"{row[name]['instances_per_s']:7.1f} ({row[name]['megabytes_per_s']:5.1f})"
                 for name in ("storescp", "Orthanc", "cxr-triage node")]
        print(f"{row['case']:34} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} "
              f"{row['node_vs_orthanc']:>12.2f}x {row['node_vs_storescp']:>13.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"cases": rows, "database": args.database_url or "sqlite",
                                         "receivers": args.receivers}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
