"""Every sampler by name, in one shape: per-step tables made on the host, a state, a step.

    tables = SOLVERS[name].tables(schedule, N, sigmas, spacing, steps_offset)   {"t": (R,), ...}
    state  = SOLVERS[name].init(x)
    x, state = SOLVERS[name].step(predict, x, state, row, noise, prediction_type=...)

R rows (one model call each; Heun's rows call it twice; PLMS has N + 1).  Every table has "t" and
"alpha_bar" (of the x the row receives: where img2img starts).  The same loop runs them all, in
NumPy (``run``) or in one ``jax.lax.scan`` (``minidiff.sampling``).  ``resolve`` reads the names
users know: "DPM++ 2M Karras", "Euler a", "dpmpp_2m", "euler_ancestral", "uni_pc", "lcm"...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


from . import dpm_solver as dpm
from . import k_samplers as k
from .lcm import lcm_init, lcm_step, lcm_tables
from .plms import plms_init, plms_step, plms_tables
from .sigmas import SIGMA_KINDS, alpha_bar_from_sigma


@dataclass(frozen=True)
class Solver:
    name: str
    about: str  # one line for --help
    tables: Callable  # (schedule, num_steps, sigmas, spacing, steps_offset) -> dict of (R,) arrays
    init: Callable
    step: Callable
    stochastic: bool = False  # draws fresh noise every step
    evaluations_per_row: int = 1


def _on_sigma_grid(grid_fn, tables_fn, alpha_bar_key=None):
    def tables(schedule, num_steps, sigmas="default", spacing="leading", steps_offset=0):
        t = tables_fn(grid_fn(schedule, num_steps, sigmas, spacing, steps_offset))
        t["alpha_bar"] = t[alpha_bar_key] if alpha_bar_key else alpha_bar_from_sigma(t["sigma"])
        return t
    return tables


def _on_timesteps(tables_fn, alpha_bar_key, name, **options):
    def tables(schedule, num_steps, sigmas="default", spacing="leading", steps_offset=0):
        if sigmas != "default":
            raise ValueError(f"{name} walks its own timesteps: it takes no {sigmas!r} sigmas")
        extra = dict(spacing=spacing, steps_offset=steps_offset) if options.get("spaced") else {}
        t = tables_fn(schedule, num_steps, **extra)
        t["alpha_bar"] = t[alpha_bar_key]
        return t
    return tables


SOLVERS = {s.name: s for s in (
    Solver("euler", "Euler on the probability-flow ODE in sigma (Karras et al. 2022); 1 call a step",
           _on_sigma_grid(k.euler_grid, k.euler_tables), k.euler_init, k.euler_step),
    Solver("euler_a", "Euler ancestral: each step overshoots to sigma_down, then adds noise sigma_up (\"Euler a\")",
           _on_sigma_grid(k.euler_grid, k.euler_ancestral_tables), k.euler_ancestral_init, k.euler_ancestral_step,
           stochastic=True),
    Solver("heun", "Heun: Euler, then the trapezoid with the slope at the guess; 2 calls a step",
           _on_sigma_grid(k.euler_grid, k.heun_tables), k.heun_init, k.heun_step, evaluations_per_row=2),
    Solver("lms", "linear multistep, order 4, on the slopes in sigma (k-diffusion's LMS)",
           _on_sigma_grid(k.euler_grid, k.lms_tables), k.lms_init, k.lms_step),
    Solver("plms", "pseudo linear multistep (PNDM without Runge-Kutta warm-up; SD 1.5's scheduler)",
           _on_timesteps(plms_tables, "alpha_bar_t", "plms", spaced=True), plms_init, plms_step),
    Solver("dpmpp_2m", "DPM-Solver++(2M): second-order multistep in log-SNR on x0_hat (Lu et al. 2022)",
           _on_sigma_grid(dpm.multistep_grid, dpm.dpmpp_2m_tables, "ab"), dpm.dpmpp_2m_init, dpm.dpmpp_2m_step),
    Solver("dpmpp_2m_sde", "SDE-DPM-Solver++(2M): the same with fresh noise each step",
           _on_sigma_grid(dpm.multistep_grid, dpm.dpmpp_2m_sde_tables, "ab"), dpm.dpmpp_2m_init,
           dpm.dpmpp_2m_sde_step, stochastic=True),
    Solver("unipc", "UniPC (bh2, order 2): DPM-Solver++ predictor plus a corrector (Zhao et al. 2023)",
           _on_sigma_grid(dpm.multistep_grid, dpm.unipc_tables, "ab"), dpm.unipc_init, dpm.unipc_step),
    Solver("lcm", "LCM: multistep consistency sampling, 2 to 8 steps, for distilled models (Luo et al. 2023)",
           _on_timesteps(lcm_tables, "alpha_bar_t", "lcm"), lcm_init, lcm_step, stochastic=True),
)}

ALIASES = {  # names users know (A1111 / ComfyUI / diffusers), after normalising case, spaces and "++"
    "euler_discrete": "euler", "k_euler": "euler",
    "euler_ancestral": "euler_a", "k_euler_a": "euler_a", "euler_ancestral_discrete": "euler_a",
    "heun_discrete": "heun", "k_heun": "heun",
    "k_lms": "lms", "lms_discrete": "lms",
    "pndm": "plms",
    "dpmpp_2m": "dpmpp_2m", "dpm_solver_multistep": "dpmpp_2m", "dpmsolver": "dpmpp_2m", "dpm_solver": "dpmpp_2m",
    "dpmpp_2m_sde": "dpmpp_2m_sde", "sde_dpmsolver": "dpmpp_2m_sde",
    "uni_pc": "unipc", "unipc_multistep": "unipc",
}
DIFFUSERS_CLASSES = {  # a diffusers scheduler config's _class_name -> (sampler, sigmas from its flags)
    "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a", "HeunDiscreteScheduler": "heun", "LMSDiscreteScheduler": "lms",
    "PNDMScheduler": "plms", "DPMSolverMultistepScheduler": "dpmpp_2m", "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm",
}


def resolve(name: str, sigmas: str | None = None) -> tuple[str, str]:
    """(sampler, sigmas) from a name users type: "DPM++ 2M Karras" -> ("dpmpp_2m", "karras"),
    "Euler a" -> ("euler_a", "default"); ``sigmas`` (if given) must agree with a name's suffix."""
    key = name.strip().lower().replace("++", "pp").replace("-", "_").replace(" ", "_")
    suffix = next((s for s in ("karras", "exponential") if key.endswith("_" + s)), None)
    if suffix:
        key = key[: -len(suffix) - 1]
    key = ALIASES.get(key, key)
    known = ("ddim", "ddpm", *SOLVERS)
    if key not in known:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(known)} (or e.g. 'DPM++ 2M Karras', "
                         "'Euler a')")
    if suffix and sigmas not in (None, suffix):
        raise ValueError(f"the sampler {name!r} names {suffix} sigmas but sigmas={sigmas!r} was asked")
    sigmas = suffix or sigmas or "default"
    if sigmas not in SIGMA_KINDS:
        raise ValueError(f"unknown sigmas {sigmas!r}; choose one of {', '.join(SIGMA_KINDS)}")
    if key in ("ddim", "ddpm") and sigmas != "default":
        raise ValueError(f"{key} walks the training timesteps: it takes no {sigmas!r} sigmas")
    return key, sigmas


def run(solver: Solver, predict, x, tables: dict, noise=None, prediction_type: str = "epsilon"):
    """The NumPy loop: every row of the tables in turn.  ``noise``: (R, *x.shape) for stochastic solvers."""
    state = solver.init(x)
    for i in range(len(tables["t"])):
        row = {name: v[i] for name, v in tables.items()}
        x, state = solver.step(predict, x, state, row, None if noise is None else noise[i],
                               prediction_type=prediction_type)
    return x
