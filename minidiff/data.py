"""Toy data generated from a seed: 2-D point clouds and captioned pictures of shapes.

Nothing is downloaded; everything is drawn with NumPy and Pillow (no JAX here), so the same
seed gives the same data on every machine.

- Point clouds, float32 (n, 2): :func:`gaussian_mixture`, :func:`swiss_roll`, :func:`two_moons`,
  listed by name in :data:`POINT_CLOUDS` (so a command line can say ``--data moons``).
- Shapes: small RGB pictures of one coloured shape at one place in a 3x3 grid, each with a caption
  ("a small red circle in the top left") and integer labels.  See :class:`ShapesDataset`.

Images come out as uint8 (n, H, W, 3); models take float32 in [-1, 1]: use
:func:`minidiff.images.to_unit_range` (re-exported here) and :func:`~minidiff.images.to_uint8` back.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields, replace

import numpy as np

from .diffusion.oracle import GaussianMixture
from .images import to_uint8, to_unit_range

__all__ = [
    "TOY_MIXTURE", "POINT_CLOUDS", "gaussian_mixture", "swiss_roll", "two_moons",
    "SHAPES", "COLORS", "SIZES", "POSITIONS", "ATTRIBUTES", "ShapeSpec", "ShapesDataset", "render", "coverage", "caption",
    "drawing_constants",
    "CaptionTokenizer",
    "to_unit_range", "to_uint8",
]

# ----------------------------------------------------------------------------------------------
# 2-D point clouds
# ----------------------------------------------------------------------------------------------

# The 2-D toy data of the demo and lesson 02: three Gaussians, well apart.  Its exact noise
# predictor is known (minidiff.diffusion.oracle), so it is kept at its own scale (std ~1.4 per axis).
TOY_MIXTURE = GaussianMixture(
    [0.2, 0.5, 0.3],
    [[-2.0, 0.0], [1.5, 1.0], [0.5, -2.0]],
    [[[0.3, 0.1], [0.1, 0.2]], [[0.4, -0.15], [-0.15, 0.3]], [[0.2, 0.0], [0.0, 0.5]]],
)


def gaussian_mixture(n: int, rng: np.random.Generator) -> np.ndarray:
    """n points of :data:`TOY_MIXTURE` (std about 1.4 per axis; its exact eps-predictor is known)."""
    x, _ = TOY_MIXTURE.sample(n, rng)
    return x.astype(np.float32)


def swiss_roll(n: int, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    """A 2-D spiral, (t cos t, t sin t) for t uniform in [1.5 pi, 4.5 pi], scaled to unit std.

    ``noise`` is the std of Gaussian noise added after scaling (in units of the data's std).
    """
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    x = (x - (2.0, 0.21)) / 6.79  # fixed centre and rms std of the noiseless roll (measured on 4M points)
    return (x + noise * rng.standard_normal(x.shape)).astype(np.float32)


def two_moons(n: int, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    """Two interleaved half circles (as scikit-learn's ``make_moons``), scaled to unit std.

    ``noise`` is the std of Gaussian noise added after scaling (in units of the data's std).
    """
    theta = np.pi * rng.random(n)
    upper = rng.random(n) < 0.5
    x = np.where(upper[:, None],
                 np.stack([np.cos(theta), np.sin(theta)], axis=1),           # the upper moon
                 np.stack([1 - np.cos(theta), 0.5 - np.sin(theta)], axis=1))  # the lower one, shifted
    x = (x - (0.5, 0.25)) / 0.705  # fixed centre and rms std of the noiseless moons
    return (x + noise * rng.standard_normal(x.shape)).astype(np.float32)


POINT_CLOUDS = {"mixture": gaussian_mixture, "swissroll": swiss_roll, "moons": two_moons}

# ----------------------------------------------------------------------------------------------
# Shapes: the attributes, in one place
# ----------------------------------------------------------------------------------------------
# A shape is drawn inside a box of half-width r around (cx, cy).  To add a shape, add a function
# (ImageDraw, cx, cy, r, fill) here; to add a colour, size or position, add an entry below.


def _circle(draw, cx, cy, r, fill):
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)


def _square(draw, cx, cy, r, fill):
    s = 0.85 * r  # a bit smaller than its box, so that a square and a circle look about as big
    draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)


def _triangle(draw, cx, cy, r, fill):
    draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)


def _diamond(draw, cx, cy, r, fill):
    draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def _cross(draw, cx, cy, r, fill):
    w = 0.35 * r
    draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


SHAPES = {"circle": _circle, "square": _square, "triangle": _triangle, "diamond": _diamond, "cross": _cross}

COLORS = {  # RGB, saturated and far apart, on a black background
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 245),
    "yellow": (240, 215, 30),
    "magenta": (215, 50, 215),
    "cyan": (40, 205, 215),
}

SIZES = {"small": 0.7, "large": 0.9}  # the shape's width, as a fraction of a grid cell

POSITIONS = {  # name -> (row, column) in a 3x3 grid over the image
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
_POSITION_PHRASES = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right"}

ATTRIBUTES = ("shape", "color", "size", "position")  # the label names (and classifier heads)
_REGISTRY = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS}

# Random jitter, so that no two pictures are the same: the centre moves by up to JITTER_SHIFT of a
# cell and the width is scaled by 1 +- JITTER_SCALE (the largest shape reaches at most 4 % of a cell
# past its own).
# Shapes are drawn large on purpose: at 32x32 a 6-pixel triangle and a 6-pixel circle differ by a
# handful of pixels, too little for a model trained in minutes on a CPU to get right.
JITTER_SHIFT = 0.05
JITTER_SCALE = 0.08
SUPERSAMPLE = 8  # draw at 8x, then average 8x8 blocks: anti-aliased edges


def drawing_constants() -> dict:
    """Everything besides a dataset's settings that changes its pictures (for cache keys)."""
    return {"sizes": SIZES, "colors": {k: list(v) for k, v in COLORS.items()}, "jitter": [JITTER_SHIFT, JITTER_SCALE],
            "supersample": SUPERSAMPLE, "version": 2}


@dataclass(frozen=True)
class ShapeSpec:
    """One picture: which shape, colour, size and position, plus its jitter.

    ``dx``, ``dy`` shift the centre (fractions of a grid cell); ``scale`` multiplies the width.
    """

    shape: str
    color: str
    size: str = "large"
    position: str = "center"
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        for attr in ATTRIBUTES:
            value = getattr(self, attr)
            if value not in _REGISTRY[attr]:
                raise ValueError(f"unknown {attr} {value!r}; choose one of {', '.join(_REGISTRY[attr])}")


def caption(spec: ShapeSpec) -> str:
    """The sentence describing a picture, e.g. "a small red circle in the top left"."""
    where = _POSITION_PHRASES.get(spec.position, f"in the {spec.position}")
    return f"a {spec.size} {spec.color} {spec.shape} {where}"


def caption_words(shapes, colors) -> list[str]:
    """Every word the captions of these shapes and colours use (a text-to-image model trained on
    them knows no other)."""
    places = [w for p in POSITIONS for w in _POSITION_PHRASES.get(p, f"in the {p}").split()]
    return sorted({"a", *SIZES, *colors, *shapes, *places})


def without_size(text: str) -> str:
    """The caption without its size word: "a small red circle in the top left" -> "a red circle in the
    top left".  Text-to-image models train on both, so that a prompt need not name every attribute."""
    return " ".join(word for word in text.split() if word not in SIZES)


def coverage(spec: ShapeSpec, size: int = 32) -> np.ndarray:
    """float32 (size, size) in [0, 1]: the fraction of each pixel covered by the shape."""
    from PIL import Image, ImageDraw

    S = SUPERSAMPLE
    cell = size / 3
    row, col = POSITIONS[spec.position]
    cx, cy = (col + 0.5 + spec.dx) * cell * S, (row + 0.5 + spec.dy) * cell * S
    r = 0.5 * SIZES[spec.size] * spec.scale * cell * S
    mask = Image.new("L", (size * S, size * S), 0)
    SHAPES[spec.shape](ImageDraw.Draw(mask), cx, cy, r, 255)
    return np.asarray(mask.reduce(S), dtype=np.float32) / 255.0  # average SxS blocks (a box filter)


def _composite(alpha, rgb) -> np.ndarray:
    """Colour over the black background: pixel = coverage * colour.  alpha (..., H, W), rgb (..., 3)."""
    return np.round(alpha[..., None] * np.asarray(rgb, dtype=np.float32)[..., None, None, :]).astype(np.uint8)


def render(spec: ShapeSpec, size: int = 32) -> np.ndarray:
    """The picture of one spec, uint8 (size, size, 3), anti-aliased, on a black background."""
    return _composite(coverage(spec, size), COLORS[spec.color])


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------


def _as_tuple(value):
    return (value,) if isinstance(value, str) else tuple(value)


def split_class(index, n_colors: int):
    """Class c = shape * n_colours + colour -> (shape, colour); NumPy or JAX (traced) arrays alike."""
    return index // n_colors, index % n_colors


@dataclass
class ShapesDataset:
    """Captioned pictures of one coloured shape, drawn on the fly from a seed.

    Every picture is a combination (shape, colour, size, position) drawn uniformly from the allowed
    combinations, plus a small random jitter.  ``exclude`` holds combinations out: each item is a
    tuple of attribute values, e.g. ``("circle", "red")`` (no red circles anywhere) or
    ``("square", "top left")``; ``include``, when given, keeps only combinations matching one of
    its items.  :meth:`held_out` gives the dataset of exactly the excluded combinations.

    Labels are indices into this dataset's own lists (``self.shapes``, ``self.colors``...), so a
    dataset of 3 shapes has shape labels 0, 1, 2.  For class-conditional models,
    :meth:`class_index` turns (shape, colour) into one class in ``range(self.num_classes)``.

    >>> ds = ShapesDataset(size=32, seed=0, exclude=[("circle", "red")])
    >>> images, labels, captions = ds.sample(8)        # uint8 (8, 32, 32, 3), dict of int arrays, 8 str
    """

    size: int = 32
    seed: int = 0
    shapes: tuple = ("circle", "square", "triangle")
    colors: tuple = ("red", "green", "blue", "yellow")
    sizes: tuple = tuple(SIZES)
    positions: tuple = tuple(POSITIONS)
    exclude: tuple = ()
    include: tuple = ()
    jitter: bool = True
    _combos: np.ndarray = field(init=False, repr=False, compare=False)
    _rng: np.random.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for attr in ATTRIBUTES:
            values = _as_tuple(getattr(self, attr + "s"))
            unknown = [v for v in values if v not in _REGISTRY[attr]]
            if unknown or not values or len(set(values)) != len(values):
                raise ValueError(f"{attr}s must be distinct names from {', '.join(_REGISTRY[attr])}; got {values}")
            setattr(self, attr + "s", values)
        if self.size < 8:
            raise ValueError(f"image size must be at least 8 pixels, got {self.size}")
        self.exclude = tuple(_as_tuple(item) for item in self.exclude)
        self.include = tuple(_as_tuple(item) for item in self.include)
        names = set(itertools.chain(*self.attributes.values()))
        for item in self.exclude + self.include:
            if not set(item) <= names:
                raise ValueError(f"{item} names values that are not in this dataset: {sorted(set(item) - names)}")

        def matches(combo, item):  # every value of the item is one of the combination's values
            return set(item) <= set(combo)

        combos = [c for c in itertools.product(*(range(len(v)) for v in self.attributes.values()))
                  if not any(matches(self._names(c), e) for e in self.exclude)
                  and (not self.include or any(matches(self._names(c), i) for i in self.include))]
        if not combos:
            raise ValueError("exclude/include leave no combination to draw")
        self._combos = np.array(combos, dtype=np.int64)  # (n_allowed, 4), one column per attribute
        self._rng = np.random.default_rng(self.seed)

    # --- what the labels mean ---

    @property
    def attributes(self) -> dict[str, tuple[str, ...]]:
        """Attribute -> its value names in label order, e.g. {"shape": ("circle", ...), ...}."""
        return {attr: getattr(self, attr + "s") for attr in ATTRIBUTES}

    def _names(self, combo) -> tuple[str, ...]:
        return tuple(values[i] for values, i in zip(self.attributes.values(), combo))

    @property
    def combinations(self) -> list[tuple[str, ...]]:
        """The allowed (shape, colour, size, position) combinations, by name."""
        return [self._names(c) for c in self._combos]

    @property
    def num_classes(self) -> int:
        """Number of (shape, colour) classes, held-out ones included."""
        return len(self.shapes) * len(self.colors)

    def class_index(self, labels: dict) -> np.ndarray:
        """(shape, colour) labels -> one class index: shape * n_colours + colour."""
        return np.asarray(labels["shape"]) * len(self.colors) + np.asarray(labels["color"])

    def class_labels(self, index) -> dict[str, np.ndarray]:
        """The inverse of :meth:`class_index`: class -> {"shape": ..., "color": ...}."""
        shape, color = split_class(np.asarray(index), len(self.colors))
        return {"shape": shape, "color": color}

    def class_name(self, index: int) -> str:
        """E.g. "red circle"."""
        lab = self.class_labels(int(index))
        return f"{self.colors[lab['color']]} {self.shapes[lab['shape']]}"

    def settings(self) -> dict:
        """The constructor arguments (what defines the data), e.g. for a cache key."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def held_out(self, seed: int | None = None) -> "ShapesDataset":
        """A dataset drawing only the combinations this one excludes."""
        if not self.exclude:
            raise ValueError("this dataset holds nothing out (exclude is empty)")
        return replace(self, exclude=(), include=self.exclude, seed=self.seed if seed is None else seed)

    # --- drawing ---

    def specs(self, n: int, rng: np.random.Generator | None = None) -> tuple[list[ShapeSpec], dict]:
        """n random specs and their labels (dict attribute -> int array, plus "class")."""
        rng = self._rng if rng is None else rng
        combo = self._combos[rng.integers(len(self._combos), size=n)]
        if self.jitter:
            dx, dy = rng.uniform(-JITTER_SHIFT, JITTER_SHIFT, size=(2, n))
            scale = 1 + rng.uniform(-JITTER_SCALE, JITTER_SCALE, size=n)
        else:
            dx, dy, scale = np.zeros(n), np.zeros(n), np.ones(n)
        specs = [ShapeSpec(*self._names(c), dx=float(a), dy=float(b), scale=float(s))
                 for c, a, b, s in zip(combo, dx, dy, scale)]
        labels = {attr: combo[:, k] for k, attr in enumerate(ATTRIBUTES)}
        labels["class"] = self.class_index(labels)
        return specs, labels

    def sample(self, n: int, rng: np.random.Generator | None = None):
        """n pictures: (uint8 images (n, H, W, 3), labels dict of int arrays, list of n captions).

        Without ``rng`` the dataset's own generator (seeded by ``seed``) is used and advanced.
        """
        specs, labels = self.specs(n, rng)
        alpha = np.zeros((n, self.size, self.size), np.float32)
        for i, s in enumerate(specs):
            alpha[i] = coverage(s, self.size)
        rgb = np.array([COLORS[s.color] for s in specs], dtype=np.float32).reshape(n, 3)
        return _composite(alpha, rgb), labels, [caption(s) for s in specs]

    def captions(self) -> list[str]:
        """The caption of every allowed combination (no jitter in a caption), in combination order."""
        return [caption(ShapeSpec(*names)) for names in self.combinations]

    def render(self, spec: ShapeSpec) -> np.ndarray:
        """One picture at this dataset's size."""
        return render(spec, self.size)

    caption = staticmethod(caption)


# Sanity: the value names of different attributes never collide, so ("circle", "red") is unambiguous.
assert len(set(itertools.chain(*_REGISTRY.values()))) == sum(map(len, _REGISTRY.values()))


# ----------------------------------------------------------------------------------------------
# Words -> token ids (the DALL-E model's text side; the CLIP BPE tokenizer can replace it)
# ----------------------------------------------------------------------------------------------


class CaptionTokenizer:
    """A word-level tokenizer over the captions' vocabulary.

    Id 0 is ``<pad>``: a caption shorter than ``length`` words is filled with it (DALL-E's figure:
    the model gives every padded *position* its own pad embedding).  Every other id is one word of
    the shapes captions, in a fixed order, so ids do not depend on which dataset was built.
    An unknown word is an error naming the word, never a silent ``<unk>``.

    >>> tok = CaptionTokenizer(length=10)
    >>> tok.encode(["a small red circle in the top left"]).shape
    (1, 10)
    """

    PAD = 0

    def __init__(self, length: int = 10):
        words = ["a", "in", "the"]
        for name in [*SIZES, *COLORS, *SHAPES, *POSITIONS, *_POSITION_PHRASES.values()]:
            words += [w for w in name.split() if w not in words]
        self.words = ["<pad>", *words]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.length = length

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, captions) -> np.ndarray:
        """list of n captions -> int32 (n, length), padded with 0."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        out = np.full((len(captions), self.length), self.PAD, dtype=np.int32)
        for i, text in enumerate(captions):
            words = text.lower().split()
            if len(words) > self.length:
                raise ValueError(f"caption {text!r} has {len(words)} words; this tokenizer takes at most {self.length}")
            unknown = [w for w in words if w not in self.ids]
            if unknown:
                raise ValueError(f"unknown word(s) {unknown} in caption {text!r}; the vocabulary is: "
                                 f"{' '.join(self.words[1:])}")
            out[i, :len(words)] = [self.ids[w] for w in words]
        return out

    def decode(self, ids) -> list[str]:
        """int (n, length) -> captions (pads dropped)."""
        return [" ".join(self.words[i] for i in row if i != self.PAD) for row in np.atleast_2d(ids)]
