"""Stable Diffusion's configuration, and the one rule that turns a dict into a config dataclass.

    config_from_dict(cls, d, what)   cls(**d) from a JSON object: nested configs built, lists made
                                     tuples where the field is a tuple, unknown fields an error
    StableDiffusionConfig            the three model configs, prediction type, training schedule,
                                     pad token, provenance (the JSON next to converted weights)
    SchedulerConfig                  how the sampler walks the training schedule
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass

from .diffusion import InferenceSchedule, NoiseSchedule
from .diffusion.samplers import PREDICTION_TYPES, SPACINGS
from .nn.autoencoder import AutoencoderKLConfig
from .nn.clip import CLIPTextConfig
from .nn.unet import UNetConfig


def config_from_dict(cls, d, what: str = ""):
    """``cls(**d)`` for a config dataclass ``cls``, checked: minidiff's one way to read a config
    from a dict (a JSON file, saved settings).

    * a field whose type is a dataclass takes a dict of its fields (built by this same rule) or an
      instance;
    * a list becomes a tuple where the field is a tuple (JSON has no tuples), and each item an X
      where it is a ``tuple[X, ...]``;
    * unknown fields are a ``ValueError`` naming each of them and the fields ``cls`` takes; missing
      required fields are one naming them.

    ``d`` may also be an instance of ``cls`` (returned as it is).  ``what`` names the config in
    error messages ("the {what} config"; default: the class name)."""
    name = f"the {what} config" if what else cls.__name__
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        raise ValueError(f"{name} must be a {cls.__name__} or a dict of its fields, got {type(d).__name__}")
    names = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"{name} has unknown field(s) {', '.join(unknown)}; "
                         f"{cls.__name__} takes {', '.join(names)}")
    missing = [f.name for f in fields(cls) if f.init and f.name not in d
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{name} lacks the field(s) {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _as_field(hints[k], v, f"{what} {k}".strip()) for k, v in d.items()})


def _as_field(hint, value, what: str):
    """``value`` as a field of type ``hint`` takes it (see :func:`config_from_dict`)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    if isinstance(value, Mapping):
        for option in options:
            if isinstance(option, type) and is_dataclass(option):
                return config_from_dict(option, value, what)
    if isinstance(value, list):
        for option in options:
            if option is tuple or typing.get_origin(option) is tuple:
                args = typing.get_args(option)
                if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: each item as an X
                    return tuple(_as_field(args[0], v, what) for v in value)
                return tuple(value)
    return value


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

    family: str  # "sd1" or "sd2"
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

    def scheduler_config(self) -> SchedulerConfig:
        """The sampler settings: ``scheduler`` with ``prediction_type``."""
        return SchedulerConfig.from_diffusers(self.scheduler, self.prediction_type)

    def to_dict(self) -> dict:
        return asdict(self)
