"""What textual inversion and DreamBooth share: subjects, the latent diffusion loss, and judges.

A subject is a few pictures with one caption each, ``{}`` marking the identifier: "a {} circle in the
top left" -> "a <ring> circle ..." (textual inversion's new token), "a sks circle ..." (DreamBooth's
rare word) or "a circle ..." (DreamBooth's class prompt).  On disk: a folder of pictures, each with
its caption file (``0.png`` + ``0.txt``).  The loss (:func:`latent_loss_fn`, on the engine)::

    z_0 = E(x) * scaling,   z_t = sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps,
    L = || target - UNet(z_t, t, CLIP(caption)) ||^2,   target = eps or v as the model was trained.

``is_ring``, ``is_orange``, ``position_index`` and ``evaluate_subject`` judge whether pictures show the subject.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..data import COLORS, POSITIONS, ShapeSpec, _composite, coverage
from ..images import load_image, save_image
from ..nn.unet import UNet2DCondition
from .diffusion import diffusion_loss

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_WHERE = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right"}


def where(position: str) -> str:
    """The caption's position phrase, as the shapes data writes it: "in the top left", "at the top"."""
    return _WHERE.get(position, f"in the {position}")


# --- a subject: pictures + captions -----------------------------------------------------------------

@dataclass
class Subject:
    """Pictures (n, H, W, 3) uint8 and their captions, each with one ``{}`` for the identifier."""

    images: np.ndarray
    captions: list

    def __post_init__(self):
        self.images = np.asarray(self.images)
        self.captions = list(self.captions)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"subject images must be uint8 (n, H, W, 3), got {self.images.dtype} {self.images.shape}")
        if len(self.captions) != len(self.images):
            raise ValueError(f"{len(self.images)} pictures but {len(self.captions)} captions")
        for c in self.captions:
            if c.count("{}") != 1:
                raise ValueError(f"each caption needs exactly one '{{}}' where the identifier goes, got {c!r}")

    @staticmethod
    def fill(caption: str, identifier: str) -> str:
        """A caption with the identifier in place of ``{}`` ("" drops it: the class prompt)."""
        return " ".join(caption.replace("{}", identifier).split())

    def prompts(self, identifier: str) -> list[str]:
        """Every caption filled with the identifier (:meth:`fill`)."""
        return [self.fill(c, identifier) for c in self.captions]

    def placed(self, position: str) -> str:
        """The first caption moved to another of the 3x3 places ("... in the top left" -> "... at the
        bottom"); for captions that end with a place, as the shapes captions do."""
        first = self.captions[0]
        for p in sorted(POSITIONS, key=len, reverse=True):
            if first.endswith(where(p)):
                return first[:-len(where(p))] + where(position)
        raise ValueError(f"the caption {first!r} names no place")

    def save(self, folder) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for i, (image, text) in enumerate(zip(self.images, self.captions)):
            save_image(folder / f"{i}.png", image, {"caption": text})
            (folder / f"{i}.txt").write_text(text + "\n", encoding="utf-8")
        return folder


def load_subject(folder, caption: str | None = None) -> Subject:
    """A subject folder: every picture, with the caption in the ``.txt`` file of the same name, or
    ``caption`` (e.g. "a photo of {}") for pictures without one.  Pictures must all have one size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"subject folder not found: {folder}")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no pictures ({', '.join(IMAGE_SUFFIXES)})")
    images, captions = [], []
    for f in files:
        text_file = f.with_suffix(".txt")
        text = text_file.read_text(encoding="utf-8").strip() if text_file.is_file() else caption
        if text is None:
            raise ValueError(f"{f} has no caption: write one into {text_file.name} (with {{}} for the identifier, "
                             f"e.g. 'a {{}} circle in the top left') or pass a caption for every picture")
        images.append(load_image(f))
        captions.append(text)
    sizes = {im.shape for im in images}
    if len(sizes) != 1:
        raise ValueError(f"the pictures in {folder} differ in size ({sorted(sizes)}); resize them to one size")
    return Subject(np.stack(images), captions)


# The two subjects of the lesson and the README, drawn like the shapes data.
SUBJECT_POSITIONS = ("top left", "top right", "center", "bottom left")  # the other five stay unseen
ORANGE = (240, 130, 30)  # a colour the built-in model never saw (it knows red, green, blue, yellow)


def draw_subject(name: str = "ring", seed: int = 0, size: int = 32) -> Subject:
    """Four pictures of a subject the built-in model has never seen.

    - ``"ring"``: one red ring (a circle with a hole), at four positions: "a red {} circle in the top
      left".  DreamBooth's subject: a new *look* for a class the model knows (circle).
    - ``"orange"``: orange shapes (circle, square, triangle, square): "a {} square in the center".
      Textual inversion's concept: a new colour word.
    """
    rng = np.random.default_rng([seed, 7])
    shapes = {"ring": ("circle",) * 4, "orange": ("circle", "square", "triangle", "square")}
    if name not in shapes:
        raise ValueError(f"unknown subject {name!r}; choose one of {', '.join(shapes)}")
    images, captions = [], []
    for shape, position in zip(shapes[name], SUBJECT_POSITIONS):
        dx, dy = rng.uniform(-0.06, 0.06, 2)
        spec = ShapeSpec(shape, "red", "large", position, dx=float(dx), dy=float(dy))
        alpha = coverage(spec, size)
        if name == "ring":  # the same disc, less a disc of half its width around the same centre
            alpha = np.clip(alpha - coverage(ShapeSpec(shape, "red", "large", position, dx=float(dx), dy=float(dy),
                                                       scale=0.5), size), 0, 1)
        images.append(_composite(alpha, COLORS["red"] if name == "ring" else ORANGE))
        colour = "red " if name == "ring" else ""  # the ring's colour is named, as the model's captions do
        captions.append(f"a {colour}{{}} {shape} {where(position)}")
    return Subject(np.stack(images), captions)


# --- statistics: does a picture show the subject? ----------------------------------------------------

def _foreground(images, threshold: int = 60):
    images = np.asarray(images, np.float32)
    return images, images.max(-1) > threshold  # (n, H, W): pixels of the shape (the background is black)


def hue(images) -> np.ndarray:
    """Mean hue (degrees, 0 = red, 60 = yellow, 120 = green, 240 = blue) of each picture's shape
    pixels; NaN for a picture with no shape."""
    images, fg = _foreground(images)
    out = np.full(len(images), np.nan)
    for i in range(len(images)):
        if fg[i].any():
            r, g, b = images[i][fg[i]].mean(0)
            mx, mn = max(r, g, b), min(r, g, b)
            if mx - mn < 1e-6:
                out[i] = 0.0
            elif mx == r:
                out[i] = (60 * (g - b) / (mx - mn)) % 360
            elif mx == g:
                out[i] = 60 * (b - r) / (mx - mn) + 120
            else:
                out[i] = 60 * (r - g) / (mx - mn) + 240
    return out


ORANGE_HUES = (15.0, 47.0)  # red is ~0, yellow ~53; the VAE draws ORANGE at about 41


def is_orange(images) -> np.ndarray:
    h = hue(images)
    return (h >= ORANGE_HUES[0]) & (h <= ORANGE_HUES[1])


def hole_depth(images) -> np.ndarray:
    """How dark the shape's centre is, 0 (filled) .. 1 (a ring): 1 - (brightness of the 3x3 pixels
    around the shape's centroid) / (mean brightness of its pixels).  NaN for a picture with no shape."""
    images, fg = _foreground(images)
    v = images.max(-1)
    out = np.full(len(images), np.nan)
    for i in range(len(images)):
        if fg[i].sum() >= 4:
            ys, xs = np.nonzero(fg[i])
            cy, cx = int(round(ys.mean())), int(round(xs.mean()))
            centre = v[i, max(cy - 1, 0):cy + 2, max(cx - 1, 0):cx + 2].mean()
            out[i] = 1 - centre / v[i][fg[i]].mean()
    return out


def is_ring(images) -> np.ndarray:
    return hole_depth(images) > 0.5


def position_index(images, size: int | None = None) -> np.ndarray:
    """The 3x3 grid cell (index into ``data.POSITIONS``) of each picture's shape centroid (-1: no shape)."""
    images, fg = _foreground(images)
    n, H, W = fg.shape
    names = {v: i for i, v in enumerate(POSITIONS.values())}
    out = np.full(n, -1)
    for i in range(n):
        if fg[i].any():
            ys, xs = np.nonzero(fg[i])
            out[i] = names[(min(int(3 * ys.mean() / H), 2), min(int(3 * xs.mean() / W), 2))]
    return out


# --- the loss ----------------------------------------------------------------------------------------

def latent_loss_fn(pipe, dtype=jnp.float32, remat: bool = False):
    """``loss(unet_params, z0, context, key)``: the diffusion loss of the pipeline's UNet on latents
    z0 (B, h, w, c) with text states ``context`` (B, 77, D), against the target its scheduler names."""
    unet = UNet2DCondition(pipe.unet_config, dtype, remat=remat)
    alpha_bar = jnp.asarray(pipe.scheduler.noise_schedule().alpha_bar, jnp.float32)
    prediction = pipe.scheduler.prediction_type

    def loss(unet_params, z0, context, key):
        return diffusion_loss(lambda z_t, t: unet.apply({"params": unet_params}, z_t, t, context), z0, alpha_bar,
                              key, prediction)

    return loss


def subject_batches(pipe, subject: Subject, identifier: str, class_set=None, batch: int = 4, seed: int = 0,
                    token_ids: bool = False):
    """``batches(step) -> (z, c, z_class, c_class)``: ``batch`` instance latents with their captions'
    text states (with ``token_ids``: token ids, for a loss that runs the text encoder itself), and as
    many of the class set's (None without one).  Drawn with replacement, a function of (seed, step);
    the frozen VAE (and text encoder) run once, here."""
    encode = pipe.tokenize if token_ids else pipe.encode_text
    z_inst, c_inst = pipe.encode_images(subject.images), encode(subject.prompts(identifier))
    if class_set is not None:
        z_class, c_class = pipe.encode_images(class_set[0]), encode(class_set[1])

    def batches(step):
        rng = np.random.default_rng([seed, 5, step])
        i = rng.integers(len(z_inst), size=batch)
        if class_set is None:
            return z_inst[i], c_inst[i], None, None
        j = rng.integers(len(z_class), size=batch)
        return z_inst[i], c_inst[i], z_class[j], c_class[j]

    return batches


def prior_preservation_loss(diffusion, prior_weight: float):
    """DreamBooth's objective on a :func:`subject_batches` batch, for any way of getting the UNet's weights:

        L = diffusion(instance) + lambda diffusion(class)       (lambda = prior_weight; no class batch: the first term)

    ``loss(unet_params, batch, key, encode=identity)``; ``encode`` turns the batch's captions into text
    states (a text encoder being trained)."""
    def loss(unet_params, batch, key, encode=lambda c: c):
        z, c, z_class, c_class = batch
        k_inst, k_class = jax.random.split(key)
        instance = diffusion(unet_params, z, encode(c), k_inst)
        if z_class is None:
            return instance
        return instance + prior_weight * diffusion(unet_params, z_class, encode(c_class), k_class)

    return loss


def checkpoint_callbacks(checkpoint, every: int, steps: int) -> list:
    """``checkpoint(step, params)`` every ``every`` steps before the last, as engine callbacks."""
    if checkpoint is None or not every:
        return []
    return [(every, lambda e: checkpoint(e.step, e.params) if e.step < steps else None)]


# --- measuring: the subject, and the class around it -----------------------------------------------------

def _judge(images, prompts_labels):
    from ..data import ShapesDataset
    from .classifier import cached_classifier, predict

    ds = ShapesDataset()
    pred = predict(cached_classifier(ds), images)
    return {a: np.asarray(pred[a]) == np.asarray(v) for a, v in prompts_labels.items()}


HUES = {"red": 0.0, "yellow": 53.0, "green": 128.0, "blue": 228.0}  # the model's four colours, as drawn


def nearest_colour(images) -> np.ndarray:
    """The name of the model's colour nearest in hue to each picture's shape ("" for no shape)."""
    h = hue(images)
    names = list(HUES)
    d = np.abs((h[:, None] - np.array(list(HUES.values()))[None] + 180) % 360 - 180)
    return np.where(np.isnan(h), "", np.array(names)[np.argmin(np.nan_to_num(d, nan=0), 1)])


EVAL_BATCH = 9  # pictures per UNet call in the evaluations: one place each; one compiled program for every list


def draw_in_pieces(pipe, prompts, steps: int, guidance_scale: float, seed: int, batch: int = EVAL_BATCH) -> np.ndarray:
    """``pipe(prompts, seed=seed)`` (DDIM) drawn ``batch`` prompts at a time from the same x_T: the same
    pictures (to float rounding), and one program for lists of any length instead of one per length."""
    x_T = pipe.initial_noise(len(prompts), seed)
    return np.concatenate([pipe(prompts[i:i + batch], steps=steps, guidance_scale=guidance_scale, seed=seed,
                                latents=x_T[i:i + batch]) for i in range(0, len(prompts), batch)])


def evaluate_subject(pipe, kind: str, identifier: str, samples: int = 2, steps: int = 30,
                     guidance_scale: float = 7.5, seed: int = 0) -> tuple[dict, np.ndarray]:
    """How often prompts naming the subject give it, over all 9 positions (5 never in its pictures).

    ``kind="ring"``: "a red {identifier} circle <position>": fraction that are rings
    (:func:`is_ring`) at the right place (:func:`position_index`) and red; and the ring in the
    three other colours ("a green {identifier} circle ..."), a context its pictures never showed.
    ``kind="orange"``: "a {identifier} <shape> <position>" for the three shapes: fraction orange
    (:func:`is_orange`), and with the shape and position the shapes classifier reads also right.
    Returns (metrics, images)."""
    from ..data import ShapesDataset

    ds = ShapesDataset()
    positions = list(POSITIONS)

    def draw(prompts):
        return np.concatenate([draw_in_pieces(pipe, prompts, steps, guidance_scale, seed + 1000 * r)
                               for r in range(samples)])

    if kind == "ring":
        images = draw([f"a red {identifier} circle {where(p)}" for p in positions])
        placed = position_index(images) == np.tile(np.arange(len(positions)), samples)
        hit = is_ring(images)
        red = nearest_colour(images) == "red"
        out = {"ring": float(hit.mean()), "ring_red_placed": float((hit & red & placed).mean()),
               "position": float(placed.mean())}
        others = [(c, p) for c in ("green", "blue", "yellow") for p in range(len(positions))]
        recoloured = draw([f"a {c} {identifier} circle {where(positions[p])}" for c, p in others])
        asked = np.tile([c for c, _ in others], samples)
        out["other_colours_ring_right_colour"] = float((is_ring(recoloured) & (nearest_colour(recoloured) == asked)).mean())
        out["n"] = len(images) + len(recoloured)
        return out, images
    if kind != "orange":
        raise ValueError(f"unknown subject kind {kind!r}; choose 'ring' or 'orange'")
    combos = [(s, p) for s in ds.shapes for p in range(len(positions))]
    images = draw([f"a {identifier} {s} {where(positions[p])}" for s, p in combos])
    want_pos = np.tile([p for _, p in combos], samples)
    right = _judge(images, {"shape": np.tile([ds.shapes.index(s) for s, _ in combos], samples), "position": want_pos})
    hit = is_orange(images)
    return {"orange": float(hit.mean()), "orange_shape_position": float((hit & right["shape"] & right["position"]).mean()),
            "median_hue": float(np.nanmedian(hue(images))), "position": float(right["position"].mean()),
            "n": len(images)}, images


def evaluate_class(pipe, samples: int = 1, steps: int = 30, guidance_scale: float = 7.5, seed: int = 0) -> dict:
    """The class prior around the ring subject: does "circle" still mean what it meant?

    - "a red circle <position>" (the class prompts), 9 positions: fraction drawn as rings (drift);
    - "a <colour> circle <position>", 4 colours x 9 positions: fraction whose shape, colour and
      position the classifier reads as asked (the class's variety kept), and fraction drawn as rings."""
    from ..data import ShapesDataset

    ds = ShapesDataset()
    positions = list(POSITIONS)
    combos = [(c, p) for c in range(len(ds.colors)) for p in range(len(positions))]
    coloured = [f"a {ds.colors[c]} circle {where(positions[p])}" for c, p in combos]
    b = np.concatenate([draw_in_pieces(pipe, coloured, steps, guidance_scale, seed + 1000 * r) for r in range(samples)])
    right = _judge(b, {"shape": np.zeros(len(b), int), "color": np.tile([c for c, _ in combos], samples),
                       "position": np.tile([p for _, p in combos], samples)})
    red = np.tile([ds.colors[c] == "red" for c, _ in combos], samples)
    rings = is_ring(b)
    return {"class_prompt_rings": float(rings[red].mean()),
            "coloured_circles_right": float(np.logical_and.reduce(list(right.values())).mean()),
            "coloured_circles_rings": float(rings.mean()), "class_n": len(b)}
