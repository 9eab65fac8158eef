"""PyTorch state dicts -> Flax parameter trees.

minidiff's module names mirror the diffusers layout, so converting a diffusers state dict is:

    renaming   down_blocks.0.resnets.1.conv1.weight  ->  down_blocks_0/resnets_1/conv1/kernel
               ff.net.0.proj.weight                  ->  ff/net_0/proj/kernel
               ("name.N" becomes "name_N"; "weight" becomes kernel, scale or embedding)
    transposing  conv kernels OIHW -> HWIO, linear weights (out, in) -> (in, out)

The Flax tree of the target model (its shapes, e.g. from ``jax.eval_shape(model.init, ...)``)
is the template: every template leaf must be filled, and every tensor must land somewhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

_INDEXED = re.compile(r"([A-Za-z_]\w*)\.(\d+)(?=\.|$)")


def flax_path(torch_key: str) -> tuple[str, ...]:
    """'down_blocks.0.resnets.1.conv1.weight' -> ('down_blocks_0', 'resnets_1', 'conv1', 'weight')."""
    while True:
        merged = _INDEXED.sub(r"\1_\2", torch_key)
        if merged == torch_key:
            return tuple(torch_key.split("."))
        torch_key = merged


def _to_flax_layout(name: str, w: np.ndarray, target_shape: tuple) -> np.ndarray:
    """Transpose a PyTorch tensor into the layout of the Flax leaf it fills."""
    if name == "kernel":
        if w.ndim == 4:  # conv OIHW -> HWIO
            w = w.transpose(2, 3, 1, 0)
        elif w.ndim == 2:  # linear (out, in) -> (in, out)
            w = w.T
        # a 1x1 conv stored where a linear layer lives, or the other way round (ldm vs diffusers)
        if {w.ndim, len(target_shape)} == {2, 4} and w.size == int(np.prod(target_shape)):
            w = w.reshape(target_shape)
    return w


def torch_to_flax(state_dict: Mapping[str, np.ndarray], template, what: str = "model", dtype=np.float32):
    """Fill the Flax tree ``template`` (a nested dict of arrays or ShapeDtypeStructs) from a
    PyTorch-style ``state_dict`` (name -> NumPy array).  Raises ``ValueError`` naming the missing,
    unexpected or mis-shaped tensors."""
    flat_template = flatten_dict(template, sep="/")
    modules = {}  # module path -> {leaf name: shape}
    for path, leaf in flat_template.items():
        module, leaf_name = path.rsplit("/", 1)
        modules.setdefault(module, {})[leaf_name] = tuple(leaf.shape)

    out, unexpected, bad_shapes = {}, [], []
    for key, w in state_dict.items():
        *module, leaf = flax_path(key)
        module = "/".join(module)
        leaves = modules.get(module, {})
        if leaf == "weight":
            leaf = next((n for n in ("kernel", "scale", "embedding") if n in leaves), None)
        if leaf not in leaves:
            unexpected.append(key)
            continue
        w = _to_flax_layout(leaf, np.asarray(w), leaves[leaf])
        if w.shape != leaves[leaf]:
            bad_shapes.append(f"{key} {tuple(np.shape(state_dict[key]))} -> {module}/{leaf} expects {leaves[leaf]}")
            continue
        out[f"{module}/{leaf}"] = w.astype(dtype)

    missing = sorted(set(flat_template) - set(out))
    problems = []
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} tensors have the wrong shape: " + "; ".join(bad_shapes[:5]))
    if missing:
        problems.append(f"{len(missing)} parameters have no tensor in the checkpoint: " + ", ".join(missing[:8]))
    if unexpected:
        problems.append(f"{len(unexpected)} tensors match no parameter: " + ", ".join(sorted(unexpected)[:8]))
    if problems:
        raise ValueError(f"cannot load the {what} weights: " + " | ".join(problems))
    return unflatten_dict(out, sep="/")


# --- CLIP text encoder -----------------------------------------------------------------------

_LDM_CLIP_TEXT = "cond_stage_model.transformer."  # SD 1.x single-file (ldm) checkpoints


def clip_text_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Normalise the keys of a CLIP text encoder state dict to the ``minidiff.nn.clip`` layout
    (``embeddings.token_embedding.weight``, ``encoder.layers.0.self_attn.q_proj.weight``...), ready
    for ``torch_to_flax``.  Accepts keys with the ``text_model.`` prefix (diffusers folders,
    transformers < 5) or without it (transformers 5), and a whole SD 1.x single-file checkpoint
    (only the ``cond_stage_model.transformer.`` tensors are kept).  Drops the ``position_ids``
    buffer that older transformers saved.  (SD 2.x single files store OpenCLIP's own layout,
    ``cond_stage_model.model.transformer.resblocks.N``, which this does not convert.)"""
    if any(k.startswith(_LDM_CLIP_TEXT) for k in state_dict):
        state_dict = {k[len(_LDM_CLIP_TEXT):]: v for k, v in state_dict.items() if k.startswith(_LDM_CLIP_TEXT)}
    out = {}
    for key, w in state_dict.items():
        name = key.removeprefix("text_model.")
        if name == "embeddings.position_ids":
            continue
        if name in out:
            raise ValueError(f"the CLIP text weights hold {name!r} twice (with and without 'text_model.')")
        out[name] = w
    return out


# --- Stable Diffusion's VAE (diffusers AutoencoderKL) ---------------------------------------------

# diffusers < 0.14 (and checkpoints saved then) named the VAE mid-block attention like ldm's
# AttnBlock: query/key/value/proj_attn.  Today's names are to_q/to_k/to_v/to_out.0.
_OLD_VAE_ATTENTION = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_key_map(torch_key: str) -> str:
    """A diffusers AutoencoderKL key in today's naming:
    'encoder.mid_block.attentions.0.proj_attn.weight' -> 'encoder.mid_block.attentions.0.to_out.0.weight'.
    Everything else is unchanged (then ``flax_path`` does the rest)."""
    return _OLD_VAE_ATTENTION.sub(lambda m: f"{m[1]}{_NEW_VAE_ATTENTION[m[2]]}.{m[3]}", torch_key)


def vae_from_torch(state_dict: Mapping[str, np.ndarray], template, dtype=np.float32):
    """Parameters of ``minidiff.nn.autoencoder.AutoencoderKL`` from a diffusers AutoencoderKL state
    dict (old or new attention names; the attention's q/k/v/out as linear (C, C) or 1x1 conv
    (C, C, 1, 1) weights).  ``template``: the model's parameter shapes.  Raises ``ValueError``
    naming missing, unexpected, mis-shaped or doubly given tensors."""
    renamed, sources = {}, {}
    for key, w in state_dict.items():
        new = vae_key_map(key)
        if new in renamed:
            raise ValueError(f"cannot load the VAE weights: {sources[new]} and {key} are the same tensor ({new}) "
                             "in old and new attention naming")
        renamed[new], sources[new] = w, key
    return torch_to_flax(renamed, template, "VAE", dtype)
