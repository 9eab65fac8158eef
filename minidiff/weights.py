"""PyTorch state dicts -> Flax parameter trees: the names and shapes of SD checkpoints.

    renaming     down_blocks.0.resnets.1.conv1.weight  ->  down_blocks_0/resnets_1/conv1/kernel
                 ("name.N" -> "name_N"; "weight" -> kernel, scale or embedding)
    transposing  conv kernels OIHW -> HWIO, linear weights (out, in) -> (in, out)

``torch_to_flax`` fills a template (the target model's tree of shapes, e.g. from
``jax.eval_shape(model.init, ...)``): every leaf must be filled and every tensor land somewhere;
``clip_text_state_dict`` and ``vae_from_torch`` normalise those models' keys first.  The single-file
(ldm) layout maps to diffusers names with ``ldm_unet_key``, ``ldm_vae_key`` and
``openclip_text_state_dict`` (SD 2.x's fused q/k/v); model configs come from diffusers'
``config.json`` files or from an ldm checkpoint's shapes.  Reading files: ``minidiff.tensorfiles``;
SD 1.x / 2.x detection, EMA, the schedule check and the converted format: ``minidiff.convert``.
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


def _fits(leaf: str, shape: tuple, target: tuple) -> bool:
    """Whether a PyTorch tensor of ``shape`` fills a Flax leaf of shape ``target`` (after the transposes)."""
    if leaf == "kernel" and len(shape) == 4:
        shape = (shape[2], shape[3], shape[1], shape[0])
    elif leaf == "kernel" and len(shape) == 2:
        shape = shape[::-1]
    if leaf == "kernel" and {len(shape), len(target)} == {2, 4}:
        return int(np.prod(shape)) == int(np.prod(target)) and shape[-1] == target[-1]
    return shape == target


def torch_to_flax(state_dict: Mapping[str, np.ndarray], template, what: str = "model", dtype=np.float32,
                  names: Mapping[str, str] | None = None):
    """Fill the Flax tree ``template`` (a nested dict of arrays or ShapeDtypeStructs) from a
    PyTorch-style ``state_dict`` (name -> NumPy array, or anything with ``.shape`` that ``np.asarray``
    reads, such as a ``minidiff.tensorfiles.LazyTensor``).  Every leaf comes out C-contiguous in ``dtype``.
    Raises ``ValueError`` naming the missing, unexpected or mis-shaped tensors; ``names`` (optional)
    gives the name a renamed tensor had in its file, for those messages."""
    names = names or {}
    flat_template = flatten_dict(template, sep="/")
    modules = {}  # module path -> {leaf name: shape}
    for path, leaf in flat_template.items():
        module, leaf_name = path.rsplit("/", 1)
        modules.setdefault(module, {})[leaf_name] = tuple(leaf.shape)

    out, unexpected, bad_shapes, misfits = {}, [], [], set()
    for key, w in state_dict.items():
        *module, leaf = flax_path(key)
        module = "/".join(module)
        leaves = modules.get(module, {})
        if leaf == "weight":
            leaf = next((n for n in ("kernel", "scale", "embedding") if n in leaves), None)
        if leaf not in leaves:
            unexpected.append(names.get(key, key))
            continue
        if not _fits(leaf, tuple(w.shape), leaves[leaf]):  # checked on the shape alone: nothing is read
            bad_shapes.append(f"{names.get(key, key)} {tuple(w.shape)} -> {module}/{leaf} expects {leaves[leaf]}")
            misfits.add(f"{module}/{leaf}")
            continue
        w = _to_flax_layout(leaf, np.asarray(w), leaves[leaf])
        out[f"{module}/{leaf}"] = np.ascontiguousarray(w, dtype=dtype)

    missing = sorted(set(flat_template) - set(out) - misfits)
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


# --- the original single-file (ldm) layout -> diffusers names --------------------------------------
#
# CompVis' latent-diffusion code (ldm) saved the whole LatentDiffusion module in one state dict:
#
#   model.diffusion_model.   the UNet (openaimodel.UNetModel)     input_blocks.K.S / middle_block.S / output_blocks.K.S
#   model_ema.               EMA copies of the UNet, names without dots: model_ema.diffusion_modelinput_blocks00weight
#   first_stage_model.       the VAE (encoder.down.I.block.J, mid.attn_1 with 1x1-conv q, k, v, proj_out)
#   cond_stage_model.transformer.   SD 1.x: transformers' CLIPTextModel (with or without "text_model.")
#   cond_stage_model.model.         SD 2.x: OpenCLIP's text tower (resblocks.N with a fused attn.in_proj)
#   betas, alphas_cumprod, ...      the training noise schedule, as buffers
#
# The functions below rename one ldm name to its diffusers name, which ``flax_path`` then maps on.

LDM_UNET, LDM_EMA, LDM_VAE = "model.diffusion_model.", "model_ema.", "first_stage_model."
LDM_CLIP, LDM_OPENCLIP = "cond_stage_model.transformer.", "cond_stage_model.model."

# ldm ResBlock -> diffusers ResnetBlock2D
_LDM_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_LDM_UNET_FIXED = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                   "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
                   "label_emb": "class_embedding", "label_emb.0.0": "add_embedding.linear_1",
                   "label_emb.0.2": "add_embedding.linear_2"}  # SDXL's "text_time" embedding: label_emb.0 = MLP


def _ldm_resnet(prefix: str, rest: str) -> str:
    module, _, leaf = rest.rpartition(".")
    return f"{prefix}.{_LDM_RESNET.get(module, module)}.{leaf}"


def ldm_unet_key(key: str, layers_per_block: int) -> str:
    """An ldm UNet name (without ``model.diffusion_model.``) -> its diffusers name.

    With L = layers_per_block, ldm numbers the UNet's children in one sequence per side:

        input_blocks.0.0                      conv_in
        input_blocks.K.0 / .1, K = 1 + i(L+1) + j   down block i, layer j: ResBlock / SpatialTransformer
        input_blocks.K.0.op, K = (i+1)(L+1)   down block i's stride-2 conv
        middle_block.0 / .1 / .2              mid block: ResBlock, SpatialTransformer, ResBlock
        output_blocks.K.0 / .1, K = i(L+1) + j      up block i, layer j (j = 0..L)
        output_blocks.K.1.conv or .2.conv     up block i's upsampler, after its last layer

    Names that fit nowhere come back unchanged (the caller reports them)."""
    module, _, leaf = key.rpartition(".")
    if module in _LDM_UNET_FIXED:
        return f"{_LDM_UNET_FIXED[module]}.{leaf}"
    L1 = layers_per_block + 1
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key):
        k, s, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(k - 1, L1)
        if k > 0 and s == 0 and j == L1 - 1 and rest.startswith("op."):
            return f"down_blocks.{i}.downsamplers.0.conv.{rest[3:]}"
        if k > 0 and j < L1 - 1 and s in (0, 1):
            return _ldm_resnet(f"down_blocks.{i}.resnets.{j}", rest) if s == 0 else f"down_blocks.{i}.attentions.{j}.{rest}"
    elif m := re.fullmatch(r"middle_block\.(\d+)\.(.+)", key):
        s, rest = int(m[1]), m[2]
        is_resnet = rest.rpartition(".")[0] in _LDM_RESNET
        if s == 0 or (s in (1, 2) and is_resnet):
            return _ldm_resnet(f"mid_block.resnets.{min(s, 1)}", rest)
        if s == 1:
            return f"mid_block.attentions.0.{rest}"
    elif m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key):
        k, s, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(k, L1)
        if s in (1, 2) and rest.startswith("conv."):
            return f"up_blocks.{i}.upsamplers.0.conv.{rest[5:]}"
        if s in (0, 1):
            return _ldm_resnet(f"up_blocks.{i}.resnets.{j}", rest) if s == 0 else f"up_blocks.{i}.attentions.{j}.{rest}"
    return key



_LDM_FLAT = re.compile(r"(input_blocks_\d+_\d+|output_blocks_\d+_\d+|middle_block_\d+)_(.+)")
_LDM_FLAT_RESNET = re.compile(r"(in_layers|out_layers|emb_layers)_(\d+)")


def ldm_unet_module_flat(name: str, layers_per_block: int) -> str | None:
    """An ldm UNet *module* name with every dot flattened to "_" (kohya's LoRA names, e.g.
    'input_blocks_1_1_transformer_blocks_0_attn1_to_q' or 'input_blocks_1_0_in_layers_2') -> the
    diffusers module name flattened the same way ('down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q',
    'down_blocks_0_resnets_0_conv1'), through ``ldm_unet_key``; None where it fits nowhere."""
    m = _LDM_FLAT.fullmatch(name)
    if m is None:
        fixed = {k.replace(".", "_"): v for k, v in _LDM_UNET_FIXED.items()}
        return fixed[name].replace(".", "_") if name in fixed else None
    block = re.sub(r"_(\d+)", r".\1", m[1])  # input_blocks_1_1 -> input_blocks.1.1
    rest = _LDM_FLAT_RESNET.sub(r"\1.\2", m[2])  # in_layers_2 -> in_layers.2 (ResBlock children)
    key = ldm_unet_key(f"{block}.{rest}.weight", layers_per_block)
    return None if key == f"{block}.{rest}.weight" else key.removesuffix(".weight").replace(".", "_")


_LDM_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def ldm_vae_key(key: str, num_blocks: int) -> str:
    """An ldm VAE name (without ``first_stage_model.``) -> its diffusers name:

        encoder.down.I.block.J / .downsample.conv   encoder.down_blocks.I.resnets.J / .downsamplers.0.conv
        decoder.up.I.block.J / .upsample.conv       decoder.up_blocks.(n-1-I)...   (ldm counts up blocks
                                                    from the lowest resolution's index, diffusers in run order)
        mid.block_1, mid.attn_1, mid.block_2        mid_block.resnets.0, mid_block.attentions.0, mid_block.resnets.1
        mid.attn_1.norm / q / k / v / proj_out      group_norm / to_q / to_k / to_v / to_out.0 (1x1 convs there)
        norm_out, nin_shortcut                      conv_norm_out, conv_shortcut

    Names that fit nowhere come back unchanged."""
    key = key.replace(".nin_shortcut.", ".conv_shortcut.").replace(".norm_out.", ".conv_norm_out.")
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.(block\.(\d+)|downsample)\.(.+)", key):
        i, rest = m[1], m[4]
        inner = f"resnets.{m[3]}" if m[3] is not None else "downsamplers.0"
        return f"encoder.down_blocks.{i}.{inner}.{rest}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.+)", key):
        i, rest = num_blocks - 1 - int(m[1]), m[4]
        inner = f"resnets.{m[3]}" if m[3] is not None else "upsamplers.0"
        return f"decoder.up_blocks.{i}.{inner}.{rest}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", key):
        return f"{m[1]}.mid_block.attentions.0.{_LDM_VAE_ATTENTION.get(m[2], m[2])}.{m[3]}"
    return key


def openclip_text_state_dict(state_dict: Mapping[str, np.ndarray], keep_layers: int,
                             projection: bool = False) -> tuple[dict, dict, list]:
    """OpenCLIP's text tower (SD 2.x single files, names without ``cond_stage_model.model.``) in the
    ``minidiff.nn.clip`` layout:

        token_embedding.weight, positional_embedding   embeddings.token_embedding / position_embedding
        transformer.resblocks.N.ln_1 / ln_2            encoder.layers.N.layer_norm1 / layer_norm2
        transformer.resblocks.N.attn.in_proj_weight    q_proj, k_proj, v_proj: the three row blocks of
                                                       the fused (3D, D) matrix, in that order (same for the bias)
        transformer.resblocks.N.attn.out_proj          self_attn.out_proj
        transformer.resblocks.N.mlp.c_fc / c_proj      mlp.fc1 / mlp.fc2
        ln_final                                       final_layer_norm

    Blocks N >= ``keep_layers`` are left out (SD 2.x conditions on the penultimate layer: diffusers,
    and ``CLIPTextConfig.sd2()``, keep 23 of the 24), as is ``logit_scale`` (CLIP's contrastive head,
    unused by SD), and ``text_projection`` unless ``projection`` (SDXL's bigG: pooled text =
    pooled @ text_projection, stored (width, proj); transformers' ``text_projection.weight`` is its
    transpose, (proj, width)).  A fused tensor may be a
    ``minidiff.tensorfiles.LazyTensor``: its thirds are then read when converted.

    Returns (state dict, {new name: OpenCLIP name}, the names left out)."""
    out, origin, left_out = {}, {}, []
    fixed = {"token_embedding.weight": "embeddings.token_embedding.weight",
             "positional_embedding": "embeddings.position_embedding.weight",
             "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
    inner = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for key, w in state_dict.items():
        if key in fixed:
            out[fixed[key]], origin[fixed[key]] = w, key
        elif key == "text_projection" and projection:
            if len(w.shape) != 2:
                raise ValueError(f"text_projection has shape {tuple(w.shape)}: expected (width, projection)")
            out["text_projection.weight"], origin["text_projection.weight"] = _transposed(w), key
        elif key in ("text_projection", "logit_scale", "attn_mask"):
            left_out.append(key)
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(\w+)", key):
            n, module, leaf = int(m[1]), m[2], m[3]
            if n >= keep_layers:
                left_out.append(key)
            elif module == "attn" and leaf in ("in_proj_weight", "in_proj_bias"):
                d = w.shape[0] // 3
                for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    new = f"encoder.layers.{n}.self_attn.{name}.{leaf[8:]}"
                    out[new], origin[new] = _rows(w, i * d, (i + 1) * d), f"{key}[{name[0]}]"
            else:
                new = f"encoder.layers.{n}.{inner.get(module, module)}.{leaf}"
                out[new], origin[new] = w, key
        else:
            out[key], origin[key] = w, key  # reported as unexpected by torch_to_flax
    return out, origin, left_out


def _transposed(w):
    """w.T, lazily for a LazyTensor."""
    if hasattr(w, "rows"):
        return type(w)(tuple(w.shape)[::-1], w.dtype, lambda: np.asarray(w).T)
    return w.T  # an array (or a torch tensor: the tests' meta-device shapes)


def _rows(w, start: int, stop: int):
    return w.rows(start, stop) if hasattr(w, "rows") else w[start:stop]  # a LazyTensor stays lazy


# --- model configs: from diffusers' config.json files, or from the shapes of an ldm checkpoint -----


def _check_fields(config: Mapping, where: str, expected: Mapping, what: str):
    """Raise if ``config`` sets a field to something other than the value minidiff's model implements."""
    for field, want in expected.items():
        got = config.get(field, want)
        if isinstance(got, (list, tuple)) and not isinstance(want, (list, tuple)) and len(set(map(str, got))) == 1:
            got = got[0]  # a per-block list with one value everywhere
        if got != want:
            raise ValueError(f"{where}: {field}={got!r} is not supported: minidiff's {what} implements {want!r}")


def _one_value(config: Mapping, field: str, where: str, default):
    v = config.get(field, default)
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ValueError(f"{where}: per-block {field}={v!r} is not supported (one value for every block)")
        v = v[0]
    return v


def unet_config_from_diffusers(config: Mapping, where: str = "unet/config.json"):
    """``UNetConfig`` from a diffusers ``UNet2DConditionModel`` config; ``ValueError`` naming the
    field when the config describes something minidiff's UNet is not (SDXL's added embeddings, ...)."""
    from .nn.unet import UNetConfig

    _check_fields(config, where, {
        "act_fn": "silu", "center_input_sample": False, "time_embedding_type": "positional",
        "class_embed_type": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
        "only_cross_attention": False, "dual_cross_attention": False, "resnet_time_scale_shift": "default",
        "conv_in_kernel": 3, "conv_out_kernel": 3, "timestep_post_act": None, "cross_attention_norm": None,
        "attention_type": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
        "mid_block_type": "UNetMidBlock2DCrossAttn", "class_embeddings_concat": False,
        "mid_block_only_cross_attention": None,
    }, "UNet")
    added = config.get("addition_embed_type")
    if added not in (None, "text_time"):
        raise ValueError(f"{where}: addition_embed_type={added!r} is not supported: minidiff's UNet implements None "
                         "(SD 1.x / 2.x) and 'text_time' (SDXL)")
    down = list(config.get("down_block_types", ()))
    if not down or any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        raise ValueError(f"{where}: down_block_types={down!r} is not supported: minidiff's UNet has "
                         "CrossAttnDownBlock2D and DownBlock2D blocks")
    attention = tuple(t == "CrossAttnDownBlock2D" for t in down)
    want_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if list(config.get("up_block_types", ())) != want_up:
        raise ValueError(f"{where}: up_block_types={config.get('up_block_types')!r} do not mirror the down blocks "
                         f"(minidiff's UNet expects {want_up})")
    if isinstance(config.get("cross_attention_dim"), (list, tuple)):
        raise ValueError(f"{where}: a per-block cross_attention_dim is not supported")
    # diffusers' historical naming: SD's configs put the number of heads in "attention_head_dim"
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    depth = config.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if any(isinstance(d, (list, tuple)) for d in depth):
            raise ValueError(f"{where}: transformer_layers_per_block={depth!r} (a depth per layer) is not supported")
        depth = depth[0] if len(set(depth)) == 1 else tuple(depth)
    reverse = config.get("reverse_transformer_layers_per_block")
    mirrored = list(reversed(depth)) if isinstance(depth, tuple) else [depth] * len(down)
    if reverse is not None and list(reverse) != mirrored:
        raise ValueError(f"{where}: reverse_transformer_layers_per_block={reverse!r} is not supported: minidiff's up "
                         f"blocks mirror the down blocks ({mirrored})")
    return UNetConfig(
        sample_size=config.get("sample_size", 64), in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4), block_out_channels=tuple(config["block_out_channels"]),
        layers_per_block=_one_value(config, "layers_per_block", where, 2), attention=attention,
        num_attention_heads=tuple(heads) if isinstance(heads, (list, tuple)) else heads,
        transformer_layers_per_block=depth, addition_embed_type=added,
        addition_time_embed_dim=config.get("addition_time_embed_dim") if added else None,
        projection_class_embeddings_input_dim=config.get("projection_class_embeddings_input_dim") if added else None,
        cross_attention_dim=config.get("cross_attention_dim", 1280),
        use_linear_projection=config.get("use_linear_projection", False),
        num_class_embeds=config.get("num_class_embeds"), norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5), flip_sin_to_cos=config.get("flip_sin_to_cos", True),
        freq_shift=config.get("freq_shift", 0))


def vae_config_from_diffusers(config: Mapping, where: str = "vae/config.json"):
    """``AutoencoderKLConfig`` from a diffusers ``AutoencoderKL`` config (``ValueError`` for other designs)."""
    from .nn.autoencoder import AutoencoderKLConfig

    n = len(config.get("block_out_channels", ()))
    _check_fields(config, where, {
        "act_fn": "silu", "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "mid_block_add_attention": True, "latents_mean": None, "latents_std": None, "shift_factor": None,
    }, "VAE")
    return AutoencoderKLConfig(
        in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3),
        block_out_channels=tuple(config["block_out_channels"]), layers_per_block=config.get("layers_per_block", 2),
        latent_channels=config.get("latent_channels", 4), norm_num_groups=config.get("norm_num_groups", 32),
        sample_size=config.get("sample_size", 512), scaling_factor=config.get("scaling_factor", 0.18215),
        use_quant_conv=config.get("use_quant_conv", True), use_post_quant_conv=config.get("use_post_quant_conv", True))


def clip_text_config_from_transformers(config: Mapping, where: str = "text_encoder/config.json"):
    """``CLIPTextConfig`` from a transformers ``CLIPTextConfig`` (``text_encoder/config.json``)."""
    from .nn.clip import CLIPTextConfig

    archs = config.get("architectures") or ["CLIPTextModel"]
    if archs not in (["CLIPTextModel"], ["CLIPTextModelWithProjection"]):
        raise ValueError(f"{where}: architectures={archs!r} is not supported: SD uses a CLIPTextModel (SDXL's "
                         "second encoder a CLIPTextModelWithProjection)")
    act = config.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (quick_gelu for SD 1.x, gelu for SD 2.x)")
    return CLIPTextConfig(
        vocab_size=config.get("vocab_size", 49408), hidden_size=config.get("hidden_size", 768),
        intermediate_size=config.get("intermediate_size", 3072),
        num_hidden_layers=config.get("num_hidden_layers", 12), num_attention_heads=config.get("num_attention_heads", 12),
        max_position_embeddings=config.get("max_position_embeddings", 77), hidden_act=act,
        layer_norm_eps=config.get("layer_norm_eps", 1e-5),
        projection_dim=config.get("projection_dim", 512) if archs == ["CLIPTextModelWithProjection"] else None)


class _Shapes:
    """Shapes of a group of tensors (names without their prefix), with errors naming the file's keys."""

    def __init__(self, tensors: Mapping, prefix: str, what: str):
        self.tensors, self.prefix, self.what = tensors, prefix, what

    def __call__(self, key: str) -> tuple:
        if key not in self.tensors:
            raise ValueError(f"{self.prefix}{key} is missing: cannot work out the {self.what}'s architecture")
        return tuple(self.tensors[key].shape)

    def indices(self, pattern: str) -> list[int]:
        """Sorted distinct values of the (\\d+) group in the names that match ``pattern``."""
        found = {int(m[1]) for k in self.tensors if (m := re.match(pattern, k))}
        return sorted(found)

    def has(self, start: str) -> bool:
        return any(k.startswith(start) for k in self.tensors)


def unet_config_from_ldm(tensors: Mapping, heads_per_channel: int | None, prefix: str = LDM_UNET):
    """``UNetConfig`` from the shapes of an ldm UNet (names without ``model.diffusion_model.``).

    Widths, depth, attention placement, context width (``attn2.to_k``'s input features), linear or
    1x1-conv ``proj_in`` and class embeddings are read off the tensors.  The number of heads is not
    in the weights: ``heads_per_channel=None`` gives SD 1.x's 8 heads per block, an int gives
    channels / heads_per_channel heads (SD 2.x: head width 64).  GroupNorm groups, eps and the time
    embedding are SD's (32, 1e-5, flip_sin_to_cos)."""
    from .nn.unet import UNetConfig

    shape = _Shapes(tensors, prefix, "UNet")
    ch0, in_channels = shape("input_blocks.0.0.weight")[:2]
    ops = shape.indices(r"input_blocks\.(\d+)\.0\.op\.weight$")
    n_inputs = max(shape.indices(r"input_blocks\.(\d+)\."), default=0) + 1
    L1 = ops[0] if ops else n_inputs  # K of the first downsampler = layers_per_block + 1
    n = n_inputs // L1
    if L1 < 2 or n_inputs % L1:
        raise ValueError(f"{prefix}input_blocks: {n_inputs} input blocks with the first downsampler at "
                         f"{L1}: not the layout of an SD UNet")
    first = [1 + i * L1 for i in range(n)]  # the first layer of each down block
    channels = tuple(shape(f"input_blocks.{k}.0.out_layers.3.weight")[0] for k in first)
    attention = tuple(shape.has(f"input_blocks.{k}.1.") for k in first)
    attn = next((f"input_blocks.{k}.1." for k, a in zip(first, attention) if a), "middle_block.1.")
    context = shape(f"{attn}transformer_blocks.0.attn2.to_k.weight")[1]
    # transformer blocks per Transformer2D, per down block (SDXL: 1 / 2 / 10; 1 for a block without
    # attention, as diffusers' configs write it); the mid block has the last block's
    depths = [len(shape.indices(re.escape(f"input_blocks.{k}.1.") + r"transformer_blocks\.(\d+)\.")) if a else 1
              for k, a in zip(first, attention)]
    depth = depths[0] if len(set(depths)) == 1 else tuple(depths)
    if heads_per_channel is None:
        heads = 8
    else:
        if any(c % heads_per_channel for c in channels):
            raise ValueError(f"UNet widths {channels} are not multiples of the head width {heads_per_channel}")
        heads = tuple(c // heads_per_channel for c in channels)
    return UNetConfig(
        in_channels=in_channels, out_channels=shape("out.2.weight")[0], block_out_channels=channels,
        layers_per_block=L1 - 1, attention=attention, mid_block_attention=shape.has("middle_block.1.transformer_blocks."),
        num_attention_heads=heads, transformer_layers_per_block=depth, cross_attention_dim=context,
        use_linear_projection=len(shape(f"{attn}proj_in.weight")) == 2,
        num_class_embeds=shape("label_emb.weight")[0] if "label_emb.weight" in tensors else None,
        **_text_time_from_ldm(shape, tensors))


def _text_time_from_ldm(shape, tensors) -> dict:
    """SDXL's added embedding (label_emb.0.0 = linear_1 of [pooled text, 6 x sin/cos]): its input width.
    The width per size/crop number is not in the weights: SDXL's 256 (pooled text = the rest)."""
    if "label_emb.0.0.weight" not in tensors:
        return {}
    width = shape("label_emb.0.0.weight")[1]
    if width <= 6 * 256:
        raise ValueError(f"label_emb.0.0.weight takes {width} features: not SDXL's pooled text + 6 x 256")
    return dict(addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=width)


def vae_config_from_ldm(tensors: Mapping, prefix: str = LDM_VAE):
    """``AutoencoderKLConfig`` from the shapes of an ldm VAE (names without ``first_stage_model.``);
    GroupNorm groups (32) and the scaling factor (0.18215) are SD's."""
    from .nn.autoencoder import AutoencoderKLConfig

    shape = _Shapes(tensors, prefix, "VAE")
    blocks = shape.indices(r"encoder\.down\.(\d+)\.")
    if not blocks:
        raise ValueError(f"no {prefix}encoder.down.* tensors: cannot work out the VAE's architecture")
    return AutoencoderKLConfig(
        in_channels=shape("encoder.conv_in.weight")[1], out_channels=shape("decoder.conv_out.weight")[0],
        block_out_channels=tuple(shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in blocks),
        layers_per_block=len(shape.indices(r"encoder\.down\.0\.block\.(\d+)\.")),
        latent_channels=shape("decoder.conv_in.weight")[1], mid_block_attention=shape.has("encoder.mid.attn_1."),
        use_quant_conv="quant_conv.weight" in tensors, use_post_quant_conv="post_quant_conv.weight" in tensors)


def clip_text_config_from_weights(tensors: Mapping, hidden_act: str, prefix: str = ""):
    """``CLIPTextConfig`` from the shapes of a text encoder in the ``minidiff.nn.clip`` layout; heads
    of width 64 (OpenAI's ViT-L/14: 12 x 64, OpenCLIP's ViT-H/14: 16 x 64)."""
    from .nn.clip import CLIPTextConfig

    shape = _Shapes(tensors, prefix, "text encoder")
    vocab, width = shape("embeddings.token_embedding.weight")
    if width % 64:
        raise ValueError(f"text encoder width {width} is not a multiple of the head width 64")
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=shape("encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=len(shape.indices(r"encoder\.layers\.(\d+)\.")), num_attention_heads=width // 64,
        max_position_embeddings=shape("embeddings.position_embedding.weight")[0], hidden_act=hidden_act)
