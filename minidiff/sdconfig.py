"""Stable Diffusion's configuration (read from dicts by :func:`minidiff.config.config_from_dict`).

    StableDiffusionConfig            the three model configs, prediction type, training schedule,
                                     pad token, provenance (the JSON next to converted weights)
    SchedulerConfig                  how the sampler walks the training schedule
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from .config import config_from_dict
from .diffusion import InferenceSchedule, NoiseSchedule
from .diffusion.samplers import PREDICTION_TYPES, SPACINGS
from .nn.autoencoder import AutoencoderKLConfig
from .nn.clip import CLIPTextConfig
from .nn.unet import UNetConfig


@dataclass(frozen=True)
class SchedulerConfig:
    """How the sampler walks the training noise schedule (SD 1.x/2.x: these defaults; SD 2.x 768-v:
    prediction_type="v_prediction")."""

    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; "
                             f"choose one of {', '.join(PREDICTION_TYPES)}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {self.spacing!r}; choose one of {', '.join(SPACINGS)}")

    @classmethod
    def from_diffusers(cls, scheduler: Mapping, prediction_type: str | None = None) -> "SchedulerConfig":
        """From a schedule in diffusers' names (``StableDiffusionConfig.scheduler``): its
        ``timestep_spacing`` is our ``spacing``; ``clip_sample`` (diffusers' option to clip x_0,
        off in SD's configs) is not used: minidiff never clips."""
        d = {k: v for k, v in scheduler.items() if k != "clip_sample"}
        if "timestep_spacing" in d:
            d["spacing"] = d.pop("timestep_spacing")
        if prediction_type:
            d["prediction_type"] = prediction_type
        return config_from_dict(cls, d, "scheduler")

    def noise_schedule(self) -> NoiseSchedule:
        betas = {} if self.beta_schedule == "cosine" else dict(beta_start=self.beta_start, beta_end=self.beta_end)
        return NoiseSchedule.from_name(self.beta_schedule, self.num_train_timesteps, **betas)

    def inference_schedule(self, steps: int) -> InferenceSchedule:
        return InferenceSchedule.create(self.noise_schedule(), steps, self.spacing, self.steps_offset,
                                        self.set_alpha_to_one)


# SD's training schedule and sampler settings (the scheduler_config.json of the public SD 1.x / 2.x models)
SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
                "steps_offset": 1, "set_alpha_to_one": False, "timestep_spacing": "leading", "clip_sample": False}


@dataclass
class StableDiffusionConfig:
    """Everything a pipeline needs besides the weights: the three model configs, what the UNet
    predicts, the training schedule and sampler settings, the tokenizer's pad id, and where the
    weights came from.  Saved as JSON next to converted weights; read back with
    ``config_from_dict(StableDiffusionConfig, d)``."""

    family: str  # "sd1", "sd2" or "sdxl"
    unet: UNetConfig
    vae: AutoencoderKLConfig  # its scaling_factor: latents = z * 0.18215 for SD
    text_encoder: CLIPTextConfig
    prediction_type: str = "epsilon"  # "epsilon", "v_prediction" or "sample"
    scheduler: dict = field(default_factory=lambda: dict(SD_SCHEDULER))  # diffusers' names
    pad_token_id: int = 49407  # SD 1.x pads prompts with the end token, SD 2.x with "!" (id 0)
    dtype: str = "float32"
    ema: bool | None = None  # True: the UNet is the checkpoint's EMA copy; None: the file had none to choose
    source: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    guidance_scale: float = 7.5  # the default guidance (the built-in model draws best at 3)
    sampler: str = "DPM++ 2M Karras"  # the command line's default sampler and steps for this model
    steps: int = 25
    vocabulary: list = field(default_factory=list)  # the only words the model was trained on; [] for real SD
    # SDXL: the second text encoder (OpenCLIP bigG with projection), its tokenizer's pad id ("!" = 0), and
    # diffusers' rule that a missing negative prompt means zero embeddings (not the encoded "")
    text_encoder_2: CLIPTextConfig | None = None
    pad_token_id_2: int = 0
    force_zeros_for_empty_prompt: bool = False

    @property
    def parts(self) -> tuple[str, ...]:
        """The networks of this model: unet, vae, text_encoder (and text_encoder_2 for SDXL)."""
        return ("unet", "vae", "text_encoder") + (("text_encoder_2",) if self.text_encoder_2 is not None else ())

    def scheduler_config(self) -> SchedulerConfig:
        """The sampler settings: ``scheduler`` with ``prediction_type``."""
        return SchedulerConfig.from_diffusers(self.scheduler, self.prediction_type)

    def to_dict(self) -> dict:
        return asdict(self)
