"""Locations of files shipped inside the package."""

from __future__ import annotations

from pathlib import Path


def bundled_demo_path() -> Path:
    """Directory of the demo model shipped inside the package (DEMO WEIGHTS, not for diagnostic use)."""
    return Path(__file__).resolve().parent / "bundled" / "demo-densenet121"
