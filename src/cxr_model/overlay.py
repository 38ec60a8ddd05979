"""Heatmap overlays: a greyscale radiograph with a CAM in a perceptual colour map and a legend.

No plotting library: the colour map is matplotlib's *inferno* sampled at 17
points (every 16th entry of its 256-entry table) and interpolated linearly;
the legend is drawn with Pillow's built-in font.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# inferno, entries 0, 16, 32, ..., 240, 255 of matplotlib's listed colour map (CC0).
_INFERNO_ANCHORS = np.array(
    [
        [0.001462, 0.000466, 0.013866],
        [0.042253, 0.028139, 0.141141],
        [0.129285, 0.047293, 0.290788],
        [0.238273, 0.036621, 0.396353],
        [0.341500, 0.062325, 0.429425],
        [0.441207, 0.099338, 0.431594],
        [0.540920, 0.134729, 0.415123],
        [0.640135, 0.171438, 0.381065],
        [0.735683, 0.215906, 0.330245],
        [0.822386, 0.275197, 0.266085],
        [0.894305, 0.353399, 0.193584],
        [0.946965, 0.449191, 0.115272],
        [0.978422, 0.557937, 0.034931],
        [0.987874, 0.675267, 0.065257],
        [0.974638, 0.797692, 0.206332],
        [0.947594, 0.917399, 0.410665],
        [0.988362, 0.998364, 0.644924],
    ]
)
_ANCHOR_POS = np.array([i * 16 for i in range(16)] + [255]) / 255.0
INFERNO_LUT: np.ndarray = np.stack(
    [np.interp(np.linspace(0, 1, 256), _ANCHOR_POS, _INFERNO_ANCHORS[:, c]) for c in range(3)], axis=1
)
INFERNO_LUT_U8: np.ndarray = np.round(INFERNO_LUT * 255).astype(np.uint8)

#: how opaque the colour is where the CAM is 1 (it fades to 0 where the CAM is 0).
MAX_ALPHA = 0.6
#: longest side of a written overlay; larger radiographs are shown downsampled.
MAX_SIDE = 1024


def colorize(cam: np.ndarray) -> np.ndarray:
    """(H, W) map in [0, 1] -> (H, W, 3) uint8 inferno colours."""
    idx = np.clip(np.round(np.nan_to_num(cam) * 255), 0, 255).astype(np.uint8)
    return INFERNO_LUT_U8[idx]


def blend(image: np.ndarray, cam: np.ndarray, max_alpha: float = MAX_ALPHA) -> np.ndarray:
    """Greyscale [0, 1] image + [0, 1] CAM of the same shape -> (H, W, 3) uint8 RGB overlay."""
    if image.shape != cam.shape:
        raise ValueError(f"image {image.shape} and CAM {cam.shape} differ in shape")
    grey = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2)
    alpha = (max_alpha * np.clip(cam, 0, 1))[..., None]
    rgb = (1 - alpha) * grey + alpha * (colorize(cam).astype(np.float32) / 255.0)
    return np.round(rgb * 255).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _fit(arr: np.ndarray) -> np.ndarray:
    """A float (H, W) array shrunk (Lanczos) so that its longer side is at most MAX_SIDE."""
    if max(arr.shape) <= MAX_SIDE:
        return arr
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))  # mode "F"
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.float32)


def render_overlay(image: np.ndarray, cam: np.ndarray, legend: Sequence[str]) -> Image.Image:
    """The overlay with a colour bar and the legend lines in a black band below it (not over the anatomy).

    Radiographs larger than MAX_SIDE are shrunk before blending (image and map alike), not after.
    """
    if image.shape != cam.shape:
        raise ValueError(f"image {image.shape} and CAM {cam.shape} differ in shape")
    rgb = Image.fromarray(blend(np.clip(_fit(image), 0, 1), np.clip(_fit(cam), 0, 1)))
    w, h = rgb.size
    font_size = max(12, w // 48)
    font = _font(font_size)
    line_h = int(font_size * 1.35)
    bar_h = max(8, font_size // 2)
    band_h = bar_h + line_h * (len(legend) + 1) + 8
    out = Image.new("RGB", (w, h + band_h), (0, 0, 0))
    out.paste(rgb, (0, 0))
    bar = np.repeat(INFERNO_LUT_U8[np.linspace(0, 255, w).astype(int)][None], bar_h, axis=0)
    out.paste(Image.fromarray(bar), (0, h))
    draw = ImageDraw.Draw(out)
    y = h + bar_h + 2
    draw.text((4, y), "low evidence", fill=(200, 200, 200), font=font)
    right = "high evidence"
    draw.text((w - 4 - draw.textlength(right, font=font), y), right, fill=(200, 200, 200), font=font)
    for i, line in enumerate(legend):
        color = (255, 80, 80) if ("DEMO" in line or "NOT FOR" in line.upper()) else (255, 255, 255)
        draw.text((4, y + line_h * (i + 1)), line, fill=color, font=font)
    return out
