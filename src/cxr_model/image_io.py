"""Reading PNG/JPEG radiographs into the model's [0, 1] input form."""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageRefused, ModelError

#: largest image accepted (pixels); anything larger is refused, not decoded.
MAX_PIXELS = 100_000_000
#: mean absolute difference (in [0, 1] units) between colour channels above
#: which an RGB file is treated as a colour picture, not a greyscale radiograph.
COLOUR_TOLERANCE = 8 / 255


def load_image_file(path: str | os.PathLike[str]) -> np.ndarray:
    """Load an 8- or 16-bit greyscale PNG/JPEG as float32 (H, W) in [0, 1].

    Scaling follows the stored bit depth (value / 255 or / 65535), 1 = white.
    EXIF orientation is applied.  RGB files are accepted only when their
    channels are (nearly) equal.  Raises :class:`ImageRefused` with the reason
    for files that are not usable greyscale radiographs.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageRefused(f"image too large: {img.width}x{img.height} pixels")
                if getattr(img, "n_frames", 1) > 1:
                    raise ImageRefused(f"multi-frame image ({img.n_frames} frames) is not a single radiograph")
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_unit_grey(img)
    except ImageRefused:
        raise
    except FileNotFoundError:
        raise ModelError(f"file not found: {path}") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRefused(f"not a readable PNG/JPEG image: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRefused(f"cannot decode image: {exc}") from exc


def _to_unit_grey(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("1", "L"):
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.float32) / 65535.0
    if mode == "I":  # 16-bit PNGs often open as 32-bit integer mode
        arr = np.asarray(img, dtype=np.int64)
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageRefused(f"integer image with values outside 16 bits: [{arr.min()}, {arr.max()}]")
        return arr.astype(np.float32) / 65535.0
    if mode == "LA":
        return np.asarray(img.getchannel("L"), dtype=np.float32) / 255.0
    if mode in ("P", "RGB", "RGBA", "CMYK", "YCbCr"):
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        spread = float(np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean())
        if spread > COLOUR_TOLERANCE:
            raise ImageRefused("colour image: not a greyscale radiograph")
        return rgb.mean(axis=2).astype(np.float32)
    raise ImageRefused(f"unsupported image mode {mode!r}")
