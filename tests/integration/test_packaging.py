"""Installed from a wheel, away from any checkout, `cxr-triage db upgrade` migrates a database: the
migrations travel inside the package."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_wheel_installed_in_a_fresh_venv_upgrades_a_database(tmp_path):
    source = tmp_path / "source"  # a copy: the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir",
                            str(dist), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("cxr_triage-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "cxr_triage/migrations/env.py" in names and "cxr_triage/migrations/script.py.mako" in names
    assert {f"cxr_triage/migrations/versions/{v}.py" for v in
            ("0001_initial_worklist_schema", "0004_work_leases", "0005_operability")} <= set(names)

    # A fresh venv with the wheel alone; its dependencies are borrowed from this environment's
    # site-packages through a .pth line (a plain path: this checkout's editable install is not activated).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    fresh = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(fresh), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(fresh), "install", "--no-deps",
                                "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"  # no alembic.ini, no checkout
    elsewhere.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(elsewhere), "CXR_TRIAGE_DATA_DIR": str(elsewhere / "var")}
    where = subprocess.run([str(fresh), "-c", "import cxr_triage; print(cxr_triage.__file__)"], env=env, cwd=elsewhere,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(purelib)), where
    upgraded = subprocess.run([str(venv / "bin" / "cxr-triage"), "db", "upgrade"], env=env, cwd=elsewhere,
                              capture_output=True, text=True, timeout=300)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert "database schema is at head" in upgraded.stdout
    database = sqlite3.connect(elsewhere / "var" / "triage.sqlite")
    try:
        (revision,) = database.execute("SELECT version_num FROM alembic_version").fetchone()
        tables = {row[0] for row in database.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        database.close()
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(ROOT / "src" / "cxr_triage" / "migrations")).get_current_head()
    assert revision == head and {"studies", "jobs", "heartbeats", "audit_events"} <= tables
    version = subprocess.run([str(venv / "bin" / "cxr-triage"), "--version"], env=env, cwd=elsewhere,
                             capture_output=True, text=True, timeout=120)
    assert version.stdout.strip() == "cxr-triage 0.1.0"
