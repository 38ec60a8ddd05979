"""Locations of files shipped inside the package."""

from __future__ import annotations

from pathlib import Path


def bundled_demo_path() -> Path:
    """Directory of the demo model shipped inside the package (DEMO WEIGHTS, not for diagnostic use)."""
    return Path(__file__).resolve().parent / "bundled" / "demo-densenet121"


def reference_radiograph_paths() -> list[Path]:
    """The bundled reference chest radiographs (PNG) that calibrate and check the int8 runtime."""
    return sorted((Path(__file__).resolve().parent / "bundled" / "reference").glob("*.png"))
