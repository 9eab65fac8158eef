"""Stable Diffusion: prompt -> image, with the whole denoising loop compiled once.

    prompts, negatives ("") -tokenizer-> (P, 77) -CLIP-> context, uncontext (n, 77, D)   n = P prompts x m
    seed -> x_T (n, H/8, W/8, 4); N times ONE jit-compiled step (a row of the sampler's tables):
        eps = eps_u + s (eps_c - eps_u)  (one doubled UNet batch);   x, state = sampler step(x, eps, row, ...)
    images = VAE.images_from_latents(x_0) -> uint8 (n, H, W, 3)

Built on :func:`minidiff.sampling.guided_output`, :func:`~minidiff.sampling.reverse_step` and
:func:`~minidiff.sampling.solver_step`, with ``k_T, z_keys = noise_keys(jax.random.key(seed), N)``.
The step's row, key, embeddings and guidance scale are arguments of the compiled step; only a new
shape or static choice (sampler, eta, dtype, devices) compiles again (``pipe.traces``).  The host
loop drives the progress bar and stops at the first non-finite step; the step program has no host
callback, so JAX's persistent cache (:mod:`minidiff.compile_cache`) keeps it across runs.  img2img (SDEdit): the init latents are noised with
q(x_t | x_0) and the last k = round(strength * N) steps run.  The batch is sharded over the largest
number of devices dividing n; ``dtype="bfloat16"`` runs the networks in bfloat16, the sampler in float32.

SDXL (a config with ``text_encoder_2``): two tokenizations (CLIP-L pads with the end token, bigG with
"!"), context = [CLIP-L hidden_states[-2], bigG hidden_states[-2]] (n, 77, 2048), pooled text = bigG's
projected end-token state (n, 1280), and the micro-conditioning time_ids = (original_size,
crops_coords_top_left, target_size) go into the UNet's added embedding.  A missing negative prompt
gives zero embeddings (diffusers' ``force_zeros_for_empty_prompt`` of SDXL base).  SDXL's VAE
overflows in float16; minidiff computes it in float32 whatever ``dtype`` the rest runs in.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import config_from_dict
from .convert import is_converted, load_converted, read_checkpoint
from .diffusion import q_sample
from .diffusion.solvers import SOLVERS, resolve
from .embeddings import load_embedding
from .images import to_uint8
from .nn.autoencoder import AutoencoderKL, AutoencoderKLConfig
from .nn.clip import CLIPTextConfig, CLIPTextModel, add_token_rows
from .nn.unet import UNet2DCondition, UNetConfig
from .sampling import guided_output, noise_keys, reverse_step, solver_step
from .sdconfig import SchedulerConfig, StableDiffusionConfig
from .tokenizer import CONTEXT_LENGTH, CLIPTokenizer

SAMPLERS = ("ddim", "ddpm", *SOLVERS)  # and the names users know: solvers.resolve
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                      "negative_crops_coords_top_left", "negative_target_size")  # SDXL's (Podell et al. 2023, 2.2)

# The built-in mini model: weights + config side by side.
MINI_MODEL = Path(__file__).parent / "assets" / "mini_sd.safetensors"


def default_dtype() -> str:
    """The networks' compute dtype when none is asked: bfloat16 on GPU / TPU (their matrix units'
    type, half the memory), float32 on CPU (where bfloat16 is emulated, slower)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def dtype_name(dtype) -> str:
    """'float32' / 'bfloat16' from a name, a NumPy / JAX dtype or a scalar type; None: :func:`default_dtype`."""
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, str):
        name = {"fp32": "float32", "bf16": "bfloat16", "f32": "float32"}.get(dtype, dtype)
    else:
        try:
            name = jnp.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose float32 or bfloat16")
    return name


# --- the compiled parts ---------------------------------------------------------------------------
#
# Module-level functions with the (frozen, hashable) configs as static arguments: jax.jit caches one
# program per (config, dtype, shapes), shared by every pipeline with that architecture; the
# parameters, embeddings, latents, guidance scale and step tables are traced arguments.

MAX_SEED = 2**32 - 1  # jax.random.key keeps 32 bits of a seed (x64 off): larger ones would repeat pictures
TRACES: Counter = Counter()  # incremented only while JAX traces (i.e. compiles) a function


def _encode_text(params, ids, *, config: CLIPTextConfig, clip_skip: int, dtype: str):
    TRACES["text"] += 1
    out = CLIPTextModel(config, DTYPES[dtype]).apply({"params": params}, ids, clip_skip=clip_skip)
    return out.last_hidden_state.astype(jnp.float32)


def _encode_text_xl(params, params_2, ids, ids_2, *, config: CLIPTextConfig, config_2: CLIPTextConfig,
                    clip_skip: int, dtype: str):
    """SDXL: context = [CLIP-L hidden_states[-2 - clip_skip], bigG hidden_states[-2 - clip_skip]] (n, 77,
    D1 + D2), pooled = text_projection(bigG's final-LayerNorm state at the end token) (n, P)."""
    TRACES["text"] += 1
    out = CLIPTextModel(config, DTYPES[dtype]).apply({"params": params}, ids, output_hidden_states=True)
    out_2 = CLIPTextModel(config_2, DTYPES[dtype]).apply({"params": params_2}, ids_2, output_hidden_states=True)
    context = jnp.concatenate([out.hidden_states[-2 - clip_skip], out_2.hidden_states[-2 - clip_skip]], axis=-1)
    return context.astype(jnp.float32), out_2.text_embeds.astype(jnp.float32)


def sdxl_time_ids(height: int, width: int, original_size=None, crops_coords_top_left=(0, 0),
                  target_size=None) -> np.ndarray:
    """SDXL's micro-conditioning, (6,) float32: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).
    original_size and target_size are (height, width), default the image's; crops_coords_top_left is
    (top, left), default (0, 0) (an uncropped picture)."""
    values = []
    for what, v in (("original_size", original_size or (height, width)),
                    ("crops_coords_top_left", crops_coords_top_left), ("target_size", target_size or (height, width))):
        if len(tuple(v)) != 2 or not all(_finite(a) and float(a) >= 0 for a in v):
            raise ValueError(f"{what} must be two numbers >= 0 (height, width or top, left), got {v!r}")
        values += [float(a) for a in v]
    return np.asarray(values, np.float32)


def _encode_image(params, images, *, config: AutoencoderKLConfig, dtype: str):
    TRACES["image"] += 1
    vae = AutoencoderKL(config, DTYPES[dtype])
    return vae.apply({"params": params}, images, method=AutoencoderKL.latents_from_images)  # the posterior mean


def _decode(params, latents, *, config: AutoencoderKLConfig, dtype: str):
    TRACES["decode"] += 1
    vae = AutoencoderKL(config, DTYPES[dtype])
    return vae.apply({"params": params}, latents, method=AutoencoderKL.images_from_latents)


def _denoise(params, x, state, row, key, context, uncontext, guidance_scale, *, config: UNetConfig,
             prediction_type: str, sampler: str, eta: float, dtype: str, batch_sharding):
    """One row of the sampler's tables, guided: (x_t, state) -> (x_{t-1}, state, whether x is finite)."""
    TRACES["denoise"] += 1
    unet = UNet2DCondition(config, DTYPES[dtype])

    def model_fn(p, x, t, ctx):  # float32 in and out; the UNet computes in its dtype
        if isinstance(ctx, Mapping):  # SDXL: {"context", "added_cond": {"text_embeds", "time_ids"}}
            return unet.apply({"params": p}, x, t, ctx["context"], added_cond=ctx["added_cond"])
        return unet.apply({"params": p}, x, t, ctx)

    if batch_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, batch_sharding)
    predict = lambda x, t: guided_output(model_fn, params, x, t, context, uncontext, guidance_scale)  # noqa: E731
    if sampler in ("ddim", "ddpm"):
        step = (row["t"], row["alpha_bar"], row["alpha_bar_prev"], key)
        x = reverse_step(predict, x, step, sampler, eta, prediction_type)
    else:
        x, state = solver_step(predict, x, state, row, key, SOLVERS[sampler], prediction_type)
    return x, state, jnp.all(jnp.isfinite(x))


_text_fn = jax.jit(_encode_text, static_argnames=("config", "clip_skip", "dtype"))
_text_xl_fn = jax.jit(_encode_text_xl, static_argnames=("config", "config_2", "clip_skip", "dtype"))
# the one VAE encode / decode pair: images in [-1, 1] <-> latents (posterior mean * scaling_factor)
vae_encode = jax.jit(_encode_image, static_argnames=("config", "dtype"))
vae_decode = jax.jit(_decode, static_argnames=("config", "dtype"))
_denoise_fn = jax.jit(_denoise, static_argnames=("config", "prediction_type", "sampler", "eta", "dtype",
                                                 "batch_sharding"))


class StableDiffusion:
    """Text-to-image (and image-to-image) with a UNet, a VAE and a CLIP text encoder (SDXL: two).

    ``params``: {"unet": ..., "vae": ..., "text_encoder": ...} Flax parameter trees (float32), plus
    "text_encoder_2" for SDXL (``text_config_2``: bigG with its projection; ``pad_token_2``: its
    tokenizer's pad id; ``force_zeros_for_empty_prompt``: no negative prompt = zero embeddings).

        pipe = StableDiffusion(UNetConfig.sd15(), AutoencoderKLConfig.sd(), CLIPTextConfig.sd15(), params)
        images = pipe(["a lighthouse at dusk"], steps=30, guidance_scale=7.5, seed=0)  # uint8 (1, 512, 512, 3)

    or ``load_pipeline(path)`` for a converted minidiff file, a diffusers folder or a single-file checkpoint.
    """

    def __init__(self, unet_config: UNetConfig, vae_config: AutoencoderKLConfig, text_config: CLIPTextConfig,
                 params: Mapping[str, Any], tokenizer: CLIPTokenizer | None = None,
                 scheduler: SchedulerConfig | None = None, clip_skip: int = 0, pad_token: int | None = None,
                 name: str = "", devices: Sequence | None = None, guidance_scale: float = 7.5,
                 vocabulary: Sequence[str] = (), default_sampler: str = "DPM++ 2M Karras", default_steps: int = 25,
                 text_config_2: CLIPTextConfig | None = None, pad_token_2: int = 0,
                 force_zeros_for_empty_prompt: bool = False):
        self.parts = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if text_config_2 is not None else ())
        missing = sorted(set(self.parts) - set(params))
        if missing:
            raise ValueError(f"params must hold {', '.join(map(repr, self.parts))} trees; missing {missing}")
        width = text_config.hidden_size + (text_config_2.hidden_size if text_config_2 is not None else 0)
        if unet_config.cross_attention_dim != width:
            raise ValueError(f"the UNet's cross_attention_dim ({unet_config.cross_attention_dim}) must equal the "
                             f"text encoder's hidden_size ({width}{' = both encoders' if text_config_2 else ''})")
        if (text_config_2 is not None) != (unet_config.addition_embed_type == "text_time") or (
                text_config_2 is not None and text_config_2.projection_dim != unet_config.pooled_text_dim):
            raise ValueError("SDXL needs both a second text encoder with a projection (text_config_2) and a UNet "
                             "with the 'text_time' added embedding taking its pooled width; got "
                             f"{None if text_config_2 is None else text_config_2.projection_dim} and "
                             f"{unet_config.addition_embed_type} ({unet_config.pooled_text_dim})")
        if unet_config.in_channels != vae_config.latent_channels or unet_config.out_channels != vae_config.latent_channels:
            raise ValueError(f"the UNet works on {unet_config.in_channels} -> {unet_config.out_channels} channels but "
                             f"the VAE's latents have {vae_config.latent_channels}")
        self.unet_config, self.vae_config, self.text_config = unet_config, vae_config, text_config
        self.text_config_2, self.pad_token_2 = text_config_2, pad_token_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        # our own dicts (the arrays are shared): placing replaces their leaves, never the caller's
        self.params = {k: _own_dicts(params[k]) for k in self.parts}
        self.tokenizer = tokenizer or CLIPTokenizer.from_bpe_gz()
        self.scheduler = scheduler or SchedulerConfig()
        self.clip_skip, self.pad_token, self.name = clip_skip, pad_token, name
        self.guidance_scale = guidance_scale  # the default s when a call gives none
        self.default_sampler, self.default_steps = default_sampler, default_steps  # the command line's defaults
        self.vocabulary = frozenset(vocabulary)  # the words a small model was trained on (empty: any)
        self.devices = list(devices) if devices is not None else None  # None: all of jax.devices()
        self._placed = {}
        self._loras, self._lora_base = [], {}  # [(LoRA, scale)], the original leaves of the fused weights
        self.last_timesteps = None  # the timesteps the last call ran (img2img: the last k of the N)

    traces = TRACES  # how often each compiled part was traced, all pipelines together (tests count recompiles)

    @classmethod
    def from_config(cls, params, config: StableDiffusionConfig | Mapping, **kwargs) -> "StableDiffusion":
        """From what ``minidiff.convert.load_converted`` / ``read_checkpoint`` return: the params and a
        ``StableDiffusionConfig`` (or a dict of its fields).  Keyword arguments go to the constructor."""
        config = config_from_dict(StableDiffusionConfig, config, "model")
        kwargs.setdefault("pad_token", config.pad_token_id)
        kwargs.setdefault("guidance_scale", config.guidance_scale)
        kwargs.setdefault("vocabulary", config.vocabulary)
        kwargs.setdefault("default_sampler", config.sampler)
        kwargs.setdefault("default_steps", config.steps)
        if config.text_encoder_2 is not None:
            kwargs.setdefault("text_config_2", config.text_encoder_2)
            kwargs.setdefault("pad_token_2", config.pad_token_id_2)
            kwargs.setdefault("force_zeros_for_empty_prompt", config.force_zeros_for_empty_prompt)
        return cls(config.unet, config.vae, config.text_encoder, params, scheduler=config.scheduler_config(), **kwargs)

    @property
    def is_sdxl(self) -> bool:
        return self.text_config_2 is not None

    def vae_dtype(self, dtype: str) -> str:
        """What the VAE computes in: float32 for SDXL (its VAE overflows in half precision), else ``dtype``."""
        return "float32" if self.is_sdxl else dtype

    # --- sizes ------------------------------------------------------------------------------------

    @property
    def vae_factor(self) -> int:
        return self.vae_config.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE's factor times the UNet's (64 for SD)."""
        return self.vae_factor * 2 ** (len(self.unet_config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """The VAE's native image size (512 for SD)."""
        return self.vae_config.sample_size

    def memory_estimate(self, n: int, height: int, width: int, dtype=None) -> int:
        """Bytes one device needs at the peak of a call for n images of height x width: the weights
        in the compute dtype, a runtime allowance, and per image the larger of the UNet's activations
        (guidance runs two rows) and the VAE decoder's.  Calibrated on the built-in model on CPU
        (measured 2.8 MB per image there, estimated 3.3); an estimate, used to refuse hopeless requests."""
        size = np.dtype(DTYPES[dtype_name(dtype)]).itemsize
        weights = sum(np.size(a) for a in jax.tree.leaves(self.params)) * size
        f, u, v = self.vae_factor, self.unet_config, self.vae_config
        hw = (height // f) * (width // f)
        chunk = min(hw, u.attention_chunk_size or hw)
        heads = u.num_attention_heads if isinstance(u.num_attention_heads, int) else max(u.num_attention_heads)
        unet = 2 * size * hw * (96 * u.block_out_channels[0] + heads * chunk)
        vae = 4 * 8 * height * width * v.block_out_channels[0]  # the decoder runs in float32 at full size
        per_device = -(-n // len(self._devices_for(n)))
        return weights + 2**29 + per_device * max(unet, vae)

    def _devices_for(self, n: int) -> list:
        """The most devices that divide n.  Across processes (``minidiff.distributed``) each gives as
        many; a batch that does not split over the processes runs whole on each one's own devices."""
        devices = self.devices or jax.devices()
        groups = [[d for d in devices if d.process_index == p] for p in sorted({d.process_index for d in devices})]
        if len(groups) > 1:
            k = max((k for k in range(1, min(map(len, groups)) + 1) if n % (k * len(groups)) == 0), default=0)
            if k:
                return [d for group in groups for d in group[:k]]
            devices = [d for d in devices if d.process_index == jax.process_index()]
        return devices[:max(k for k in range(1, len(devices) + 1) if n % k == 0)]

    # --- devices ----------------------------------------------------------------------------------

    def _sharding(self, n: int):
        """(batch sharding, replicated sharding) over the largest number of devices dividing n, or None."""
        devices = self._devices_for(n)
        if len(devices) == 1:
            return None
        mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
        P = jax.sharding.PartitionSpec
        return jax.sharding.NamedSharding(mesh, P("batch")), jax.sharding.NamedSharding(mesh, P())

    def _place(self, dtype: str, shardings=None):
        """The parameters on the device(s) in the compute dtype, replicated over a mesh's devices.  The
        weights exist once: placed on one device in a dtype that loses nothing (float32, or their own),
        each placed array replaces its host array in ``self.params`` as it goes (a CPU backend takes a
        64-byte-aligned host array, e.g. a memory-mapped converted file, in place, without a copy).
        Otherwise one placement is kept at a time (a new dtype or device set replaces it)."""
        key = (dtype, None if shardings is None else shardings[1])
        if key not in self._placed:
            self._placed.clear()
            target, want = None if shardings is None else shardings[1], DTYPES[dtype]

            def put(tree):  # leaf by leaf, so that a replaced host array can go before the next is placed
                out = {}
                for name, a in tree.items():
                    if isinstance(a, Mapping):
                        out[name] = put(a)
                        continue
                    a = a if isinstance(a, (np.ndarray, jax.Array)) else np.asarray(a)
                    floating = np.issubdtype(a.dtype, np.floating) or a.dtype == jnp.bfloat16
                    out[name] = jax.device_put(a.astype(want) if floating and a.dtype != want else a, target)
                    if target is None and (not floating or a.dtype == want or want == jnp.float32):
                        tree[name] = out[name]  # the host array is not needed any more
                return out

            self._placed[key] = {part: put(tree) for part, tree in self.params.items()}
        return self._placed[key]

    # --- the public steps -------------------------------------------------------------------------

    def _rows(self, sampler: str, sigmas: str, steps: int) -> dict:
        """The per-step tables of a sampler on this model's schedule (numpy, host)."""
        sch = self.scheduler
        if sampler in ("ddim", "ddpm"):
            isc = sch.inference_schedule(steps)
            return {"t": isc.timesteps, "alpha_bar": isc.alpha_bar_t, "alpha_bar_prev": isc.alpha_bar_prev}
        return SOLVERS[sampler].tables(sch.noise_schedule(), steps, sigmas, sch.spacing, sch.steps_offset)

    def unknown_words(self, prompt: str) -> list[str]:
        """The words of ``prompt`` a small model never saw in training (its ``vocabulary``; none for SD)."""
        if not self.vocabulary:
            return []
        known = (self.vocabulary | {t.lower() for t in self.tokenizer.added}
                 | {w for lora, _ in self._loras for w in lora.words})  # a LoRA's identifier (minidiff lora)
        return [w for w in dict.fromkeys(re.findall(r"[^\s,.;:!?]+", prompt.lower())) if w not in known]

    def warn_unknown_words(self, prompts: Sequence[str]) -> None:
        unknown = [w for p in prompts for w in self.unknown_words(p)]
        if unknown:
            warnings.warn(f"this model knows only captions like 'a red circle in the top left' (words: "
                          f"{', '.join(sorted(self.vocabulary))}); unknown words: {', '.join(dict.fromkeys(unknown))}",
                          stacklevel=3)

    def tokenize(self, prompts: Sequence[str], names=None) -> np.ndarray:
        return self.tokenizer(list(prompts), CONTEXT_LENGTH, self.pad_token, names)

    def encode_text(self, prompts: Sequence[str]) -> jax.Array:
        """The frozen text encoder's states (n, 77, D), float32: the UNet's cross-attention context
        (SDXL: both encoders', see :meth:`encode_prompt`).  The weights are used as they are (float32
        NumPy arrays in place, not copied: the pipeline's own device copy, made for sampling, is not needed)."""
        if self.is_sdxl:
            return self.encode_prompt(prompts)[0]
        return _text_fn(float32_params(self.params["text_encoder"]), jnp.asarray(self.tokenize(list(prompts))),
                        config=self.text_config, clip_skip=self.clip_skip, dtype="float32")

    def encode_prompt(self, prompts: Sequence[str], params=None, dtype: str = "float32", names=None):
        """SDXL: (context (n, 77, D1 + D2), pooled text (n, P)), float32, of the prompts."""
        if not self.is_sdxl:
            raise ValueError("encode_prompt is SDXL's (two text encoders); use encode_text")
        if params is None:
            params = {k: float32_params(self.params[k]) for k in ("text_encoder", "text_encoder_2")}
        prompts = list(prompts)
        ids = jnp.asarray(self.tokenize(prompts, names))
        ids_2 = jnp.asarray(self.tokenizer(prompts, CONTEXT_LENGTH, self.pad_token_2, names))
        return _text_xl_fn(params["text_encoder"], params["text_encoder_2"], ids, ids_2, config=self.text_config,
                           config_2=self.text_config_2, clip_skip=self.clip_skip, dtype=dtype)

    def _sdxl_conditions(self, prompts, negatives, zero_negatives: bool, names, params, dtype, m, height, width,
                         micro: Mapping):
        """The guided UNet's two conditions, {"context", "added_cond": {"text_embeds", "time_ids"}} each
        with n = len(prompts) x m rows: the prompts' and the negatives' (zeros when ``zero_negatives``)."""
        p = len(prompts)
        ctx, pooled = self.encode_prompt(prompts if zero_negatives else prompts + negatives, params, dtype,
                                         names[:p] if zero_negatives else names)
        _finite_or_raise(ctx, "the text encoders' states")
        if zero_negatives:
            ctx, pooled = jnp.concatenate([ctx, jnp.zeros_like(ctx)]), jnp.concatenate([pooled, jnp.zeros_like(pooled)])
        time_ids = sdxl_time_ids(height, width, micro.get("original_size"), micro.get("crops_coords_top_left") or (0, 0),
                                 micro.get("target_size"))
        negative_ids = sdxl_time_ids(height, width, micro.get("negative_original_size") or micro.get("original_size"),
                                     micro.get("negative_crops_coords_top_left") or micro.get("crops_coords_top_left")
                                     or (0, 0), micro.get("negative_target_size") or micro.get("target_size"))

        def rows(i, ids):  # the prompts' (i = 0) or the negatives' (i = 1) rows, each repeated m times
            return {"context": jnp.repeat(ctx[i * p:(i + 1) * p], m, axis=0),
                    "added_cond": {"text_embeds": jnp.repeat(pooled[i * p:(i + 1) * p], m, axis=0),
                                   "time_ids": jnp.broadcast_to(jnp.asarray(ids), (p * m, 6))}}
        return rows(0, time_ids), rows(1, negative_ids)

    def encode_images(self, images) -> jax.Array:
        """The VAE latents (n, H/f, W/f, c), float32, of uint8 images (n, H, W, 3): the posterior
        mean times the scaling factor.  H and W must be multiples of the VAE's factor f.  Weights
        used in place, as by :meth:`encode_text`."""
        images = np.asarray(images)
        f = self.vae_factor
        if images.ndim != 4 or images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"pictures must be (n, H, W, 3) with H and W multiples of {f} for this model, got "
                             f"{images.shape}")
        return vae_encode(float32_params(self.params["vae"]), jnp.asarray(_init_pixels(images, len(images), 1)),
                          config=self.vae_config, dtype="float32")

    def load_textual_inversion(self, path, token: str | None = None) -> list[str]:
        """Teach this pipeline the word(s) of a textual-inversion embedding file (minidiff's, or
        diffusers' ``learned_embeds.safetensors``): new tokenizer tokens and new rows of the text
        encoder's token table; nothing else changes, so prompts without them give the same images.
        ``token`` renames a single-vector embedding.  Returns the tokens added."""
        vectors = load_embedding(path, token=token, hidden_size=self.text_config.hidden_size)
        return self.add_tokens(vectors)

    def with_params(self, **parts) -> "StableDiffusion":
        """The same pipeline (tokenizer, scheduler, clip_skip, padding, devices) with some networks'
        weights replaced, e.g. ``pipe.with_params(unet=tuned)`` after DreamBooth."""
        import copy

        unknown = sorted(set(parts) - set(self.parts))
        if unknown:
            raise ValueError(f"a pipeline's weights are {', '.join(map(repr, self.parts))}, not {unknown}")
        new = copy.copy(self)
        new.params, new._placed = {**self.params, **parts}, {}
        if self._loras:  # the LoRAs fused again, on the new weights
            from .lora import fuse_loras, restore

            base = {**restore(self.params, self._lora_base), **parts}
            new.params, new._lora_base = fuse_loras(base, self._loras, self.unet_config.layers_per_block)
        return new

    # --- LoRA -------------------------------------------------------------------------------------

    @property
    def loras(self) -> list[dict]:
        """The LoRAs fused into the weights: [{"file", "sha256", "scale", "format", "layers"}]."""
        return [{"file": lora.name, "sha256": lora.sha256, "scale": scale, "format": lora.format,
                 "layers": len(lora.layers)} for lora, scale in self._loras]

    def load_lora(self, path, scale: float = 1.0) -> str:
        """Fuse a LoRA file (``.safetensors``; kohya or diffusers / PEFT names, see ``minidiff.lora``)
        into the UNet and text encoder: W' = W + scale * (alpha / rank) * up @ down.  Several add up,
        each with its own scale.  Only the touched weights are recomputed (from the originals, which
        are kept); :meth:`remove_loras` restores them bit for bit.  A file that does not fit this model
        raises ``ValueError`` and changes nothing.  Returns a one-line description."""
        from .lora import describe, fuse_loras, read_lora

        if not _finite(scale):
            raise ValueError(f"a LoRA's scale must be a finite number, got {scale!r}")
        lora = read_lora(path)
        loras = [*self._loras, (lora, float(scale))]
        self.params, self._lora_base = fuse_loras(self.params, loras, self.unet_config.layers_per_block,
                                                  self._lora_base)
        self._loras = loras
        self._placed.clear()  # the device copies hold the old weights
        return describe(lora, float(scale))

    def remove_loras(self) -> None:
        """Undo every :meth:`load_lora`: the original weights, bit for bit."""
        from .lora import restore

        self.params = restore(self.params, self._lora_base)
        self._loras, self._lora_base = [], {}
        self._placed.clear()

    def add_tokens(self, vectors: Mapping[str, np.ndarray]) -> list[str]:
        """Add tokens {token: (D,) embedding} to the tokenizer and the text encoder (see
        :meth:`load_textual_inversion`)."""
        import copy

        if self.is_sdxl:
            raise ValueError("textual-inversion tokens for SDXL (an embedding per text encoder) are not supported")
        tokenizer = copy.deepcopy(self.tokenizer)  # a tokenizer may be shared by several pipelines
        ids = tokenizer.add_tokens(list(vectors))
        if ids and ids[0] != self.text_config.vocab_size:
            raise ValueError(f"the tokenizer has {ids[0]} tokens but the text encoder {self.text_config.vocab_size} "
                             "rows: they must agree before tokens are added")
        self.params["text_encoder"], self.text_config = add_token_rows(
            self.params["text_encoder"], self.text_config, np.stack([np.asarray(v) for v in vectors.values()]))
        self.tokenizer = tokenizer
        self._placed.clear()
        return list(vectors)

    def decode(self, latents, dtype=None) -> np.ndarray:
        """Latents (n, h, w, c) -> uint8 images (n, f h, f w, 3) through ``images_from_latents``."""
        dtype = dtype_name(dtype)
        latents = jnp.asarray(latents, jnp.float32)
        shardings = self._sharding(latents.shape[0])
        params = self._place(dtype, shardings)["vae"]
        if shardings is not None:
            latents = jax.device_put(latents, shardings[0])
        decoded = vae_decode(params, latents, config=self.vae_config, dtype=self.vae_dtype(dtype))
        return to_uint8(_gather(_finite_or_raise(decoded, "the VAE decoder's pixels")))

    def initial_noise(self, n: int, seed: int = 0, height: int | None = None, width: int | None = None) -> jax.Array:
        """x_T ~ N(0, I), (n, H/f, W/f, c), exactly as a call with this seed and n images draws it.  A request
        split into pieces, each given its rows as ``latents``, gives the pictures of one call (deterministic
        samplers, to float rounding) with one compiled program for all pieces (``finetune`` draws in nines)."""
        height, width, f = height or self.default_size, width or self.default_size, self.vae_factor
        key_T, _ = noise_keys(jax.random.key(int(seed)), 1)  # x_T's key does not depend on the number of steps
        return jax.random.normal(key_T, (n, height // f, width // f, self.vae_config.latent_channels), jnp.float32)

    def sample_latents(self, prompts, negative_prompt=None, steps: int = 30, guidance_scale: float | None = None,
                       seed: int = 0, sampler: str = "ddim", eta: float = 0.0, height: int | None = None,
                       width: int | None = None, num_images_per_prompt: int = 1, init_image=None,
                       strength: float = 0.6, dtype=None, latents=None, progress: bool = False,
                       sigmas: str | None = None, **micro) -> np.ndarray:
        """The denoised latents x_0 (n, H/f, W/f, c), float32, n = len(prompts) * num_images_per_prompt.
        Arguments as for ``__call__``; ``latents`` (n, H/f, W/f, c) replaces the x_T drawn from the seed."""
        unknown = sorted(set(micro) - set(MICRO_CONDITIONING))
        if unknown or (micro and not self.is_sdxl):
            raise ValueError(f"unexpected argument(s) {', '.join(unknown or micro)}"
                             + ("" if unknown else ": micro-conditioning is SDXL's"))
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a string or a non-empty list of strings")
        negatives = _negatives(negative_prompt, len(prompts))
        self.warn_unknown_words(prompts + negatives)
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        dtype = dtype_name(dtype)
        sampler, sigmas = resolve(sampler, sigmas)  # "DPM++ 2M Karras" -> ("dpmpp_2m", "karras")
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= 1000:
            raise ValueError(f"steps must be an integer from 1 to 1000, got {steps!r}")
        if not _finite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if not (_finite(eta) and eta >= 0):
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        if not isinstance(num_images_per_prompt, (int, np.integer)) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {seed!r}")
        if init_image is not None and latents is not None:
            raise ValueError("give init_image (img2img) or latents (the starting noise), not both")

        m = int(num_images_per_prompt)
        n = len(prompts) * m
        pixels = None
        if init_image is not None:
            if not (isinstance(strength, (int, float)) and 0 < strength <= 1):
                raise ValueError(f"strength must lie in (0, 1], got {strength!r}")
            pixels = _init_pixels(init_image, len(prompts), m)
            height = height or pixels.shape[1]
            width = width or pixels.shape[2]
            if pixels.shape[1:3] != (height, width):
                raise ValueError(f"the init image is {pixels.shape[2]}x{pixels.shape[1]} (width x height) but "
                                 f"width x height = {width}x{height} was asked; resize it or leave them out")
        height, width = height or self.default_size, width or self.default_size
        for what, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % self.size_multiple:
                raise ValueError(f"{what} must be a positive multiple of {self.size_multiple} for this model "
                                 f"(the VAE downsamples by {self.vae_factor}, the UNet by "
                                 f"{self.size_multiple // self.vae_factor} more), got {v!r}")
        f = self.vae_factor
        shape = (n, height // f, width // f, self.vae_config.latent_channels)
        if latents is not None:
            latents = jnp.asarray(latents, jnp.float32)
            if latents.shape != shape:
                raise ValueError(f"latents must have the shape {shape} (n, H/{f}, W/{f}, channels), got {latents.shape}")

        # text: both branches in one call, then each prompt's rows repeated m times
        shardings = self._sharding(n)
        params = self._place(dtype, shardings)
        p = len(prompts)
        names = ([f"prompt {i}" for i in range(p)] + [f"negative prompt {i}" for i in range(p)] if p > 1
                 else ["the prompt", "the negative prompt"])
        if self.is_sdxl:  # conditions are {"context", "added_cond"}; no negative prompt: zeros (SDXL base)
            zero = negative_prompt is None and self.force_zeros_for_empty_prompt
            context, uncontext = self._sdxl_conditions(prompts, negatives, zero, names, params, dtype, m, height, width,
                                                       micro)
        else:
            ctx = _text_fn(params["text_encoder"], jnp.asarray(self.tokenize(prompts + negatives, names)),
                           config=self.text_config, clip_skip=self.clip_skip, dtype=dtype)
            _finite_or_raise(ctx, "the text encoder's states")
            context, uncontext = jnp.repeat(ctx[:len(prompts)], m, axis=0), jnp.repeat(ctx[len(prompts):], m, axis=0)

        # the schedule (all N steps, or the last k for img2img) as per-step tables, and the start x_T
        rows = self._rows(sampler, sigmas, int(steps))
        R = len(rows["t"])
        _, z_keys = noise_keys(jax.random.key(int(seed)), R)
        first = 0
        if latents is not None:
            x_T = latents
        elif pixels is None:
            x_T = self.initial_noise(n, seed, height, width)
        else:
            x0 = _finite_or_raise(vae_encode(params["vae"], _put(jnp.asarray(pixels), shardings),
                                             config=self.vae_config, dtype=self.vae_dtype(dtype)),
                                  "the VAE encoder's latents")
            run = math.floor(strength * R + 0.5)  # k = round(strength * N), halves up
            first = R - run
            self.last_timesteps = rows["t"][first:]
            if run == 0:  # nothing to denoise: the VAE's own latents of the image
                warnings.warn(f"strength {strength} x {steps} steps rounds to 0 steps: the result is the VAE's "
                              "reconstruction of the init image", stacklevel=3)
                return _gather(x0)
            # x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps at the first step run
            x_T = q_sample(x0, float(rows["alpha_bar"][first]), self.initial_noise(n, seed, height, width))
        self.last_timesteps = rows["t"][first:]
        rows = {k: np.asarray(v[first:], np.int32 if k == "t" and sampler in ("ddim", "ddpm") else np.float32)
                for k, v in rows.items()}
        x = _put(x_T, shardings)
        state = None if sampler in ("ddim", "ddpm") else SOLVERS[sampler].init(x)
        context, uncontext = _put(context, shardings), _put(uncontext, shardings)
        guidance = jnp.float32(guidance_scale)  # one device scalar for every step
        options = dict(config=self.unet_config, prediction_type=self.scheduler.prediction_type, sampler=sampler,
                       eta=float(eta), dtype=dtype, batch_sharding=None if shardings is None else shardings[0])
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=R - first, unit="step",
                       desc=f"{sampler} {'img2img' if pixels is not None else 'txt2img'}")
        try:
            for i in range(R - first):  # one compiled step, called per row: the program has no host callback,
                row = {k: v[i] for k, v in rows.items()}  # so JAX's persistent cache can keep it
                x, state, finite = _denoise_fn(params["unet"], x, state, row, z_keys[first + i], context,
                                               uncontext, guidance, **options)
                if not finite:  # waits for the step
                    raise ValueError(f"the UNet's output is not finite (NaN or inf) from denoising step {i + 1} of "
                                     f"{R - first} (timestep {self.last_timesteps[i]:g}): the model's UNet weights "
                                     "or the settings (guidance scale, dtype) are broken")
                if bar is not None:
                    bar.update()
        finally:
            if bar is not None:
                bar.close()
        return _gather(x)

    def __call__(self, prompts, negative_prompt=None, steps: int = 30, guidance_scale: float | None = None, seed: int = 0,
                 sampler: str = "ddim", eta: float = 0.0, height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, init_image=None, strength: float = 0.6, dtype=None,
                 latents=None, progress: bool = False, sigmas: str | None = None, **micro) -> np.ndarray:
        """uint8 images (n, H, W, 3), n = len(prompts) * num_images_per_prompt, prompt-major.

        prompts: a string or a list of strings.  negative_prompt: the unconditional branch of
        classifier-free guidance ("" by default): one string for all prompts or one per prompt.
        steps: inference steps N.  guidance_scale: s in eps_u + s (eps_c - eps_u) (1: conditional
        only; default: the model's, 7.5 for SD, 3 for the built-in model).  seed: all randomness
        (x_T, the per-step noise, the img2img noise).  sampler: "ddim", "ddpm" or any of
        ``minidiff.diffusion.solvers`` by a name users know ("DPM++ 2M Karras", "Euler a", "unipc",
        "lcm"...); sigmas: "default", "karras" or "exponential"; eta: DDIM's eta.  height, width:
        multiples of ``size_multiple`` (default: the VAE's sample_size, or the init image's size).
        init_image: uint8 (H, W, 3), or one per prompt (P, H, W, 3), for img2img with ``strength`` in
        (0, 1].  dtype: "float32" or "bfloat16" (default: bfloat16 on GPU / TPU, float32 on CPU).
        latents: optional x_T (n, H/f, W/f, c) instead of the seed's.  progress: a tqdm bar.
        SDXL only, keywords (``MICRO_CONDITIONING``): original_size and target_size (height, width),
        crops_coords_top_left (top, left), defaults (H, W), (0, 0), (H, W), and their negative_
        versions for the unconditional branch (default: the same as the prompt's).
        """
        x0 = self.sample_latents(prompts, negative_prompt, steps, guidance_scale, seed, sampler, eta, height, width,
                                 num_images_per_prompt, init_image, strength, dtype, latents, progress, sigmas, **micro)
        return self.decode(x0, dtype)


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def available_memory() -> int | None:
    """Bytes free on the first device: an accelerator's own count, or the host's MemAvailable for
    the CPU; None where neither can be read."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _finite_or_raise(x, what: str):
    """x, or a ValueError naming the stage where a NaN or inf appeared (never a silently black image)."""
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{what} are not finite (NaN or inf): that network's weights (or the settings, e.g. "
                         "the dtype) are broken")
    return x


def float32_params(tree):
    """A parameter tree as float32 JAX arrays (float32 NumPy arrays are used in place where JAX can;
    the built-in model's file is float16)."""
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32) if np.issubdtype(np.asarray(a).dtype, np.floating)
                        else jnp.asarray(a), tree)


def _own_dicts(tree):
    """The nested dicts of a parameter tree copied, the arrays shared."""
    return {k: _own_dicts(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _gather(x) -> np.ndarray:
    """The whole array on this host; one split over several processes is all-gathered (each gets all)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _put(x, shardings):
    if x is None or shardings is None:
        return x
    return jax.device_put(x, shardings[0])


def _negatives(negative_prompt, n_prompts: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n_prompts
    if isinstance(negative_prompt, str):
        return [negative_prompt] * n_prompts
    negatives = list(negative_prompt)
    if len(negatives) != n_prompts or not all(isinstance(p, str) for p in negatives):
        raise ValueError(f"negative_prompt must be a string or a list of {n_prompts} strings (one per prompt)")
    return negatives


def _init_pixels(init_image, n_prompts: int, m: int) -> np.ndarray:
    """The init image(s) as float32 (n, H, W, 3) in [-1, 1]: uint8 in [0, 255] or float in [-1, 1];
    one image for all prompts, or one per prompt."""
    a = np.asarray(init_image)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"init_image must be (H, W, 3) or (prompts, H, W, 3) RGB, got shape {a.shape}")
    if a.shape[0] not in (1, n_prompts):
        raise ValueError(f"init_image holds {a.shape[0]} images for {n_prompts} prompts; give one, or one per prompt")
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 127.5 - 1.0
    elif not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"init_image must be uint8 [0, 255] or float [-1, 1], got {a.dtype}")
    a = np.repeat(a.astype(np.float32), n_prompts * m // a.shape[0] if a.shape[0] == 1 else m, axis=0)
    return a


# --- loading --------------------------------------------------------------------------------------


def load_model(path=None):
    """(params, StableDiffusionConfig, path) of a converted minidiff file, a diffusers folder or a
    single-file checkpoint (converted in memory); ``path=None``: the built-in mini model."""
    path = Path(path or MINI_MODEL)
    if not path.exists():
        raise ValueError(f"model not found: {path}")
    params, config = (load_converted if is_converted(path) else read_checkpoint)(path)
    return params, config, path


def load_pipeline(path=None, **kwargs) -> StableDiffusion:
    """A pipeline from a converted minidiff file (``minidiff.convert.load_converted``), or from a
    diffusers folder or a single-file checkpoint (``.safetensors`` / ``.ckpt``), converted in memory
    on the fly (``minidiff.convert.read_checkpoint``).  ``path=None``: the built-in mini model
    (``minidiff/assets/mini_sd.safetensors`` + ``.json``).  Keyword arguments go to StableDiffusion."""
    params, config, path = load_model(path)
    kwargs.setdefault("name", str(path))
    return StableDiffusion.from_config(params, config, **kwargs)
