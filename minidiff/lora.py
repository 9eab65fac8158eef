"""LoRA files: low-rank updates of a model's weights, fused into its Flax parameter tree.

A LoRA layer holds two factors for one linear or convolution weight W (out, in[, kh, kw]):
down (rank, in[, kh, kw]) and up (out, rank[, 1, 1]), and optionally alpha.  Fused with a scale:

    W' = W + scale * (alpha / rank) * up @ down       (alpha = rank when the file gives none)

(for a convolution, "LoCon", up's 1x1 mixes down's k x k feature maps: delta[o, i, y, x] =
sum_r up[o, r] down[r, i, y, x]), then transposed into the Flax layout of the leaf it changes:
Dense kernel (in, out), Conv kernel (kh, kw, in, out) (``minidiff.weights``' transposes).

Formats read (``.safetensors`` only: nothing is unpickled):

* kohya-ss / A1111: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, with
  the module path's dots flattened to "_", either the diffusers path (``down_blocks_0_attentions_0_
  transformer_blocks_0_attn1_to_q``) or the original ldm one (``input_blocks_1_1_transformer_blocks_0_
  attn1_to_q``, ``input_blocks_1_0_in_layers_2``); text encoder ``lora_te_`` (``lora_te1_``; ``lora_te2_``
  is SDXL's second encoder, which SD 1.x / 2.x do not have) ``text_model_encoder_layers_0_self_attn_q_proj``.
* diffusers / PEFT: ``unet.<module>.lora_A.weight`` (down) / ``.lora_B.weight`` (up), or ``.lora.down`` /
  ``.lora.up``; ``text_encoder.<module>...``; alpha from a per-layer ``.alpha`` tensor, else from the
  file's ``lora_adapter_metadata`` (``lora_alpha``, ``alpha_pattern``; diffusers' ``save_lora_weights``),
  else alpha = rank.

Fusing never changes the arrays it is given: :func:`fuse_loras` keeps the original leaves of the
weights it touches (the "base") and puts freshly computed arrays in their place, in new dicts along
those paths; :func:`restore` puts the base leaves back, so removing the LoRAs gives the original weights
bit for bit.  Several LoRAs, each with its own scale, add up.  ``StableDiffusion.load_lora`` /
``remove_loras`` use these; ``minidiff txt2img --lora FILE[:SCALE]`` too.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flax.traverse_util import flatten_dict

from .tensorfiles import open_safetensors, read_safetensors, safetensors_file
from .weights import _fits, _to_flax_layout, ldm_unet_module_flat

# the parts of a pipeline's params a LoRA can change, by the prefixes of the two formats
_KOHYA_PARTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                "lora_te2_": "text_encoder_2"}
_PEFT_PARTS = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
_KOHYA_LEAVES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_PEFT_LEAVES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
                "alpha": "alpha"}


@dataclass
class LoRALayer:
    """One layer's factors (PyTorch layout, as in the file) and its alpha (None: rank, or the file's default)."""

    down: object
    up: object
    alpha: float | None = None
    names: tuple = ()  # the file's keys, for messages

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoRA:
    """A LoRA file read: ``layers`` {(part, module name as in the file): LoRALayer}; ``format`` "kohya" or "peft"."""

    path: Path
    sha256: str
    format: str
    layers: dict = field(default_factory=dict)
    default_alpha: dict = field(default_factory=dict)  # part -> the metadata's lora_alpha
    alpha_pattern: dict = field(default_factory=dict)  # part -> {module pattern: alpha}
    problems: list = field(default_factory=list)  # keys that are not LoRA tensors
    metadata: dict = field(default_factory=dict)  # the file's metadata

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def words(self) -> frozenset:
        """The identifier a LoRA trained by ``minidiff lora`` was taught (its metadata), lower case."""
        try:
            identifier = json.loads(self.metadata.get("minidiff", "{}")).get("identifier", "")
        except (json.JSONDecodeError, AttributeError):
            return frozenset()
        return frozenset(str(identifier).lower().split())


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_lora(path) -> LoRA:
    """Read a LoRA ``.safetensors`` file (kohya or diffusers / PEFT names; see the module's docstring).
    ``ValueError`` for a missing file, another file type, an unreadable file or one without LoRA tensors."""
    path = safetensors_file(path, "LoRA")
    tensors = read_safetensors(path)
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
    kohya = any(k.startswith(tuple(_KOHYA_PARTS)) for k in tensors)
    lora = LoRA(path, file_sha256(path), "kohya" if kohya else "peft", metadata=dict(meta))
    parts, leaves = (_KOHYA_PARTS, _KOHYA_LEAVES) if kohya else (_PEFT_PARTS, _PEFT_LEAVES)
    found: dict[tuple, dict] = {}
    for key, t in tensors.items():
        prefix = next((p for p in sorted(parts, key=len, reverse=True) if key.startswith(p)), None)
        leaf = next((s for s in leaves if key.endswith("." + s)), None)
        if prefix is None or leaf is None:
            lora.problems.append(key)
            continue
        module = key[len(prefix):-len(leaf) - 1]
        found.setdefault((parts[prefix], module), {})[leaves[leaf]] = (key, t)
    for (part, module), got in found.items():
        names = tuple(k for k, _ in got.values())
        if "down" not in got or "up" not in got:
            lora.problems.append(f"{' / '.join(names)} (no {'up' if 'down' in got else 'down'} factor)")
            continue
        alpha = float(np.asarray(got["alpha"][1]).reshape(-1)[0]) if "alpha" in got else None
        lora.layers[(part, module)] = LoRALayer(got["down"][1], got["up"][1], alpha, names)
    if not kohya:
        _peft_metadata(lora, meta)
    elif "ss_network_alpha" in meta:  # kohya's default alpha, for files without per-layer .alpha
        try:
            lora.default_alpha = dict.fromkeys(("unet", "text_encoder", "text_encoder_2"), float(meta["ss_network_alpha"]))
        except ValueError:
            pass
    if not lora.layers:
        raise ValueError(f"{path.name} holds no LoRA layers ({len(tensors)} tensors, e.g. {sorted(tensors)[:3]}): "
                         "expected kohya (lora_unet_*.lora_down.weight) or diffusers / PEFT "
                         "(unet.*.lora_A.weight) names")
    return lora


def _peft_metadata(lora: LoRA, meta: Mapping[str, str]):
    """lora_alpha and alpha_pattern per part from diffusers' ``lora_adapter_metadata`` (JSON: keys
    "unet.lora_alpha", ... or nested {"unet": {...}})."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{lora.name}: its lora_adapter_metadata is not JSON: {e}") from None
    for part in ("unet", "text_encoder", "text_encoder_2"):
        cfg = config.get(part) if isinstance(config.get(part), dict) else \
            {k[len(part) + 1:]: v for k, v in config.items() if k.startswith(part + ".")}
        if cfg.get("lora_alpha") is not None:
            lora.default_alpha[part] = float(cfg["lora_alpha"])
        if cfg.get("alpha_pattern"):
            lora.alpha_pattern[part] = {str(k): float(v) for k, v in cfg["alpha_pattern"].items()}


def _alpha(lora: LoRA, part: str, module: str, layer: LoRALayer) -> float:
    if layer.alpha is not None:
        return layer.alpha
    for pattern, a in lora.alpha_pattern.get(part, {}).items():  # PEFT: the pattern matches the name's end
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return a
    return lora.default_alpha.get(part, float(layer.rank))


def _kernels(tree) -> dict[str, tuple]:
    """{module path flattened with "_": the path of its kernel leaf} for every Dense / Conv of a tree."""
    out = {}
    for path in flatten_dict(tree):
        if path[-1] == "kernel":
            out["_".join(path[:-1])] = path
    return out


def _delta(layer: LoRALayer, target: tuple) -> np.ndarray | str:
    """up @ down in the Flax layout of a kernel of shape ``target``, float32; or why it does not fit."""
    down, up, r = layer.down, layer.up, layer.rank
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != r or (up.ndim == 4 and up.shape[2:] != (1, 1)):
        return f"down {tuple(down.shape)} and up {tuple(up.shape)} are not LoRA factors of one layer"
    torch_shape = (up.shape[0], *down.shape[1:])
    if not _fits("kernel", torch_shape, target):
        return f"up @ down {torch_shape} does not fit the layer's kernel {target}"
    up2 = np.asarray(up, np.float32).reshape(up.shape[0], r)
    delta = (up2 @ np.asarray(down, np.float32).reshape(r, -1)).reshape(torch_shape)
    return _to_flax_layout("kernel", delta, target)


def lora_updates(lora: LoRA, params: Mapping, layers_per_block: int, scale: float = 1.0) -> dict[tuple, np.ndarray]:
    """{(part, *leaf path): scale * (alpha / rank) * up @ down in that leaf's layout} for a pipeline's
    ``params`` ({"unet", "text_encoder", ...}).  ``layers_per_block``: the UNet's (for ldm names).
    One ``ValueError`` (naming the file) lists every layer that maps to no weight or does not fit;
    a file none of whose layers fits this model is an error too.  Text-encoder layers past the
    model's last one (SD 2.x keeps 23 of OpenCLIP's 24: the last does not reach the UNet) are skipped."""
    kernels = {part: _kernels(tree) for part, tree in params.items() if part in ("unet", "text_encoder", "text_encoder_2")}
    depth = {part: 1 + max((int(m[1]) for k in kernels[part] if (m := re.match(r"encoder_layers_(\d+)_", k))), default=-1)
             for part in kernels}
    updates, unmatched, misfits = {}, list(lora.problems), []
    for (part, module), layer in lora.layers.items():
        flat = module.replace(".", "_")
        if part.startswith("text_encoder"):
            flat = flat.removeprefix("text_model_")
            if (m := re.match(r"encoder_layers_(\d+)_", flat)) and part in kernels and int(m[1]) >= depth[part] > 0:
                continue  # a layer after the one SD conditions on
        path = kernels.get(part, {}).get(flat)
        if path is None and part == "unet":
            path = kernels[part].get(ldm_unet_module_flat(flat, layers_per_block) or "")
        if path is None:
            unmatched.append(layer.names[0])
            continue
        leaf = params[part]
        for p in path:
            leaf = leaf[p]
        delta = _delta(layer, tuple(leaf.shape))
        if isinstance(delta, str):
            misfits.append(f"{layer.names[0]}: {delta}")
            continue
        updates[(part, *path)] = np.float32(scale * _alpha(lora, part, module, layer) / layer.rank) * delta
    if not updates:
        raise ValueError(f"{lora.name}: none of its {len(lora.layers)} LoRA layers matches a weight of this model "
                         f"(a LoRA for another model family? e.g. {', '.join(sorted(unmatched)[:3])})")
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} keys map to no layer of this model: " + ", ".join(sorted(unmatched)[:8]))
    if misfits:
        problems.append(f"{len(misfits)} layers do not fit: " + "; ".join(misfits[:5]))
    if problems:
        raise ValueError(f"{lora.name}: cannot apply the LoRA: " + " | ".join(problems))
    return updates


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def replace_leaves(tree: Mapping, leaves: Mapping[tuple, object]) -> dict:
    """A copy of ``tree`` with the leaves at the given paths replaced: new dicts along those paths,
    everything else (arrays and untouched sub-dicts) shared."""
    out = dict(tree)
    children: dict = {}
    for path, leaf in leaves.items():
        if len(path) == 1:
            out[path[0]] = leaf
        else:
            children.setdefault(path[0], {})[path[1:]] = leaf
    for name, sub in children.items():
        out[name] = replace_leaves(tree[name], sub)
    return out


def restore(params: Mapping, base: Mapping[tuple, object]) -> dict:
    """The parameters with the base leaves put back (bit for bit the arrays they were)."""
    return replace_leaves(params, base) if base else dict(params)


def fuse_loras(params: Mapping, loras: Sequence[tuple[LoRA, float]], layers_per_block: int,
               base: Mapping[tuple, object] | None = None) -> tuple[dict, dict]:
    """(fused params, base): ``params`` (its ``base`` leaves put back first) with every (LoRA, scale)
    of ``loras`` added: W' = W + sum scale * (alpha / rank) * up @ down, computed in float32 and stored in
    the leaf's dtype.  Only the touched leaves are new arrays; ``base`` holds the original ones (pass it
    back to fuse another set, or to :func:`restore`).  Nothing is changed when a ``ValueError`` is raised."""
    params = restore(params, base or {})
    total: dict[tuple, np.ndarray] = {}
    for lora, scale in loras:
        for path, delta in lora_updates(lora, params, layers_per_block, scale).items():
            total[path] = total[path] + delta if path in total else delta
    new_base, fused = {}, {}
    for path, delta in total.items():
        w = _get(params, path)
        new_base[path] = w
        host = np.asarray(w)
        fused[path] = (host.astype(np.float32) + delta).astype(host.dtype)
    return replace_leaves(params, fused), new_base


# --- writing: the diffusers / PEFT names ----------------------------------------------------------------------

_INDEXED = re.compile(r"^(down_blocks|up_blocks|attentions|resnets|transformer_blocks|to_out|net|layers|downsamplers|"
                      r"upsamplers)_(\d+)$")


def module_name(part: str, path: Sequence[str]) -> str:
    """The diffusers / transformers name of the module at a Flax path (the inverse of
    ``weights.flax_path``): ("unet", (down_blocks_0, attentions_0, ..., attn1, to_out_0)) ->
    "down_blocks.0.attentions.0...attn1.to_out.0"; text encoders get transformers' "text_model." prefix."""
    name = ".".join(_INDEXED.sub(r"\1.\2", p) for p in path)
    return name if part == "unet" else "text_model." + name


def save_lora(path, layers: Mapping[tuple, tuple], metadata: Mapping[str, str] | None = None,
              dtype=np.float32) -> Path:
    """Write LoRA factors in the diffusers / PEFT layout that diffusers' ``load_lora_weights`` and
    :func:`read_lora` load: ``{part}.{module}.lora_A.weight`` = down (rank, in), ``lora_B.weight`` = up
    (out, rank), float32 (``dtype=np.float16`` halves the file).  ``layers``: {(part, module name): (down,
    up)} with alpha / rank already multiplied into up, so that the file needs no alpha (a reader takes
    alpha = rank: a factor of 1)."""
    from .tensorfiles import write_safetensors

    tensors = {}
    for (part, module), (down, up) in sorted(layers.items()):
        tensors[f"{part}.{module}.lora_A.weight"] = np.ascontiguousarray(down, dtype)
        tensors[f"{part}.{module}.lora_B.weight"] = np.ascontiguousarray(up, dtype)
    write_safetensors(path, tensors, {str(k): str(v) for k, v in (metadata or {}).items()})
    return Path(path)


def describe(lora: LoRA, scale: float) -> str:
    """'style.safetensors (sha256 0123456789ab, kohya names, layers: 64 unet, 24 text encoder; scale 0.8)'."""
    parts = {}
    for part, _ in lora.layers:
        parts[part] = parts.get(part, 0) + 1
    layers = ", ".join(f"{n} {part.replace('_', ' ')}" for part, n in parts.items())
    return f"{lora.name} (sha256 {lora.sha256[:12]}, {lora.format} names, layers: {layers}; scale {scale:g})"
