"""Every trainer's settings: one dataclass per model, saved with its runs as JSON.

Importing this module imports no JAX, so the command line reads its defaults (and reports bad
settings) at once.  A dict becomes a config through ``from_dict`` (:func:`minidiff.config.config_from_dict`:
unknown fields are an error naming them).

    TrainConfig              toy diffusion models (2-D points, 32x32 shapes)       minidiff train
    VQVAETrainConfig         the VQ-VAE on shapes                                   minidiff train-vqvae
    DalleTrainConfig         the DALL-E-style transformer on its codes              minidiff train-dalle
    MiniSDConfig             the built-in mini Stable Diffusion (VAE, CLIP, UNet)   minidiff train-mini-sd
    TextualInversionConfig   one new word's embedding                               minidiff textual-inversion
    DreamBoothConfig         the UNet on a subject, with prior preservation         minidiff dreambooth
    LoRAConfig               low-rank adapters on a subject (prior preservation)    minidiff lora
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import config_from_dict
from ..data import TOY_MIXTURE, ShapesDataset
from ..diffusion import NoiseSchedule
from ..diffusion.samplers import PREDICTION_TYPES

if TYPE_CHECKING:  # the network configs come with Flax: imported where they are built
    from ..nn.autoencoder import AutoencoderKLConfig
    from ..nn.clip import CLIPTextConfig
    from ..nn.unet import UNetConfig

RECONSTRUCTIONS = ("l1", "l2")  # the autoencoders' reconstruction error: mean |x - x_hat| or (x - x_hat)^2


# --- toy diffusion models ---------------------------------------------------------------------------------

POINT_DATA = {"gmm": "mixture", "mixture": "mixture", "moons": "moons", "swissroll": "swissroll"}
DATASETS = ("shapes", *POINT_DATA)

# Per-data defaults (a field left at None in TrainConfig.create takes these).  Shapes: a UNetConfig.toy
# with half its channels and attention only at 8x8, v-prediction and the cosine schedule (they train
# much faster than eps + linear at this size).
DATA_DEFAULTS = {
    "points": dict(model="mlp", steps=10_000, batch=512, lr=1e-3, warmup=200, lr_decay=True,
                   sample_every=2000, checkpoint_every=2000),
    "shapes": dict(model="unet", steps=2000, batch=32, lr=2e-3, warmup=100, lr_decay=True, prediction="v_prediction",
                   schedule="cosine", model_kwargs={"block_out_channels": [16, 32, 32], "attention": [False, False, True]},
                   sample_every=500, checkpoint_every=250),
}


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved with every checkpoint as JSON)."""

    data: str = "moons"  # "shapes" or a 2-D point cloud: "gmm" (= "mixture"), "moons", "swissroll"
    model: str = "mlp"  # "mlp" (MLPDenoiser) or "unet" (UNet2DCondition with UNetConfig.toy)
    model_kwargs: dict = field(default_factory=dict)  # MLPDenoiser fields / UNetConfig.toy overrides
    cond: str = "none"  # "none" or "class" (shapes: shape x colour; gmm: the mixture component)
    cond_drop: float = 0.0  # probability of training with the "no class" label (classifier-free guidance)
    prediction: str = "epsilon"  # "epsilon", "v_prediction" or "sample"
    schedule: str = "linear"  # beta schedule (minidiff.diffusion.make_betas)
    num_train_timesteps: int = 1000
    steps: int = 10_000
    batch: int = 512
    lr: float = 1e-3
    warmup: int = 200  # linear learning-rate warmup from 0 over this many steps
    lr_decay: bool = False  # cosine decay to lr / 10 at ``steps`` after the warmup
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # clip the global gradient norm (None: no clipping)
    ema_decay: float = 0.999
    min_snr_gamma: float | None = None  # weight the loss by min(SNR_t, gamma) / SNR_t (eps) or / (SNR_t + 1) (v)
    seed: int = 0
    image_size: int = 32
    patch_size: int = 1  # shapes: the UNet sees p x p pixel patches folded into channels (PatchedDenoiser)
    latent: bool = False  # shapes: diffuse the built-in model's VAE latents (8x8x4), not the pixels
    # shapes + class: how the UNet reads the class.  "embedding": one learned vector per (shape, colour),
    # added to the time embedding; "tokens": two context tokens, a shape word and a colour word, read by
    # cross-attention at every resolution (as the mini SD reads its caption)
    class_conditioning: str = "embedding"
    sample_every: int = 0  # save a sample grid every so many steps (0: never)
    checkpoint_every: int = 0  # save a checkpoint every so many steps (0: only at the end)
    log_every: int = 50  # average the loss over this many steps for the progress bar and history

    @classmethod
    def create(cls, data: str, **overrides) -> "TrainConfig":
        """A config for ``data`` with that data's defaults; ``None`` overrides are ignored."""
        if data not in DATASETS:
            raise ValueError(f"unknown data {data!r}; choose one of {', '.join(DATASETS)}")
        defaults = DATA_DEFAULTS["shapes" if data == "shapes" else "points"]
        return cls(data=data, **{**defaults, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return config_from_dict(cls, d)

    def __post_init__(self):
        if self.data not in DATASETS:
            raise ValueError(f"unknown data {self.data!r}; choose one of {', '.join(DATASETS)}")
        if self.model not in ("mlp", "unet"):
            raise ValueError(f"unknown model {self.model!r}; choose 'mlp' or 'unet'")
        if (self.model == "unet") != (self.data == "shapes"):
            raise ValueError(f"model {self.model!r} does not fit data {self.data!r} (points: mlp, shapes: unet)")
        if self.prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction {self.prediction!r}; choose one of {', '.join(PREDICTION_TYPES)}")
        if self.cond not in ("none", "class"):
            raise ValueError(f"unknown conditioning {self.cond!r}; choose 'none' or 'class'")
        if self.cond == "class" and self.data not in ("shapes", "gmm", "mixture"):
            raise ValueError(f"--cond class needs labelled data (shapes or gmm), not {self.data!r}")
        for name in ("steps", "batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.class_conditioning not in ("embedding", "tokens"):
            raise ValueError(f"unknown class_conditioning {self.class_conditioning!r}; choose 'embedding' or 'tokens'")
        if self.class_conditioning == "tokens" and self.data != "shapes":
            raise ValueError("class_conditioning='tokens' reads (shape, colour) classes: it needs --data shapes")
        if self.latent and (self.data != "shapes" or self.patch_size != 1 or self.image_size != 32):
            raise ValueError("latent=True diffuses the built-in VAE's latents of 32x32 shapes: it needs --data "
                             "shapes, image size 32 and patch size 1")
        self.noise_schedule()  # an unknown schedule's name is an error now
        if self.patch_size < 1 or self.image_size % self.patch_size or (self.patch_size > 1 and self.model != "unet"):
            raise ValueError(f"patch_size must divide the image size {self.image_size} (images only), "
                             f"got {self.patch_size}")

    @property
    def num_classes(self) -> int | None:
        """Number of real classes (the model has one more embedding: index num_classes = no class)."""
        if self.cond == "none":
            return None
        return self.dataset().num_classes if self.data == "shapes" else len(TOY_MIXTURE.weights)

    def dataset(self) -> ShapesDataset:
        """The ShapesDataset behind ``--data shapes``."""
        return ShapesDataset(size=self.image_size, seed=self.seed)

    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_name(self.schedule, self.num_train_timesteps)


# --- VQ-VAE and DALL-E ----------------------------------------------------------------------------------

@dataclass
class VQVAETrainConfig:
    steps: int = 3000
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 100
    restart_every: int = 100  # dead-code restart period (0: never; the nearest-code quantizer only)
    # shape pixels count 1 + this in the reconstruction error (0: the plain mean, ruled by the black
    # background, which lets the decoder draw small shapes as blobs)
    foreground_weight: float = 10.0
    # "l1": mean |x - x_hat| (SD's VAE; keeps edges sharper); "l2": the VQ-VAE paper's squared error
    reconstruction: str = "l1"
    seed: int = 0
    image_size: int = 32
    model: dict = field(default_factory=lambda: {"channels": [16, 32, 64], "groups": 8})
    checkpoint_every: int = 500
    # model={"quantizer": "gumbel"} (DALL-E's dVAE): the Gumbel-softmax temperature falls geometrically
    # from tau_start at step 0 to tau_end at the last step (DALL-E: 1 -> 1/16)
    tau_start: float = 1.0
    tau_end: float = 1 / 16
    # the VQGAN experiment (Esser et al. 2021): + adversarial_weight * (a patch discriminator's hinge
    # loss, from step disc_start on) + perceptual_weight * (distance in a shapes classifier's features)
    adversarial_weight: float = 0.0
    perceptual_weight: float = 0.0
    disc_start: int = 0

    def __post_init__(self):
        for name in ("steps", "batch", "image_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got {self.reconstruction!r}")
        if self.adversarial_weight < 0 or self.perceptual_weight < 0 or self.disc_start < 0:
            raise ValueError("adversarial_weight, perceptual_weight and disc_start must not be negative")
        if not 0 < self.tau_end <= self.tau_start:
            raise ValueError(f"need 0 < tau_end <= tau_start, got tau_start={self.tau_start}, tau_end={self.tau_end}")
        if self.model_config().quantizer == "gumbel" and self.restart_every:  # validates the model settings too
            raise ValueError("restart_every moves unused nearest-neighbour codes; the dVAE (quantizer 'gumbel') "
                             "has none to move: set restart_every=0 (--restart-every 0)")

    def tau(self, step: int) -> float:
        """The dVAE's temperature at ``step``: tau_start (tau_end / tau_start)^(step / (steps - 1))."""
        return float(self.tau_start * (self.tau_end / self.tau_start) ** (step / max(self.steps - 1, 1)))

    def model_config(self):
        """The VQVAEConfig of ``model`` (a dict: it is saved as JSON)."""
        from ..nn.vqvae import VQVAEConfig

        try:
            return VQVAEConfig(**self.model)
        except TypeError as e:
            names = [f.name for f in dataclasses.fields(VQVAEConfig)]
            raise ValueError(f"bad VQ-VAE setting in {self.model}: {e}; the settings are {', '.join(names)}") from None

    def dataset(self) -> ShapesDataset:
        return ShapesDataset(size=self.image_size, seed=self.seed)

    @classmethod
    def from_dict(cls, d: dict) -> "VQVAETrainConfig":
        return config_from_dict(cls, d)


# The default classifier-free guidance scale on the DALL-E transformer's logits: past about 2 the
# extrapolated logits favour codes the plain model finds unlikely, and colour and position break
# (the README's guidance sweep).
DALLE_GUIDANCE = 2.0


@dataclass
class DalleTrainConfig:
    vqvae: str = "runs/vqvae"
    steps: int = 3000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    cond_drop: float = 0.1  # probability of training on the empty caption (for guidance)
    size_word_drop: float = 0.5  # probability of a caption without its size word ("a red circle on the left")
    image_weight: float = 7 / 8  # DALL-E's loss weights: 1/8 text, 7/8 image
    seed: int = 0
    model: dict = field(default_factory=lambda: {"width": 128, "layers": 4, "heads": 4,
                                                 "attention": ["row", "column"]})
    checkpoint_every: int = 500
    log_every: int = 50

    def __post_init__(self):
        for name in ("steps", "batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("cond_drop", "size_word_drop"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict) -> "DalleTrainConfig":
        return config_from_dict(cls, d)


# --- the mini Stable Diffusion --------------------------------------------------------------------------

# cosine betas; "trailing" spacing starts sampling at t = 999, where the cosine schedule's alpha_bar is ~0
# (with "leading", SD's choice for its scaled_linear betas, the first step would be t = 967)
SCHEDULER = {"beta_schedule": "cosine", "num_train_timesteps": 1000, "steps_offset": 0, "set_alpha_to_one": False,
             "timestep_spacing": "trailing", "clip_sample": False}
PREDICTION = "v_prediction"  # trains much faster than eps at this size (see the toy models)


@dataclass
class MiniSDConfig:
    """Everything that defines the built-in model (saved with it)."""

    seed: int = 0
    image_size: int = 32
    held_out: tuple = (("circle", "blue"), ("triangle", "yellow"), ("square", "red"))  # (shape, colour) never drawn
    # 1. VAE
    vae_channels: tuple = (16, 32, 32)  # f = 4: 32x32x3 pictures <-> 8x8xC latents
    vae_latent_channels: int = 4
    vae_steps: int = 2000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_foreground_weight: float = 10.0  # shape pixels count 11x in the L1 (the black background rules it otherwise)
    vae_init_logvar: float = -6.0        # start sigma at 0.05: with sigma 1 a short run learns the mean picture
    # 2. CLIP
    text_width: int = 64
    text_layers: int = 2
    clip_steps: int = 300
    clip_batch: int = 128
    # 3. UNet
    unet_channels: tuple = (64, 128)
    unet_attention: tuple = (True, True)
    unet_steps: int = 2000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    cond_drop: float = 0.1
    size_word_drop: float = 0.5  # this fraction of training captions leaves the size out ("a red circle in the top left")
    ema_decay: float = 0.999
    pool: int = 16384  # pictures encoded once into latents, drawn from at every step
    guidance: float = 3.0  # the model's default guidance scale (at 7.5 squares turn into stars, blue into violet)
    sampler: str = "euler_a"  # and its default sampler and steps: the cheapest setting measured >= 80 %
    sample_steps: int = 6       # (Euler a at 6 steps: 89.4 % of 216 pictures; DDIM at 30: 87.0 %)

    def __post_init__(self):
        self.held_out = tuple(tuple(p) for p in self.held_out)
        for name in ("vae_channels", "unet_channels", "unet_attention"):
            setattr(self, name, tuple(getattr(self, name)))

    @classmethod
    def from_dict(cls, d: dict) -> "MiniSDConfig":
        return config_from_dict(cls, d)

    def dataset(self, held_out: bool = True) -> ShapesDataset:
        """The training pictures (without the held-out pairs), or with ``held_out=False`` all of them."""
        return ShapesDataset(size=self.image_size, seed=self.seed, exclude=self.held_out if held_out else ())

    def vae_config(self) -> AutoencoderKLConfig:
        from ..nn.autoencoder import AutoencoderKLConfig

        return AutoencoderKLConfig.toy(self.image_size, block_out_channels=self.vae_channels,
                                       latent_channels=self.vae_latent_channels, scaling_factor=1.0)

    def text_config(self) -> CLIPTextConfig:
        from ..nn.clip import CLIPTextConfig

        return CLIPTextConfig.toy(hidden_size=self.text_width, intermediate_size=4 * self.text_width,
                                  num_hidden_layers=self.text_layers)

    def unet_config(self) -> UNetConfig:
        from ..nn.unet import UNetConfig

        latent = self.image_size // 2 ** (len(self.vae_channels) - 1)
        C = self.vae_latent_channels
        return UNetConfig(sample_size=latent, in_channels=C, out_channels=C, block_out_channels=self.unet_channels,
                          layers_per_block=1, attention=self.unet_attention, mid_block_attention=True,
                          num_attention_heads=4, cross_attention_dim=self.text_width, norm_num_groups=16,
                          attention_chunk_size=None)


# --- fine-tuning ---------------------------------------------------------------------------------------

@dataclass
class TextualInversionConfig:
    token: str = "<orange>"  # the new word, as typed in prompts
    init_word: str = "red"  # its embedding starts as this word's (one token)
    steps: int = 300
    lr: float = 1e-2
    batch: int = 8  # pictures per step, drawn with replacement from the subject's few
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def _check_subject_training(cfg, *positive):
    """What DreamBooth's and LoRA's settings share: positive counts, lambda >= 0, an identifier."""
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.prior_weight < 0:
        raise ValueError(f"prior_weight must be >= 0, got {cfg.prior_weight}")
    if not cfg.identifier.strip():
        raise ValueError("the identifier must be a word, e.g. 'sks'")


@dataclass
class DreamBoothConfig:
    identifier: str = "sks"  # a rare word that fills the captions' {}
    steps: int = 300
    lr: float = 1e-4
    batch: int = 4  # instance pictures per step (and as many class pictures with the prior loss)
    prior_weight: float = 1.0  # lambda; 0 turns prior preservation off (no class pictures drawn)
    class_images: int = 8  # class pictures drawn per distinct class prompt
    class_guidance: float = 7.5
    class_steps: int = 30
    remat: bool = False  # gradient checkpointing in the UNet (memory for compute)
    optimizer: str = "adamw"  # or "adafactor": no per-weight moments (SD 1.5 on a 16-24 GB machine)
    seed: int = 0

    def __post_init__(self):
        _check_subject_training(self, "steps", "batch")
        if self.optimizer not in ("adamw", "adafactor"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose 'adamw' or 'adafactor'")


@dataclass
class LoRAConfig:
    """LoRA on the subject folders DreamBooth uses; the prior-preservation fields mean what they mean there."""

    identifier: str = "sks"
    rank: int = 4  # r: the update of each d_out x d_in weight is (alpha / r) up @ down, r (d_in + d_out) numbers
    alpha: float | None = None  # None: alpha = rank (a factor of 1)
    targets: tuple = ("to_q", "to_k", "to_v", "to_out_0")  # the UNet's attention projections (both attentions)
    text_encoder: bool = False  # also adapt the text encoder's q_proj, k_proj, v_proj, out_proj
    steps: int = 300
    lr: float = 1e-3  # adapters start at zero and are few: a larger step than DreamBooth's 1e-4
    batch: int = 4
    prior_weight: float = 1.0
    class_images: int = 8
    class_guidance: float = 7.5
    class_steps: int = 30
    seed: int = 0

    def __post_init__(self):
        self.targets = tuple(self.targets)
        _check_subject_training(self, "steps", "batch", "rank")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
