"""The one heatmap renderer: a CAM over a radiograph as an RGB picture with a legend.

Used by the heatmap Secondary Capture (`sc.py`) and by ``cxr-triage predict
--heatmaps`` (PNG files), so that both show the same picture with the same
legend. Pure numpy + Pillow. The blend runs in Pillow through 256-entry
tables (colour and opacity per relevance level), so that one 1024 x 1024
overlay costs a few milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "DEMO_WARNING",
    "HeatmapCaption",
    "MAX_SIDE",
    "NOT_FOR_DIAGNOSTIC_USE",
    "backdrop",
    "colormap",
    "normalise_cam",
    "render_heatmap",
    "render_on_backdrop",
    "render_overlay",
    "render_overview",
]

MAX_SIDE = 768  # the display size of heatmaps (CXR_TRIAGE_HEATMAP_MAX_SIDE)
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
DEMO_WARNING = "DEMO WEIGHTS - not trained on clinical data"
_ALPHA = 0.6  # opacity of the colour at the highest CAM value

# Matplotlib's "inferno" (perceptually uniform, readable in greyscale and by
# most colour-blind readers) sampled at 0.0, 0.1, ..., 1.0.
_INFERNO_HEX = (
    "000004", "160b39", "420a68", "6a176e", "932667", "bc3754",
    "dd513a", "f37819", "fca50a", "f6d746", "fcffa4",
)
_INFERNO = np.array([[int(h[i : i + 2], 16) for i in (0, 2, 4)] for h in _INFERNO_HEX], dtype=np.float64) / 255.0
_STOPS = np.linspace(0.0, 1.0, len(_INFERNO_HEX))


@dataclass(frozen=True)
class HeatmapCaption:
    """What a heatmap's legend says: the finding, its score and the model that made it."""

    finding: str
    probability: float
    threshold: float
    present: bool
    #: No finding is above its threshold: this map shows the most probable one.
    summary: bool
    model_name: str
    model_version: str
    demo: bool

    def lines(self) -> list[str]:
        status = "POSITIVE" if self.present else "below threshold"
        return [
            f"{self.finding.replace('_', ' ')}: probability {self.probability:.2f} "
            f"(threshold {self.threshold:.2f}, {status})"
            + ("  [summary: no finding above its threshold]" if self.summary else ""),
            f"Model: {self.model_name} {self.model_version}",
        ]

    def warnings(self) -> list[str]:
        return [NOT_FOR_DIAGNOSTIC_USE] + ([DEMO_WARNING] if self.demo else [])


def render_heatmap(display: np.ndarray, cam: np.ndarray, caption: HeatmapCaption, max_side: int = MAX_SIDE) -> np.ndarray:
    """The heatmap picture of one finding: `cam` over `display` with the legend of `caption`."""
    return render_on_backdrop(backdrop(display, max_side), cam, caption.lines(), caption.warnings())


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB in [0, 1] (shape + (3,)) with inferno."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    return np.stack([np.interp(v, _STOPS, _INFERNO[:, c]) for c in range(3)], axis=-1)


# Blend tables indexed by the relevance level 0..255: the colour of each
# level (a palette) and its opacity a = _ALPHA * level / 255 (as a mask for
# Pillow's composite, 0..255), so that the blend runs in Pillow's C code.
_LEVELS = np.linspace(0.0, 1.0, 256)
_COLOUR_BAR = np.round(colormap(_LEVELS) * 255.0).astype(np.uint8)
_PALETTE = _COLOUR_BAR.tobytes()
_OPACITY = [int(v) for v in np.round(_ALPHA * _LEVELS * 255.0)]


def _resize(
    array: np.ndarray, size: tuple[int, int], resample: Image.Resampling = Image.Resampling.BILINEAR
) -> np.ndarray:
    """Resize a 2-D float array to (width, height)."""
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F")
    return np.asarray(image.resize(size, resample), dtype=np.float32)


def normalise_cam(cam: np.ndarray) -> np.ndarray:
    """Scale a class activation map to [0, 1] (relative relevance)."""
    cam = np.asarray(cam, dtype=np.float32)
    if not np.isfinite(cam).all():
        cam = np.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(cam.min()), float(cam.max())
    if high <= low:
        return np.zeros_like(cam)
    return (cam - low) * np.float32(1.0 / (high - low))


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: bitmap font
        return ImageFont.load_default()


def backdrop(display: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """The radiograph as 8-bit grey, longest side at most `max_side`.

    Computed once per source image and shared by all its overlays. Quantised
    to 8 bits before the (antialiased) downscale, which Pillow does several
    times faster on 8-bit than on float images; the result is 8-bit anyway.
    """
    display = np.asarray(display)
    if display.ndim != 2 or min(display.shape) < 2:
        raise ValueError(f"display must be a 2-D image, got shape {display.shape}")
    grey = np.clip(np.asarray(display, dtype=np.float32) * np.float32(255.0) + np.float32(0.5), 0.0, 255.0)
    grey = grey.astype(np.uint8)
    rows, columns = display.shape
    scale = min(1.0, max_side / max(rows, columns))
    if scale < 1.0:
        size = (max(2, round(columns * scale)), max(2, round(rows * scale)))
        grey = np.asarray(Image.fromarray(grey, mode="L").resize(size, Image.Resampling.BILINEAR))
    return grey


def render_on_backdrop(
    grey: np.ndarray, cam: np.ndarray, lines: Sequence[str], warning_lines: Sequence[str]
) -> np.ndarray:
    """Blend `cam` over the 8-bit `grey` (from `backdrop`) and add the legend band."""
    return _add_legend(_blend(grey, cam), list(lines), list(warning_lines))


def _blend(grey: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """`cam` (any size) in the colour map over the 8-bit `grey`, as RGB of `grey`'s size."""
    cam = np.asarray(cam)
    if cam.ndim != 2 or min(cam.shape) < 1:
        raise ValueError(f"cam must be a 2-D map, got shape {cam.shape}")
    height, width = grey.shape
    if cam.shape != grey.shape:
        # Upsampling (the model's coarse map): bilinear. Downsampling a map
        # that is already smooth (one upsampled by the model to the source
        # grid): nearest, several times faster and the same to the eye.
        smaller = cam.shape[0] > height and cam.shape[1] > width
        cam = _resize(cam, (width, height), Image.Resampling.NEAREST if smaller else Image.Resampling.BILINEAR)
    level = np.clip(normalise_cam(cam) * np.float32(255.0) + np.float32(0.5), 0.0, 255.0).astype(np.uint8)
    relevance = Image.fromarray(level, mode="L")
    colour = relevance.convert("P")
    colour.putpalette(_PALETTE)
    underneath = Image.fromarray(grey, mode="L").convert("RGB")
    blended = Image.composite(colour.convert("RGB"), underneath, relevance.point(_OPACITY))
    return np.asarray(blended, dtype=np.uint8)


def render_overview(
    display: np.ndarray, tiles: Sequence[tuple[np.ndarray, str]], lines: Sequence[str],
    warning_lines: Sequence[str], max_side: int = MAX_SIDE,
) -> np.ndarray:
    """One picture of several findings: a mosaic of (cam, label) tiles over the radiograph, each
    labelled, with one legend band below. For a study with more positive findings than get an
    image each, so that one image shows where the model looked for all of them."""
    if not tiles:
        raise ValueError("an overview needs at least one tile")
    count = len(tiles)
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    tile_side = max(64, max_side // columns)
    grey = backdrop(display, tile_side)
    tile_height, tile_width = grey.shape
    mosaic = Image.new("RGB", (columns * tile_width, rows * tile_height), (0, 0, 0))
    font_size = max(10, min(18, tile_width // 18))
    font = _font(font_size)
    for index, (cam, label) in enumerate(tiles):
        tile = Image.fromarray(_blend(grey, cam), mode="RGB")
        draw = ImageDraw.Draw(tile)
        box = draw.textbbox((0, 0), label, font=font)
        draw.rectangle((0, 0, box[2] + 8, box[3] + 6), fill=(0, 0, 0))
        draw.text((4, 2), label, fill=(255, 255, 255), font=font)
        mosaic.paste(tile, ((index % columns) * tile_width, (index // columns) * tile_height))
    return _add_legend(np.asarray(mosaic, dtype=np.uint8), list(lines), list(warning_lines))


def render_overlay(display: np.ndarray, cam: np.ndarray, lines: Sequence[str], warning_lines: Sequence[str]) -> np.ndarray:
    """Blend `cam` over the greyscale `display` and add a legend band below.

    Args:
        display: 2-D radiograph in [0, 1] (1 = white), as `display_array` gives.
        cam: 2-D map of any size; resized to the radiograph, scaled to [0, 1].
        lines: legend text (finding, probability, model).
        warning_lines: text drawn in a warning colour (not for diagnostic use,
            demo weights).

    Returns:
        uint8 RGB array (rows, columns, 3); longest side of the radiograph
        part at most `MAX_SIDE`; the legend band adds rows below it.
    """
    return render_on_backdrop(backdrop(display), cam, lines, warning_lines)


def _add_legend(picture: np.ndarray, lines: list[str], warning_lines: list[str]) -> np.ndarray:
    height, width = picture.shape[:2]
    font_size = max(10, min(24, width // 45))
    font = _font(font_size)
    line_height = font_size + max(3, font_size // 3)
    margin = max(4, font_size // 2)
    bar_height = max(8, font_size)
    text_lines = lines + warning_lines
    band_height = margin + bar_height + line_height + len(text_lines) * line_height + margin
    band = Image.new("RGB", (width, band_height), (0, 0, 0))
    draw = ImageDraw.Draw(band)

    # Colour bar: relevance 0 -> 1, left to right, with its labels under it.
    top = margin
    left, right = margin, max(margin + 20, width // 2)
    ramp = _COLOUR_BAR[np.linspace(0, 255, right - left).round().astype(np.intp)]
    band.paste(Image.fromarray(np.repeat(ramp[None, :, :], bar_height, axis=0), mode="RGB"), (left, top))
    draw.rectangle((left - 1, top - 1, right, top + bar_height), outline=(255, 255, 255))
    label_y = top + bar_height + 2
    draw.text((left, label_y), "low", fill=(255, 255, 255), font=font)
    draw.text((right + margin, top), "CAM relevance (relative)", fill=(255, 255, 255), font=font)
    high_width = draw.textlength("high", font=font)
    draw.text((right - high_width, label_y), "high", fill=(255, 255, 255), font=font)

    y = top + bar_height + line_height
    for text in lines:
        draw.text((margin, y), text, fill=(255, 255, 255), font=font)
        y += line_height
    for text in warning_lines:
        draw.text((margin, y), text, fill=(255, 200, 0), font=font)
        y += line_height
    return np.concatenate([picture, np.asarray(band, dtype=np.uint8)], axis=0)
