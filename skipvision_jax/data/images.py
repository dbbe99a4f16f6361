"""Image loading and the CLIP preprocessing: pad to square, resize, normalize."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


class ImageError(ValueError):
    """A missing, unreadable or corrupt image."""


def load_image(path: str) -> Image.Image:
    """Opens and fully decodes an image as RGB, or raises ImageError with a one-line reason."""
    return _decoded(path, path)


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """An image file's bytes (sent inline, e.g. a base64 data URL) as RGB, or
    ImageError; one of over `max_pixels` is refused from its header, before
    its pixels are decoded (a small PNG can hold a huge image)."""
    return _decoded(io.BytesIO(data), "data", max_pixels)


def _decoded(source: str | io.BytesIO, name: str, max_pixels: int | None = None) -> Image.Image:
    try:
        with Image.open(source) as image:  # reads the header only
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageError(
                    f"image {name}: {width} x {height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
                )
            image.load()  # decode now: a truncated file fails here, not later in a worker
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"image not found: {name}") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot decode image {name}: not a known image format") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageError(f"cannot decode image {name}: {err}") from None


def pad_to_square(image: Image.Image, fill: np.ndarray = CLIP_MEAN) -> Image.Image:
    """LLaVA's 'pad' aspect mode: centre on a square canvas of the mean colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(int(round(255 * c)) for c in fill))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """RGB image -> float32 [size, size, 3], CLIP mean/std normalized."""
    image = pad_to_square(image).resize((size, size), Image.Resampling.BICUBIC)
    return normalize(np.asarray(image, dtype=np.float32) / 255.0)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """[H, W, 3] in [0, 1] -> CLIP-normalized."""
    return ((pixels - CLIP_MEAN) / CLIP_STD).astype(np.float32)
