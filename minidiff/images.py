"""Pixels <-> arrays, and image files that remember how they were made.

Models see images as float arrays in [-1, 1], shape (H, W, C); files hold uint8.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

EXAMPLE_PHOTOS = ("chelsea", "astronaut", "coffee")


def to_unit_range(pixels) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return np.asarray(pixels, dtype=np.float32) / 127.5 - 1.0


def to_uint8(x) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255] (values outside are clipped)."""
    return np.clip(np.round((np.asarray(x, dtype=np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def load_image(path, size: int | None = None) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3), optionally center-cropped and resized to size x size."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    try:
        img = Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read {path} as an image: {e}") from None
    if size is not None:
        img = _square(img, size)
    return np.asarray(img)


def image_size(path, what: str) -> tuple[int, int]:
    """(width, height) of an image file, read from its header only; ``ValueError`` naming ``what``
    (e.g. "--init-image x.png") if it is missing, unreadable, tiny or too large to decode safely."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size = im.size
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ValueError(f"{what} has more than {Image.MAX_IMAGE_PIXELS:,} pixels: too large to read safely; "
                         "shrink it first") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what}: cannot read it as an image ({e})") from None
    if min(size) < 8:
        raise ValueError(f"{what} is {size[0]}x{size[1]} pixels: too small to start from (at least 8x8)")
    return size


def load_image_at(path, width: int, height: int) -> np.ndarray:
    """uint8 RGB (height, width, 3) of an image file, resized (Lanczos; JPEGs decoded at a reduced
    scale first, so a huge photo never lives in memory at full size)."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (width, height))  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that is still larger
        return np.asarray(im.convert("RGB").resize((width, height), Image.Resampling.LANCZOS))


def example_photo(name: str = "chelsea", size: int | None = 256) -> np.ndarray:
    """One of scikit-image's example photographs (shipped inside its wheel, no download), uint8 RGB."""
    if name not in EXAMPLE_PHOTOS:
        raise ValueError(f"unknown example photo {name!r}; choose one of {', '.join(EXAMPLE_PHOTOS)}")
    try:
        import skimage.data
    except ImportError:
        raise ImportError(
            "the example photographs come from scikit-image: pip install 'minidiff[lessons]' (or pass your own image)"
        ) from None
    from PIL import Image

    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    return np.asarray(_square(img, size) if size else img)


def _square(img, size: int):
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    from PIL import Image

    return img.resize((size, size), Image.Resampling.LANCZOS)


IMAGE_TYPES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIF_DESCRIPTION = 0x010E  # EXIF ImageDescription: the metadata as JSON in JPEG and WebP files


def save_image(path, pixels, metadata: dict | None = None) -> Path:
    """Write uint8 pixels as PNG (``metadata``: prompt, seed, settings... as text chunks), JPEG or
    WebP (``metadata`` as JSON in the EXIF ImageDescription), by the file's extension."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    kind = IMAGE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown image type {path.suffix!r}; use {', '.join(IMAGE_TYPES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    if kind == "PNG":
        info = PngInfo()
        for key, value in meta.items():
            info.add_text(key, value)
        image.save(path, pnginfo=info)
    else:
        exif = Image.Exif()
        exif[EXIF_DESCRIPTION] = json.dumps(meta)  # ASCII (non-ASCII escaped), as EXIF wants
        image.save(path, kind, exif=exif, quality=95)
    return path


def read_metadata(path) -> dict:
    """What :func:`save_image` recorded in a PNG, JPEG or WebP file (an empty dict if nothing)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.format == "PNG":
            return dict(im.text)
        text = im.getexif().get(EXIF_DESCRIPTION)
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}


def image_grid(images, columns: int | None = None, pad: int = 1, fill: int = 0) -> np.ndarray:
    """Tile uint8 images (n, H, W, C) into one picture, row by row, ``pad`` pixels of value ``fill``
    apart (0: black; 255: white lines, visible between pictures on a black background)."""
    n, H, W, C = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = -(-n // columns)
    grid = np.full((rows * (H + pad) + pad, columns * (W + pad) + pad, C), fill, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = im
    return grid


def save_samples(path, samples, metadata: dict, columns: int | None = None, reference=None) -> Path:
    """Images (n, H, W, 3) -> a PNG grid; 2-D points (n, 2) -> a scatter plot PNG (next to ``reference``
    data if given).  ``metadata`` goes into the PNG's text chunks either way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {str(k): str(v) for k, v in metadata.items()}
    if samples.ndim == 4:
        return save_image(path, image_grid(samples, columns), meta)
    from matplotlib.figure import Figure  # no pyplot: works under any backend, leaves no open figure

    panels = [("samples", samples)] + ([("data", reference)] if reference is not None else [])
    fig = Figure(figsize=(4.5 * len(panels), 4.5))
    axes = fig.subplots(1, len(panels), squeeze=False, sharex=True, sharey=True)
    for ax, (title, pts) in zip(axes[0], panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
        ax.set_title(f"{title} (n = {len(pts)})")
        ax.set_aspect("equal")
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata=meta)
    return path
