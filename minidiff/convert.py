"""Stable Diffusion 1.x / 2.x / XL checkpoints -> one converted file that minidiff loads fast.

    convert(src, dst)     write dst (.safetensors of the flattened Flax tree: unet/..., vae/...,
                          text_encoder/...) and dst's .json (configs, prediction, schedule, pad token, notes)
    read_checkpoint(src)  the same in memory: (params, StableDiffusionConfig)
    load_converted(dst)   (params {"unet", "vae", "text_encoder"}, StableDiffusionConfig)

``src``: a diffusers folder or an original (ldm) single file (``.safetensors``, or ``.ckpt`` read with
``torch.load(weights_only=True)`` only), float32, float16 or bfloat16; an EMA UNet is used when present.
SD 1.x vs 2.x is read from the weights: the text encoder (``cond_stage_model.transformer.`` vs
``.model.``), ``proj_in`` (1x1 conv vs linear), the context width (768 vs 1024).  The family gives
the rest: heads (SD 1.x: 8; SD 2.x: width / 64) and, without a scheduler config, the prediction
type (SD 2.x: v, with a note).  SDXL is recognised by its second text encoder (``text_encoder_2/``
in a folder; ``conditioner.embedders.*`` in Stability's single file, sd_xl_base_1.0.safetensors):
its params gain a ``text_encoder_2`` tree (OpenCLIP bigG with its projection).  The SDXL refiner
(bigG alone, aesthetic-score conditioning) is refused.  Names and shapes: ``minidiff.weights``; file reading: ``minidiff.tensorfiles``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from .config import config_from_dict, read_json
from .diffusion.samplers import PREDICTION_TYPES
from .files import atomic_write, check_writable, commit, remove_stale_temps
from .sdconfig import SD_SCHEDULER, SchedulerConfig, StableDiffusionConfig
from .tensorfiles import (machine_eps, memmap_safetensors, open_safetensors, output_dtype, read_tensors,
                          write_safetensors)
from .weights import (LDM_CLIP, LDM_EMA, LDM_OPENCLIP, LDM_UNET, LDM_VAE, _Shapes, clip_text_config_from_transformers,
                      clip_text_config_from_weights, clip_text_state_dict, ldm_unet_key, ldm_vae_key,
                      openclip_text_state_dict, torch_to_flax, unet_config_from_diffusers, unet_config_from_ldm,
                      vae_config_from_diffusers, vae_config_from_ldm, vae_key_map)

_WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                 "text_encoder_2": "model"}


def _find_weights(folder: Path, stem: str) -> list[Path]:
    """The weight file(s) of one diffusers component: ``<stem>.safetensors``, a sharded
    ``<stem>.safetensors.index.json``, the legacy ``.bin`` (transformers: ``pytorch_model.bin``),
    then the same with the ``.fp16`` variant."""
    stems = [stem, "pytorch_model"] if stem == "model" else [stem]
    for variant in ("", ".fp16"):
        for s in stems:
            for ext in (".safetensors", ".bin"):
                single, index = folder / f"{s}{variant}{ext}", folder / f"{s}{variant}{ext}.index.json"
                if single.is_file():
                    return [single]
                if index.is_file():
                    try:
                        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
                        raise ValueError(f"{index} is not a weight index (weight_map): {e}") from None
                    return [folder / name for name in shards]
    raise FileNotFoundError(f"no weights in {folder}: expected {stem}.safetensors (or .bin)")


# --- Stable Diffusion checkpoints -> one converted file -------------------------------------------

# What tells SD 1.x and SD 2.x apart, and what each implies that the weights do not say.
FAMILIES = {
    "sd1": dict(name="SD 1.x", text="clip", text_desc="OpenAI CLIP (quick_gelu; cond_stage_model.transformer. in a single file)",
                linear=False, context=768, heads_per_channel=None, hidden_act="quick_gelu", pad_token_id=49407,
                prediction_type="epsilon"),
    "sd2": dict(name="SD 2.x", text="openclip", text_desc="OpenCLIP (gelu; cond_stage_model.model. in a single file)",
                linear=True, context=1024, heads_per_channel=64, hidden_act="gelu", pad_token_id=0,
                prediction_type="v_prediction"),
    "sdxl": dict(name="SDXL", text="clip+openclip", text_desc="OpenAI CLIP-L and OpenCLIP bigG (conditioner.embedders.0 "
                 "and .1 in a single file)", linear=True, context=2048, heads_per_channel=64, hidden_act="quick_gelu",
                 pad_token_id=49407, prediction_type="epsilon"),
}

# Stability's SGM single files (sd_xl_base_1.0.safetensors): the text encoders live under conditioner.embedders
SGM_CLIP, SGM_OPENCLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
SGM_REFINER_OPENCLIP = "conditioner.embedders.0.model."  # the refiner's only text encoder (bigG)
REFINER_MESSAGE = ("the SDXL refiner (OpenCLIP bigG alone, conditioned on an aesthetic score) is not supported: "
                   "minidiff runs SDXL base 1.0 and the models fine-tuned from it")

_DIFFUSERS_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}

# ldm's DDPM.register_schedule buffers: the schedule, stored (as float32) in every single file
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
# other non-weight entries of single files, recognised and skipped by name
_SKIPPED = {"model_ema.decay": "EMA bookkeeping", "model_ema.num_updates": "EMA bookkeeping",
            "logvar": "training-loss buffer", "lvlb_weights": "training-loss buffer"}


def _family(evidence: dict, requested: str | None, where: str) -> str:
    """SD 1.x or 2.x from the evidence (text encoder kind, proj_in linear or conv, context width);
    an explicit ``requested`` family that contradicts the weights is an error naming the mismatch."""
    if requested is not None and requested not in FAMILIES:
        raise ValueError(f"unknown config {requested!r}; choose one of {', '.join(FAMILIES)}")
    if evidence["text"] is not None:
        detected = {"openclip": "sd2", "clip+openclip": "sdxl"}.get(evidence["text"], "sd1")
    else:
        detected = "sd2" if evidence["linear"] or evidence["context"] == 1024 else "sd1"
    if requested is None or requested == detected:
        return detected
    want, got = FAMILIES[requested], FAMILIES[detected]
    problems = []
    if evidence["context"] == got["context"]:
        problems.append(f"attn2.to_k has {evidence['context']} input features: an {got['name']} checkpoint; "
                        f"--config {requested} expects {want['context']}")
    if evidence["text"] is not None and evidence["text"] != want["text"]:
        problems.append(f"the text encoder is {got['text_desc']}: an {got['name']} checkpoint; "
                        f"--config {requested} expects {want['text_desc']}")
    if evidence["linear"] != want["linear"]:
        kind = lambda linear: "a linear layer" if linear else "a 1x1 conv"  # noqa: E731
        problems.append(f"proj_in is {kind(evidence['linear'])}: an {got['name']} checkpoint; "
                        f"--config {requested} expects {kind(want['linear'])}")
    if not problems:
        problems.append(f"the weights look like {got['name']}")
    raise ValueError(f"{where}: --config {requested} does not fit these weights: " + "; ".join(problems))


def _prediction(requested: str | None, from_scheduler: str | None, family: str, notes: list) -> str:
    if requested is not None:
        if requested not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {requested!r}; choose one of {', '.join(PREDICTION_TYPES)}")
        pred = requested
        if from_scheduler is not None and from_scheduler != pred:
            notes.append(f"prediction: {pred} as requested (scheduler_config.json says {from_scheduler})")
        else:
            notes.append(f"prediction: {pred} as requested")
        return pred
    if from_scheduler is not None:
        notes.append(f"prediction: {from_scheduler} (scheduler_config.json)")
        return from_scheduler
    pred = FAMILIES[family]["prediction_type"]
    if family == "sd2":
        notes.append("prediction: v_prediction ASSUMED. The weights do not say what an SD 2.x UNet predicts: the "
                     "768-px models (2.0-v, 2.1) predict v, the 512-px 'base' models epsilon; pass --prediction "
                     "epsilon for a base model")
    else:
        notes.append(f"prediction: {pred} ({FAMILIES[family]['name']})")
    return pred


def _sampler_from_diffusers(c: Mapping, notes: list) -> str:
    """The sampler a diffusers scheduler config names (its class and flags): the command line's default."""
    from .diffusion.solvers import DIFFUSERS_CLASSES

    name = DIFFUSERS_CLASSES.get(c.get("_class_name"))
    if name is None:
        notes.append(f"sampler: {c.get('_class_name')!r} is not one minidiff has; DPM++ 2M Karras by default")
        return "DPM++ 2M Karras"
    if name == "dpmpp_2m" and str(c.get("algorithm_type", "")).startswith("sde"):
        name = "dpmpp_2m_sde"
    sigmas = "karras" if c.get("use_karras_sigmas") else "exponential" if c.get("use_exponential_sigmas") else ""
    name = f"{name}_{sigmas}" if sigmas and name not in ("ddim", "ddpm", "plms", "lcm") else name
    notes.append(f"sampler: {name} (the folder's {c.get('_class_name')})")
    return name


def _scheduler_from_diffusers(path: Path, notes: list) -> tuple[dict, str | None, str]:
    """(our scheduler dict, prediction_type, sampler) from ``scheduler/scheduler_config.json``."""
    c = read_json(path)
    if c.get("trained_betas") is not None:
        raise ValueError(f"{path}: trained_betas (a hand-made schedule) is not supported")
    name = c.get("beta_schedule", "linear")
    if name not in _DIFFUSERS_SCHEDULES:
        raise ValueError(f"{path}: beta_schedule={name!r} is not supported; minidiff knows "
                         f"{', '.join(_DIFFUSERS_SCHEDULES)}")
    scheduler = {k: c.get(k, v) for k, v in SD_SCHEDULER.items()} | {"beta_schedule": _DIFFUSERS_SCHEDULES[name]}
    pred = c.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ValueError(f"{path}: prediction_type={pred!r} is not supported")
    notes.append(f"schedule: {name} ({scheduler['beta_start']}..{scheduler['beta_end']}, "
                 f"{scheduler['num_train_timesteps']} steps) from {path.parent.name}/{path.name}")
    return scheduler, pred, _sampler_from_diffusers(c, notes)


def ldm_schedule_buffers(schedule) -> dict[str, np.ndarray]:
    """The buffers ldm's DDPM.register_schedule computes from beta_t (float64):

        alphas_cumprod = alpha_bar_t,  alphas_cumprod_prev = alpha_bar_{t-1} (1 at t = 0),
        sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, log(1 - alpha_bar_t),
        sqrt(1 / alpha_bar_t), sqrt(1 / alpha_bar_t - 1),
        posterior_variance = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t), its log clipped at 1e-20,
        posterior_mean_coef1 = beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t),
        posterior_mean_coef2 = (1 - alpha_bar_{t-1}) sqrt(alpha_t) / (1 - alpha_bar_t)."""
    ab = schedule.alpha_bar
    return {
        "betas": schedule.betas, "alphas_cumprod": ab, "alphas_cumprod_prev": schedule.alpha_bar_prev,
        "sqrt_alphas_cumprod": np.sqrt(ab), "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ab),
        "log_one_minus_alphas_cumprod": np.log(1 - ab), "sqrt_recip_alphas_cumprod": np.sqrt(1 / ab),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / ab - 1), "posterior_variance": schedule.posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(schedule.posterior_variance, 1e-20)),
        "posterior_mean_coef1": schedule.posterior_coef_x0, "posterior_mean_coef2": schedule.posterior_coef_xt,
    }


def check_schedule(buffers: Mapping[str, np.ndarray], scheduler: Mapping, where: str) -> str:
    """Compare a single file's schedule buffers with the schedule ``scheduler`` describes; returns a
    note with the largest relative difference, raises ``ValueError`` beyond what the buffers' float
    precision explains (the model was trained with another schedule, and sampling it with SD's
    would be wrong)."""
    from .diffusion.schedule import NoiseSchedule

    want = ldm_schedule_buffers(SchedulerConfig.from_diffusers(scheduler).noise_schedule())
    ab = want["alphas_cumprod"]
    want["denoiser.sigmas"] = np.sqrt((1 - ab) / ab)  # SGM (SDXL): sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
    worst, worst_name, tol = 0.0, None, 0.0
    for name, w in buffers.items():
        got = np.asarray(w)
        if got.shape != want[name].shape:
            raise ValueError(f"{where}: the schedule buffer {name} has shape {got.shape}, but the "
                             f"{scheduler['num_train_timesteps']}-step schedule has {want[name].shape}")
        err = float(np.max(np.abs(got.astype(np.float64) - want[name]) / np.maximum(np.abs(want[name]), 1e-6)))
        tol = max(tol, 1e-5, 4 * machine_eps(got.dtype))
        if err > worst:
            worst, worst_name = err, name
    described = f"{scheduler['beta_schedule']} ({scheduler['beta_start']}..{scheduler['beta_end']}, " \
                f"{scheduler['num_train_timesteps']} steps)"
    if worst > tol:
        alpha_bar = np.asarray(buffers["alphas_cumprod"], np.float64) if "alphas_cumprod" in buffers else None
        hint = ""
        for name in ("linear", "cosine"):
            other = NoiseSchedule.from_name(name, len(want["betas"])).alpha_bar
            if alpha_bar is not None and np.max(np.abs(alpha_bar - other) / np.maximum(other, 1e-6)) <= tol:
                hint = f"; it matches the {name} schedule"
        raise ValueError(f"{where}: the checkpoint's noise schedule differs from {described}: {worst_name} is off by "
                         f"{worst:.3g} (relative; float precision explains {tol:.1g}): the model was trained with a "
                         f"different schedule{hint}, which minidiff would sample wrongly")
    return (f"schedule: {len(buffers)} buffers ({', '.join(sorted(buffers)[:3])}, ...) match {described}: "
            f"max relative difference {worst:.2g}")


def _templates(unet_cfg, vae_cfg, text_cfg, text_cfg_2=None) -> dict:
    """The parameter shapes of the models (``jax.eval_shape``: nothing is computed)."""
    import jax
    import jax.numpy as jnp

    from .nn.autoencoder import AutoencoderKL
    from .nn.clip import CLIPTextModel
    from .nn.unet import UNet2DCondition

    key = jax.random.PRNGKey(0)
    f = 2 ** (len(unet_cfg.block_out_channels) - 1)
    x = jnp.zeros((1, f, f, unet_cfg.in_channels))
    ctx = None if unet_cfg.cross_attention_dim is None else jnp.zeros((1, 1, unet_cfg.cross_attention_dim))
    labels = None if unet_cfg.num_class_embeds is None else jnp.zeros(1, jnp.int32)
    added = None if unet_cfg.addition_embed_type is None else {
        "text_embeds": jnp.zeros((1, unet_cfg.pooled_text_dim)), "time_ids": jnp.zeros((1, 6))}
    img = jnp.zeros((1, vae_cfg.downsample_factor, vae_cfg.downsample_factor, vae_cfg.in_channels))
    text = lambda cfg: jax.eval_shape(lambda: CLIPTextModel(cfg).init(key, jnp.zeros((1, 1), jnp.int32)))["params"]  # noqa: E731
    unet = UNet2DCondition(unet_cfg)
    return {
        "unet": jax.eval_shape(lambda: unet.init(key, x, jnp.zeros(1, jnp.int32), ctx, labels, added_cond=added))["params"],
        "vae": jax.eval_shape(lambda: AutoencoderKL(vae_cfg).init(key, img))["params"],
        "text_encoder": text(text_cfg),
        **({"text_encoder_2": text(text_cfg_2)} if text_cfg_2 is not None else {}),
    }


def _convert_models(sources: dict, templates: dict, dtype, where: str, extra_problems=()) -> dict:
    """torch_to_flax for each model; every model's problems (and ``extra_problems``) in ONE error."""
    what = {"unet": "UNet", "vae": "VAE", "text_encoder": "CLIP text encoder",
            "text_encoder_2": "second (OpenCLIP bigG) text encoder"}
    params, problems = {}, list(extra_problems)
    for part, (state_dict, names) in sources.items():
        try:
            params[part] = torch_to_flax(state_dict, templates[part], what[part], dtype, names)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError(f"cannot convert {where}: " + " || ".join(problems))
    return params


def _dtype_counts(*groups) -> dict:
    counts = {}
    for g in groups:
        for t in g.values():
            counts[str(t.dtype)] = counts.get(str(t.dtype), 0) + 1
    return counts


def _split_ldm(tensors: Mapping) -> dict:
    """Sort a single file's tensors by the model they belong to (names without the prefix), the
    schedule buffers, what is skipped by name (reason -> names) and what is unknown."""
    groups = {g: {} for g in ("unet", "ema", "vae", "clip", "openclip", "clip_xl", "openclip_xl", "buffers", "skipped")}
    groups["unknown"] = []
    prefixes = (("unet", LDM_UNET), ("ema", LDM_EMA), ("vae", LDM_VAE), ("clip", LDM_CLIP), ("openclip", LDM_OPENCLIP),
                ("clip_xl", SGM_CLIP), ("openclip_xl", SGM_OPENCLIP))
    for k, t in tensors.items():
        group = next((g for g, prefix in prefixes if k.startswith(prefix)), None)
        if k in _SKIPPED:
            groups["skipped"].setdefault(_SKIPPED[k], []).append(k)
        elif k in SCHEDULE_BUFFERS:
            groups["buffers"][k] = t
        elif k == "denoiser.sigmas":  # SGM's DiscreteDenoiser: sigma_t of the schedule (compared in ascending order)
            groups["buffers"][k] = np.sort(np.asarray(t).reshape(-1))
        elif k.startswith(LDM_VAE + "loss."):
            groups["skipped"].setdefault("the VAE's training loss (LPIPS, discriminator)", []).append(k)
        elif group is not None:
            groups[group][k[len(dict(prefixes)[group]):]] = t
        else:
            groups["unknown"].append(k)
    return groups


def _ldm_text_encoder(g: dict, fam: dict, notes: list) -> tuple[dict, dict]:
    """(state dict in the minidiff.nn.clip layout, {its names: names in the file}) of a single file's
    text encoder: OpenAI CLIP (SD 1.x) or OpenCLIP (SD 2.x, last block left out)."""
    skipped = g["skipped"]
    if g["clip"]:
        for k in g["clip"]:
            if k.removeprefix("text_model.") == "embeddings.position_ids":
                skipped.setdefault("text position_ids buffer", []).append(LDM_CLIP + k)
        return clip_text_state_dict(g["clip"]), {k.removeprefix("text_model."): LDM_CLIP + k for k in g["clip"]}
    blocks = _Shapes(g["openclip"], LDM_OPENCLIP, "text encoder").indices(r"transformer\.resblocks\.(\d+)\.")
    text, origin, left_out = openclip_text_state_dict(g["openclip"], keep_layers=len(blocks) - 1)
    if blocks:
        notes.append(f"text encoder: OpenCLIP's last block (resblocks.{blocks[-1]}) is left out: SD 2.x "
                     f"conditions on the penultimate layer ({len(blocks) - 1} of {len(blocks)} blocks kept)")
    for k in left_out:
        if not k.startswith("transformer.resblocks."):
            skipped.setdefault("OpenCLIP's contrastive head (unused by SD)", []).append(LDM_OPENCLIP + k)
    return text, {k: LDM_OPENCLIP + v for k, v in origin.items()}


def _ldm_ema(unet: dict, ema_copy: dict, ema: bool | None, where: str, notes: list) -> tuple[dict, dict, bool | None]:
    """The UNet to convert: its EMA copy when the file has one (unless ema=False).  ldm's LitEma
    names the copy of model.diffusion_model.X  "model_ema." + "diffusion_model.X" without its dots:
    input_blocks.0.0.weight -> model_ema.diffusion_modelinput_blocks00weight.
    Returns (tensors, {name: name in the file}, whether the EMA copy was used)."""
    if not ema_copy:
        if ema is True:
            raise ValueError(f"{where}: no EMA copy of the UNet (model_ema.*) in this file")
        notes.append("EMA: no EMA copy (model_ema.*) in the file; the UNet weights are used as stored "
                     "(pruned 'emaonly' files store the EMA weights there)")
        return unet, {k: LDM_UNET + k for k in unet}, None
    if ema is False:
        notes.append(f"EMA: the file holds an EMA copy of the UNet ({len(ema_copy)} model_ema.* tensors), NOT used "
                     "(--no-ema): converting the raw model.diffusion_model.* weights")
        return unet, {k: LDM_UNET + k for k in unet}, False
    flat = {("diffusion_model." + k).replace(".", ""): k for k in unet}
    lacking = sorted(LDM_UNET + k for f, k in flat.items() if f not in ema_copy)
    stray = sorted(LDM_EMA + f for f in ema_copy if f not in flat)
    if lacking or stray or len(flat) < len(unet):
        raise ValueError(f"{where}: the EMA copy of the UNet (model_ema.*) does not match the UNet: "
                         f"{len(lacking)} UNet tensors have no EMA copy ({', '.join(lacking[:3])}), "
                         f"{len(stray)} EMA tensors match no UNet tensor ({', '.join(stray[:3])}); "
                         "pass --no-ema (ema=False) to use the raw UNet weights")
    notes.append(f"EMA: USING THE EMA WEIGHTS of the UNet (model_ema.*, {len(ema_copy)} tensors); the "
                 f"{len(flat)} raw model.diffusion_model.* tensors are skipped")
    return {k: ema_copy[f] for f, k in flat.items()}, {k: LDM_EMA + f for f, k in flat.items()}, True


def _read_single_file(path: Path, requested, prediction, dtype, ema, notes) -> tuple[dict, StableDiffusionConfig]:
    tensors, extra = read_tensors(path)
    g, where = _split_ldm(tensors), str(path)
    if any(k.startswith(SGM_REFINER_OPENCLIP) for k in g["unknown"]):
        raise ValueError(f"{where}: {REFINER_MESSAGE} ({SGM_REFINER_OPENCLIP}* found)")
    if g["clip_xl"] or g["openclip_xl"]:
        return _read_sgm_file(path, g, extra, requested, prediction, dtype, ema, notes)
    for group, prefix, what in (("unet", LDM_UNET, "UNet"), ("vae", LDM_VAE, "VAE")):
        if not g[group]:
            raise ValueError(f"{where}: no {what} tensors ({prefix}*): not a Stable Diffusion single-file checkpoint"
                             + (f"; it holds e.g. {', '.join(sorted(g['unknown'])[:3])}" if g["unknown"] else ""))
    if bool(g["clip"]) == bool(g["openclip"]):
        raise ValueError(f"{where}: expected one text encoder, {LDM_CLIP}* (SD 1.x) or {LDM_OPENCLIP}* (SD 2.x); "
                         f"found {'both' if g['clip'] else 'neither'}")

    # SD 1.x or 2.x, then the architectures (what the weights do not say comes from the family)
    unet = g["unet"]
    context = next((t.shape[1] for k, t in sorted(unet.items()) if k.endswith("attn2.to_k.weight")), None)
    linear = next((t.ndim == 2 for k, t in sorted(unet.items()) if k.endswith(".proj_in.weight")), False)
    text_kind = "openclip" if g["openclip"] else "clip"
    family = _family({"text": text_kind, "linear": linear, "context": context}, requested, where)
    fam = FAMILIES[family]
    notes += [f"source: {path.name}, original (ldm) single-file layout, {len(tensors)} tensors {_dtype_counts(tensors)}",
              f"family: {fam['name']} ({'detected' if requested is None else 'as requested, consistent'}: "
              f"{'OpenCLIP' if g['openclip'] else 'OpenAI CLIP'} text encoder, {'linear' if linear else '1x1-conv'} "
              f"proj_in, context {context})"]
    unet_cfg = unet_config_from_ldm(unet, fam["heads_per_channel"])
    vae_cfg = vae_config_from_ldm(g["vae"])
    text, text_names = _ldm_text_encoder(g, fam, notes)
    text_cfg = clip_text_config_from_weights(text, fam["hidden_act"])
    unet, unet_names, used_ema = _ldm_ema(unet, g["ema"], ema, where, notes)

    scheduler = dict(SD_SCHEDULER)
    if g["buffers"]:
        notes.append(check_schedule(g["buffers"], scheduler, where))
    else:
        notes.append("schedule: no schedule buffers in the file; assuming SD's scaled_linear (0.00085..0.012, 1000 steps)")
    for reason, keys in g["skipped"].items():
        notes.append(f"skipped {len(keys)} {reason} tensor(s): {', '.join(keys[:3])}")
    pred = _prediction(prediction, None, family, notes)
    if family == "sd2" and pred == "v_prediction":  # the 768-px models: 96x96 latents by default
        unet_cfg, vae_cfg = replace(unet_cfg, sample_size=96), replace(vae_cfg, sample_size=768)

    unknown = sorted(g["unknown"])
    unknown_problem = ([f"{len(unknown)} tensors belong to no part of an SD checkpoint (UNet {LDM_UNET}, VAE "
                        f"{LDM_VAE}, text encoder cond_stage_model.): {', '.join(unknown[:8])}"] if unknown else [])
    L, n = unet_cfg.layers_per_block, len(vae_cfg.block_out_channels)
    sources = {
        "unet": _renamed(unet, lambda k: ldm_unet_key(k, L), unet_names),
        "vae": _vae_source(*_renamed(g["vae"], lambda k: ldm_vae_key(k, n), {k: LDM_VAE + k for k in g["vae"]})),
        "text_encoder": (text, text_names),
    }
    params = _convert_models(sources, _templates(unet_cfg, vae_cfg, text_cfg), dtype, where, unknown_problem)
    config = StableDiffusionConfig(
        family, unet_cfg, vae_cfg, text_cfg, pred, scheduler, fam["pad_token_id"], ema=used_ema,
        source={"path": str(path), "layout": "ldm", "format": path.suffix.lstrip("."), "dtypes": _dtype_counts(tensors),
                **({"global_step": extra["global_step"]} if "global_step" in extra else {})})
    return params, config


def _read_sgm_file(path: Path, g: dict, extra: dict, requested, prediction, dtype, ema, notes):
    """SDXL in Stability's single-file (SGM) layout: the UNet and VAE as in ldm files (the added embedding
    as label_emb.0.0 / .0.2), CLIP-L under conditioner.embedders.0.transformer. (transformers' names),
    bigG under conditioner.embedders.1.model. (open_clip's names, fused in_proj, text_projection)."""
    where = str(path)
    for group, prefix, what in (("unet", LDM_UNET, "UNet"), ("vae", LDM_VAE, "VAE"),
                                ("clip_xl", SGM_CLIP, "CLIP-L text encoder"), ("openclip_xl", SGM_OPENCLIP, "bigG text encoder")):
        if not g[group]:
            raise ValueError(f"{where}: an SDXL single file (conditioner.embedders.*) without {what} tensors ({prefix}*)")
    if requested not in (None, "sdxl"):
        raise ValueError(f"{where}: --config {requested} does not fit these weights: the text encoders are "
                         f"{FAMILIES['sdxl']['text_desc']}: an SDXL checkpoint")
    unet_cfg = replace(unet_config_from_ldm(g["unet"], 64), sample_size=128)
    vae_cfg = replace(vae_config_from_ldm(g["vae"]), sample_size=1024, scaling_factor=0.13025)
    skipped = g["skipped"]
    for k in g["clip_xl"]:
        if k.removeprefix("text_model.") == "embeddings.position_ids":
            skipped.setdefault("text position_ids buffer", []).append(SGM_CLIP + k)
    text = clip_text_state_dict(g["clip_xl"])
    text_names = {k.removeprefix("text_model."): SGM_CLIP + k for k in g["clip_xl"]}
    text_cfg = clip_text_config_from_weights(text, "quick_gelu", SGM_CLIP)
    blocks = _Shapes(g["openclip_xl"], SGM_OPENCLIP, "bigG text encoder").indices(r"transformer\.resblocks\.(\d+)\.")
    if "text_projection" not in g["openclip_xl"]:
        raise ValueError(f"{where}: {SGM_OPENCLIP}text_projection is missing (SDXL's pooled text goes through it)")
    text_2, origin_2, left_out = openclip_text_state_dict(g["openclip_xl"], keep_layers=len(blocks), projection=True)
    for k in left_out:
        skipped.setdefault("OpenCLIP's logit_scale (unused by SD)", []).append(SGM_OPENCLIP + k)
    text_cfg_2 = replace(clip_text_config_from_weights(text_2, "gelu", SGM_OPENCLIP),
                         projection_dim=int(g["openclip_xl"]["text_projection"].shape[1]))
    _check_sdxl(unet_cfg, text_cfg, text_cfg_2, where)
    unet, unet_names, used_ema = _ldm_ema(g["unet"], g["ema"], ema, where, notes)
    notes[:0] = [f"source: {path.name}, Stability's SDXL single-file (SGM) layout, {len(g['unet']) + len(g['vae'])}"
                 f" UNet + VAE tensors",
                 f"family: SDXL (detected: CLIP-L {text_cfg.hidden_size} + bigG {text_cfg_2.hidden_size} text encoders, "
                 f"{len(blocks)} bigG blocks, context {unet_cfg.cross_attention_dim}, transformer depths "
                 f"{unet_cfg.transformer_depths})"]
    scheduler = dict(SD_SCHEDULER)
    if g["buffers"]:
        notes.append(check_schedule(g["buffers"], scheduler, where))
    else:
        notes.append("schedule: no schedule buffers in the file; SDXL's scaled_linear (0.00085..0.012, 1000 steps)")
    for reason, keys in skipped.items():
        notes.append(f"skipped {len(keys)} {reason} tensor(s): {', '.join(keys[:3])}")
    pred = _prediction(prediction, None, "sdxl", notes)
    notes.append("sampler: euler (SDXL base 1.0's EulerDiscreteScheduler)")
    unknown = sorted(g["unknown"])
    unknown_problem = ([f"{len(unknown)} tensors belong to no part of an SDXL checkpoint: {', '.join(unknown[:8])}"]
                       if unknown else [])
    L, n = unet_cfg.layers_per_block, len(vae_cfg.block_out_channels)
    sources = {
        "unet": _renamed(unet, lambda k: ldm_unet_key(k, L), unet_names),
        "vae": _vae_source(*_renamed(g["vae"], lambda k: ldm_vae_key(k, n), {k: LDM_VAE + k for k in g["vae"]})),
        "text_encoder": (text, text_names),
        "text_encoder_2": (text_2, {k: SGM_OPENCLIP + v for k, v in origin_2.items()}),
    }
    params = _convert_models(sources, _templates(unet_cfg, vae_cfg, text_cfg, text_cfg_2), dtype, where, unknown_problem)
    config = StableDiffusionConfig(
        "sdxl", unet_cfg, vae_cfg, text_cfg, pred, scheduler, FAMILIES["sdxl"]["pad_token_id"], ema=used_ema,
        source={"path": str(path), "layout": "sgm", "format": path.suffix.lstrip("."),
                "dtypes": _dtype_counts(*(g[k] for k in ("unet", "vae", "clip_xl", "openclip_xl")))},
        sampler="euler", **_sdxl_settings(text_cfg_2, 0, path))
    return params, config


def _renamed(state_dict: Mapping, rename, names: Mapping) -> tuple[dict, dict]:
    """(state dict under new names, {new name: name in the file}); two tensors for one name is an error."""
    out, origin = {}, {}
    for key, w in state_dict.items():
        new = rename(key)
        if new in out:
            raise ValueError(f"{origin[new]} and {names[key]} are the same parameter ({new})")
        out[new], origin[new] = w, names[key]
    return out, origin


def _vae_source(state_dict: dict, names: dict) -> tuple[dict, dict]:
    """A VAE state dict in today's diffusers names (old attention names renamed), with message names."""
    renamed = {}
    for key, w in state_dict.items():
        new = vae_key_map(key)
        if new in renamed:
            raise ValueError(f"the VAE holds {names.get(key, key)} twice (old and new attention names)")
        renamed[new] = w
        names[new] = names.get(key, key)
    return renamed, names


def _read_diffusers_folder(folder: Path, requested, prediction, dtype, notes) -> tuple[dict, StableDiffusionConfig]:
    if (folder / "text_encoder_2").is_dir() and not (folder / "text_encoder").is_dir():
        raise ValueError(f"{folder}: {REFINER_MESSAGE} (text_encoder_2/ without text_encoder/)")
    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part).is_dir():
            raise ValueError(f"{folder} is a folder but not a diffusers Stable Diffusion folder: {part}/ is missing "
                             "(expected unet/, vae/, text_encoder/ with config.json and weights)")
    unet_cfg = unet_config_from_diffusers(read_json(folder / "unet" / "config.json"), f"{folder}/unet/config.json")
    vae_cfg = vae_config_from_diffusers(read_json(folder / "vae" / "config.json"), f"{folder}/vae/config.json")
    text_cfg = clip_text_config_from_transformers(read_json(folder / "text_encoder" / "config.json"),
                                                  f"{folder}/text_encoder/config.json")
    text_cfg_2 = None
    if (folder / "text_encoder_2").is_dir():  # SDXL
        text_cfg_2 = clip_text_config_from_transformers(read_json(folder / "text_encoder_2" / "config.json"),
                                                        f"{folder}/text_encoder_2/config.json")
        _check_sdxl(unet_cfg, text_cfg, text_cfg_2, str(folder))
    elif unet_cfg.addition_embed_type is not None:
        raise ValueError(f"{folder}: the UNet has SDXL's added embedding (addition_embed_type="
                         f"{unet_cfg.addition_embed_type!r}) but there is no text_encoder_2/")
    evidence = {"text": "clip+openclip" if text_cfg_2 else "openclip" if text_cfg.hidden_act == "gelu" else "clip",
                "linear": unet_cfg.use_linear_projection, "context": unet_cfg.cross_attention_dim}
    family = _family(evidence, requested, str(folder))
    fam = FAMILIES[family]

    state_dicts, files = {}, []
    for part, stem in _WEIGHT_FILES.items():
        if part == "text_encoder_2" and text_cfg_2 is None:
            continue
        sd = {}
        for f in _find_weights(folder / part, stem):
            sd.update(read_tensors(f)[0])
            files.append(f"{part}/{f.name}")
        state_dicts[part] = sd
    notes.append(f"source: diffusers folder {folder.name}/ ({', '.join(files)}), "
                 f"{sum(map(len, state_dicts.values()))} tensors {_dtype_counts(*state_dicts.values())}")
    notes.append(f"family: {fam['name']} ({'detected' if requested is None else 'as requested, consistent'}: "
                 f"{text_cfg.hidden_act} text encoder{' + bigG' if text_cfg_2 else ''}, {'linear' if unet_cfg.use_linear_projection else '1x1-conv'} "
                 f"proj_in, context {unet_cfg.cross_attention_dim})")
    notes.append("EMA: a diffusers folder holds one UNet (no EMA copy to choose)")

    scheduler, sched_pred, sampler = dict(SD_SCHEDULER), None, "DPM++ 2M Karras"
    if (folder / "scheduler" / "scheduler_config.json").is_file():
        scheduler, sched_pred, sampler = _scheduler_from_diffusers(folder / "scheduler" / "scheduler_config.json",
                                                                   notes)
    else:
        notes.append("schedule: no scheduler/scheduler_config.json; assuming SD's scaled_linear schedule")
    pred = _prediction(prediction, sched_pred, family, notes)
    pad = _folder_pad_token(folder / "tokenizer", fam["pad_token_id"], fam["name"], notes)

    text = clip_text_state_dict(state_dicts["text_encoder"])
    sources = {"unet": (state_dicts["unet"], {}), "vae": _vae_source(state_dicts["vae"], {}), "text_encoder": (text, {})}
    sdxl = {}
    if text_cfg_2 is not None:
        sources["text_encoder_2"] = (clip_text_state_dict(state_dicts["text_encoder_2"]), {})
        pad_2 = _folder_pad_token(folder / "tokenizer_2", 0, "bigG", notes)
        sdxl = _sdxl_settings(text_cfg_2, pad_2, folder)
    params = _convert_models(sources, _templates(unet_cfg, vae_cfg, text_cfg, text_cfg_2), dtype, str(folder))
    config = StableDiffusionConfig(family, unet_cfg, vae_cfg, text_cfg, pred, scheduler, pad, ema=None,
                                   source={"path": str(folder), "layout": "diffusers", "files": files,
                                           "dtypes": _dtype_counts(*state_dicts.values())}, sampler=sampler, **sdxl)
    return params, config


def _folder_pad_token(folder: Path, default: int, name: str, notes: list) -> int:
    pad = _pad_token_id(folder)
    if pad is None:
        notes.append(f"tokenizer: no pad token found in {folder.name}/; {name}'s is id {default}")
        return default
    notes.append(f"tokenizer: pad token id {pad} ({folder.name}/)")
    return pad


def _check_sdxl(unet_cfg, text_cfg, text_cfg_2, where: str):
    """The SDXL pieces fit together: context = both encoders' widths, pooled text = bigG's projection."""
    if unet_cfg.addition_embed_type != "text_time":
        raise ValueError(f"{where}: two text encoders but the UNet lacks SDXL's 'text_time' added embedding")
    if text_cfg_2.projection_dim is None:
        raise ValueError(f"{where}: the second text encoder has no text_projection (SDXL's bigG is a "
                         "CLIPTextModelWithProjection)")
    if unet_cfg.cross_attention_dim != text_cfg.hidden_size + text_cfg_2.hidden_size:
        raise ValueError(f"{where}: the UNet's context width {unet_cfg.cross_attention_dim} is not the text encoders' "
                         f"{text_cfg.hidden_size} + {text_cfg_2.hidden_size}")
    if unet_cfg.pooled_text_dim != text_cfg_2.projection_dim:
        raise ValueError(f"{where}: the UNet's added embedding takes {unet_cfg.pooled_text_dim} pooled features "
                         f"+ 6 x {unet_cfg.addition_time_embed_dim}; the second text encoder projects to "
                         f"{text_cfg_2.projection_dim} (a refiner? {REFINER_MESSAGE})")


def _sdxl_settings(text_cfg_2, pad_2: int, where) -> dict:
    """StableDiffusionConfig fields of an SDXL model: the second encoder, its pad id, SDXL's defaults
    (guidance 5; a missing negative prompt gives zero embeddings, as in diffusers' SDXL base)."""
    return dict(text_encoder_2=text_cfg_2, pad_token_id_2=pad_2, force_zeros_for_empty_prompt=True,
                guidance_scale=5.0, steps=30)


def _pad_token_id(folder: Path) -> int | None:
    """The pad token's id in a tokenizer folder: its name from special_tokens_map.json /
    tokenizer_config.json, its id from vocab.json (hub folders) or tokenizer.json (transformers 5)."""
    from .tokenizer import _configured_pad_token

    pad = _configured_pad_token(folder) if folder.is_dir() else None
    if pad is None:
        return None
    if (folder / "vocab.json").is_file():
        vocab = read_json(folder / "vocab.json")
    elif (folder / "tokenizer.json").is_file():
        fast = read_json(folder / "tokenizer.json")
        vocab = dict(fast.get("model", {}).get("vocab", {}))
        vocab.update({t["content"]: t["id"] for t in fast.get("added_tokens", []) if isinstance(t, dict)})
    else:
        return None
    if pad not in vocab:
        raise ValueError(f"{folder}: the pad token {pad!r} is not in the vocabulary")
    return int(vocab[pad])


def read_checkpoint(src, *, config: str | None = None, prediction: str | None = None, dtype: str = "float32",
                    ema: bool | None = None) -> tuple[dict, StableDiffusionConfig]:
    """Read a Stable Diffusion 1.x / 2.x checkpoint into Flax parameters, in memory.

    ``src``: a diffusers folder (``unet/ vae/ text_encoder/``, ``.safetensors`` or legacy ``.bin``,
    plus ``scheduler/`` and ``tokenizer/``), or a single file in the original ldm layout
    (``.safetensors``, or ``.ckpt`` read with ``torch.load(weights_only=True)`` only).
    ``config``: "sd1" / "sd2" / None (detect; an explicit one that contradicts the weights is an error).
    ``prediction``: what the UNet predicts (epsilon / v_prediction); default: the folder's scheduler
    config, else epsilon for SD 1.x and v_prediction for SD 2.x (with a note).  ``dtype``: of the
    returned parameters (float32, float16, bfloat16), whatever the file holds.  ``ema``: None uses a
    single file's EMA copy of the UNet when there is one, False the raw weights, True requires it.

    Returns ({"unet": ..., "vae": ..., "text_encoder": ...}, StableDiffusionConfig); the config's
    ``notes`` say what was found, used and skipped.  Every tensor of the file must be used or
    recognised and skipped by name, and every parameter filled: else one ``ValueError`` listing the
    missing, unexpected and mis-shaped tensors of all three models."""
    src = Path(src)
    out_dtype = output_dtype(dtype)
    notes: list[str] = []
    if not src.exists():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    if src.is_dir():
        if ema is True:
            raise ValueError(f"{src}: a diffusers folder holds no EMA copy (ema=True)")
        params, cfg = _read_diffusers_folder(src, config, prediction, out_dtype, notes)
    else:
        params, cfg = _read_single_file(src, config, prediction, out_dtype, ema, notes)
    cfg.dtype, cfg.notes = dtype, notes
    return params, cfg


# --- the converted file: one .safetensors of the flattened Flax tree, plus a JSON config -----------

FORMAT = "minidiff-sd-v1"


def is_converted(path) -> bool:
    """Whether ``path`` is a converted model: a .safetensors file marked so in its metadata, or the
    .json config next to one."""
    path = Path(path)
    if path.suffix == ".json":
        return True
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        return (open_safetensors(path).metadata() or {}).get("format") == FORMAT
    except Exception:  # not readable as safetensors: let the checkpoint reader say why
        return False


def config_path(weights_path) -> Path:
    """The JSON config that lives next to a converted weights file: model.safetensors -> model.json."""
    return Path(weights_path).with_suffix(".json")


def save_converted(params: Mapping, config: StableDiffusionConfig, dst, overwrite: bool = True) -> tuple[Path, Path]:
    """Write ``params`` as one .safetensors file of the flattened tree (``unet/down_blocks_0/
    resnets_0/conv1/kernel``...) with the config JSON in its metadata (the authority), and a copy of
    the config next to it (``.json``, for reading).  Both are finished under temporary names first,
    then renamed, weights first: a kill at any point leaves the old pair, or new weights that carry
    their own config."""
    dst, sidecar = Path(dst), config_path(dst)
    flat = flatten_dict(dict(params), sep="/")
    text = json.dumps(config.to_dict(), indent=1)
    if sidecar.exists() and not overwrite and not dst.exists():
        raise ValueError(f"{sidecar} exists and was not written with {dst.name}; pass --overwrite to replace it")
    temps = []
    try:
        temps.append(atomic_write(sidecar, (text + "\n").encode(), replace=False))
        # written straight from each array, 64-byte aligned (mapped back, they reach a CPU device uncopied)
        temps.append(atomic_write(dst, lambda tmp: write_safetensors(tmp, flat, {"format": FORMAT, "config": text}),
                                  replace=False))
        for path in (dst, sidecar):  # the weights (with the config inside) first
            commit(temps[-1], path)
            temps.pop()
    finally:
        for tmp in temps:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
    return dst, sidecar


@dataclass
class ConversionReport:
    weights: Path
    config_file: Path
    config: StableDiffusionConfig
    num_tensors: int
    num_bytes: int
    seconds: float

    def __str__(self) -> str:
        lines = [f"wrote {self.weights} ({self.num_tensors} tensors, {self.num_bytes / 2**20:,.1f} MiB "
                 f"{self.config.dtype}) and {self.config_file} in {self.seconds:.1f} s"]
        return "\n".join(lines + [f"  {note}" for note in self.config.notes])


def convert(src, dst, *, config: str | None = None, prediction: str | None = None, dtype: str = "float32",
            ema: bool | None = None, overwrite: bool = False) -> ConversionReport:
    """Convert a Stable Diffusion checkpoint (see :func:`read_checkpoint`) into ``dst`` (a
    ``.safetensors`` path) plus ``dst`` with ``.json``: load it back with :func:`load_converted`."""
    import time

    start = time.perf_counter()
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"the output must be a .safetensors path, got {dst}")
    if dst.exists() and not overwrite:
        raise ValueError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    if config_path(dst).exists() and not dst.exists() and not overwrite:
        raise ValueError(f"{config_path(dst)} exists and was not written with {dst.name} (pass overwrite=True / "
                         "--overwrite to replace it)")
    if dst.exists() and Path(src).exists() and dst.resolve() == Path(src).resolve():
        raise ValueError(f"the output {dst} is the checkpoint being converted")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"output folder not found: {dst.parent}")
    check_writable(dst.parent, f"the output {dst}")
    for stale in remove_stale_temps(dst) + remove_stale_temps(config_path(dst)):
        print(f"removed {stale}, left by a conversion that was killed")
    params, cfg = read_checkpoint(src, config=config, prediction=prediction, dtype=dtype, ema=ema)
    weights, config_file = save_converted(params, cfg, dst, overwrite)
    leaves = flatten_dict(params, sep="/").values()
    return ConversionReport(weights, config_file, cfg, len(leaves), sum(a.nbytes for a in leaves),
                            time.perf_counter() - start)


def load_converted(path, mmap: bool = True) -> tuple[dict, StableDiffusionConfig]:
    """Load what :func:`convert` wrote: ({"unet": ..., "vae": ..., "text_encoder": ...} NumPy trees,
    StableDiffusionConfig).  ``path``: the .safetensors file (or its .json).

    ``mmap=True``: the arrays are read-only views of the memory-mapped file: nothing is copied, a
    page is read when first used (from the OS page cache when the file is warm), and the memory is
    the page cache's, shared and reclaimable, which is what a later ``jax.device_put`` copies from.
    ``mmap=False``: safetensors reads every tensor into its own writable array (one copy, no map).
    The config is the one in the file's metadata; the ``.json`` next to it is a copy for reading (a
    warning says when it differs, e.g. after a conversion killed between its two renames)."""
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"converted weights not found: {path}")
    try:
        f = open_safetensors(path)  # checks the header, and that the file holds all the data it announces
        meta = f.metadata() or {}
        flat = memmap_safetensors(path) if mmap else {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path} is not a readable .safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a minidiff converted model (metadata format {meta.get('format')!r}); "
                         "convert a checkpoint first: weights_convert.py SRC DST")
    try:
        stored = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} lacks a readable config in its metadata ({e}); convert the checkpoint again") from None
    config = config_from_dict(StableDiffusionConfig, stored, f"converted-model ({path.name})")
    sidecar = config_path(path)
    try:
        copy_differs = sidecar.is_file() and read_json(sidecar) != stored
    except ValueError:
        copy_differs = True
    if copy_differs:
        warnings.warn(f"{sidecar} differs from the config stored in {path.name}, which is the one used (the .json is "
                      "only a copy for reading; a conversion killed mid-way leaves this: convert again to renew it)",
                      stacklevel=2)
    params = unflatten_dict(flat, sep="/")
    if set(params) != set(config.parts):
        raise ValueError(f"{path} holds {sorted(params)}, expected {', '.join(config.parts)}")
    return params, config
