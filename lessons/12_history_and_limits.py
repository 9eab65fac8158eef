# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 12 — Where this came from, and what it cannot do
#
# The lessons built the pieces one by one.  This one puts them on a time line, with the paper that
# introduced each, and ends with what text-to-image models of this family still get wrong — some of
# it measurable on the built-in mini model.
#
# ## 1. A short history (the papers, in the order they appeared)
#
# | year | model / idea | what it added | in minidiff |
# |---|---|---|---|
# | 2014 | GAN (Goodfellow et al.) | a generator trained against a discriminator: sharp samples, unstable training, mode collapse | — (VQGAN's discriminator, below) |
# | 2015 | diffusion probabilistic models (Sohl-Dickstein et al.) | learn to reverse a fixed noising chain | lesson 1 |
# | 2017 | VQ-VAE (van den Oord et al.) | discrete latent codes, nearest-codebook quantization, straight-through | lesson 5 |
# | 2017 | Transformer (Vaswani et al.) | attention; sinusoidal positions | lessons 3, 6, 8 |
# | 2019 | sparse transformers (Child et al.) | row / column attention masks | lesson 6 |
# | 2020 | DDPM (Ho et al.) | the simple epsilon loss; samples rivalling GANs | lessons 2, 4 |
# | 2020 | DDIM (Song, Meng, Ermon) | a deterministic sampler with few steps; inversion | lessons 2, 11 |
# | 2021 | DALL-E (Ramesh et al.) | text and image tokens in one autoregressive transformer, 12 B parameters | lesson 6 |
# | 2021 | CLIP (Radford et al.) | text and image embeddings from 400 M captioned images, contrastively | lessons 8, 9 |
# | 2020 | VQGAN (Esser et al.) | VQ-VAE + patch discriminator + perceptual loss: sharp codes | — (not built) |
# | 2021 | classifier guidance (Dhariwal & Nichol) | "diffusion models beat GANs" | lesson 9 §4 |
# | 2021 | classifier-free guidance (Ho & Salimans; a workshop paper, on arXiv in 2022) | guidance without a classifier | lesson 9 |
# | 2021 | LoRA (Hu et al.) | low-rank fine-tuning | lesson 10 |
# | 2021 | GLIDE (Nichol et al.) | text-guided pixel diffusion with classifier-free guidance | — |
# | 2021 | latent diffusion (Rombach et al.) | diffusion in a VAE's latent space, cross-attention to text | lessons 7, 9 |
# | 2022 | DALL-E 2 / unCLIP (Ramesh et al.) | a prior from CLIP text to CLIP image embeddings, then a diffusion decoder | — |
# | 2022 | Imagen (Saharia et al.) | a frozen T5 text encoder; scale the text model more than the UNet | — |
# | 2022 | DPM-Solver (Lu et al.), Karras et al. | samplers as ODE solvers; 20 steps | lesson 11 |
# | 2022 | textual inversion (Gal et al.), DreamBooth (Ruiz et al.) | teaching a model a subject | lesson 10 |
# | 2022 | Stable Diffusion 1 and 2 (CompVis, Stability AI, Runway) | latent diffusion trained on LAION, weights released | the whole library |
# | 2023 | SDXL (Podell et al.) | a 2.6 B UNet, two text encoders, size and crop conditioning | lesson 9 §8 |
# | 2023 | latent consistency models (Luo et al.) | 2-8 step sampling by distillation | `sampler="lcm"` |
#
# (Years are those of the first arXiv version, or of the first publication where that came earlier.)

# %%
from _lesson import QUICK, plt, savefig

events = [(2014.5, "GAN"), (2015.2, "diffusion (Sohl-Dickstein)"), (2017.9, "VQ-VAE"), (2017.5, "Transformer"),
          (2019.3, "sparse transformer"), (2020.5, "DDPM"), (2020.8, "DDIM"), (2021.1, "DALL-E"), (2021.05, "CLIP"),
          (2020.95, "VQGAN"), (2021.4, "classifier guidance"), (2021.5, "LoRA"), (2021.95, "GLIDE"),
          (2021.97, "latent diffusion"), (2021.9, "classifier-free guidance"), (2022.3, "DALL-E 2"),
          (2022.4, "Imagen"), (2022.6, "Stable Diffusion 1"), (2022.9, "Stable Diffusion 2"), (2022.7, "DreamBooth"),
          (2022.6, "textual inversion"), (2022.5, "DPM-Solver"), (2023.55, "SDXL"), (2023.8, "LCM")]
kinds = {"GAN": "C3", "VQ-VAE": "C1", "VQGAN": "C1", "DALL-E": "C1", "sparse transformer": "C1",
         "Transformer": "C1", "CLIP": "C2", "LoRA": "C7", "textual inversion": "C7", "DreamBooth": "C7"}
events.sort()
fig, ax = plt.subplots(figsize=(10, 0.3 * len(events) + 1))
for k, (when, name) in enumerate(events):  # one row per event, oldest at the top
    colour = kinds.get(name, "C0")
    ax.plot([2014, when], [k, k], color=colour, lw=0.5, alpha=0.4)
    ax.plot(when, k, "o", color=colour, ms=5)
    ax.text(when + 0.1, k, name, va="center", fontsize=8, color=colour)
ax.set(xlim=(2014, 2025.2), ylim=(len(events) - 0.5, -0.5), yticks=[], xticks=range(2014, 2025),
       xlabel="year (first arXiv version, approximate month)",
       title="the road to Stable Diffusion: tokens and transformers (orange), contrastive text (green),\n"
             "diffusion (blue), fine-tuning (grey), GANs (red)")
for side in ("left", "right", "top"):
    ax.spines[side].set_visible(False)
savefig(fig, "12_history.png")

# %% [markdown]
# ## 2. What these models still get wrong
#
# - **Counting, relations, binding.** "Three red cubes left of a blue sphere" is often drawn with the
#   wrong count, the wrong side, or the colours swapped: the text encoder's pooled meaning and a
#   UNet that reads it through attention do not enforce structure (Imagen and SDXL improved this with
#   larger text encoders; it is not solved).
# - **Text in images, hands, small faces.** Letters and fingers are high-frequency structure the
#   VAE's 8x compression and the training data render poorly.
# - **The data's biases and contents.** Trained on scraped image-text pairs (LAION-5B), the models
#   reproduce its stereotypes and can memorise and reproduce training images (Carlini et al. 2023).
# - **Guidance trades diversity for fidelity.** Lesson 9 §4: larger s narrows and shifts the
#   distribution; too large burns the picture (lesson 9, exercise 2).
# - **Cost.** Every picture is 20-50 network evaluations (x2 with guidance); a DALL-E picture is 1,024
#   sequential transformer passes.  Samplers (lesson 11) and distillation (LCM) cut the steps.
# - **The noise schedule's leftover signal.** SD's schedule keeps a little of $x_0$ at t = T
#   (lesson 1, exercise 2), so it cannot make very dark or very bright pictures (Lin et al. 2023).
#
# One of these, measured on the built-in mini model: it never saw a number word, a plural or two
# objects in one picture, so "two red circles" comes out as one red circle (the unknown words are
# ignored, and the pipeline warns about them); the count below is of connected coloured regions.

# %%
import warnings  # noqa: E402

from skimage.measure import label  # noqa: E402

from minidiff.pipeline import load_pipeline  # noqa: E402


def count_shapes(im) -> int:
    """Connected regions of clearly coloured pixels (at least 6 of them) on the black background."""
    regions = label(im.max(-1) > 80, connectivity=2)
    return int(sum((regions == k).sum() >= 6 for k in range(1, regions.max() + 1)))


pipe = load_pipeline()
prompts = ["a red circle in the center", "two red circles in the center"]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    images = pipe(prompts, num_images_per_prompt=4 if QUICK else 16, steps=6 if QUICK else 30, seed=0)
unknown = sorted({str(w.message) for w in caught if "unknown" in str(w.message)})
print("warnings:", unknown)
assert unknown, "the pipeline names the words the model never saw"
counts = {p: [count_shapes(im) for im in images[i * len(images) // 2:(i + 1) * len(images) // 2]]
          for i, p in enumerate(prompts)}
for p, c in counts.items():
    print(f"{p!r}: shapes counted per picture {c}")
fig, axes = plt.subplots(2, 4, figsize=(8, 4.4))
for r, p in enumerate(prompts):
    for c in range(4):
        axes[r, c].imshow(images[r * len(images) // 2 + c])
        axes[r, c].axis("off")
    axes[r, 0].set_title(p, fontsize=9, loc="left")
fig.suptitle("the built-in model cannot count: it never saw a number word (the word is ignored)", fontsize=9)
savefig(fig, "12_cannot_count.png")

# %% [markdown]
# **Sources.** Goodfellow et al. 2014 (arXiv:1406.2661); Sohl-Dickstein et al. 2015 (1503.03585); van den
# Oord et al. 2017 (1711.00937); Vaswani et al. 2017 (1706.03762); Child et al. 2019 (1904.10509); Ho et
# al. 2020 (2006.11239); Song et al. 2020 (2010.02502); Ramesh et al. 2021 (2102.12092); Radford et al.
# 2021 (2103.00020); Esser et al. 2020 (2012.09841); Dhariwal & Nichol 2021 (2105.05233); Ho & Salimans
# 2022 (2207.12598); Hu et al. 2021 (2106.09685); Nichol et al. 2021 (2112.10741); Rombach et al. 2021
# (2112.10752); Ramesh et al. 2022 (2204.06125); Saharia et al. 2022 (2205.11487); Lu et al. 2022
# (2206.00927); Karras et al. 2022 (2206.00364); Gal et al. 2022 (2208.01618); Ruiz et al. 2022
# (2208.12242); Podell et al. 2023 (2307.01952); Luo et al. 2023 (2310.04378); Carlini et al. 2023
# (2301.13188); Lin et al. 2023 (2305.08891).

# %% [markdown]
# ## Exercises
# Solutions, each checked by the test suite: `lessons/solutions/12_history_and_limits.py`.
#
# 1. **Two roads, in parameters.** Count DALL-E's parameters (`DalleConfig.paper()`) and Stable
#    Diffusion 1.5's (UNet, VAE and text encoder: `UNetConfig.sd15()`, `AutoencoderKLConfig.sd()`,
#    `CLIPTextConfig.sd15()`) with `jax.eval_shape`.  How many times larger is DALL-E?
# 2. **Two roads, in sequential network passes.** A DALL-E picture is generated one image token at a
#    time (with the key-value cache, one transformer pass per token); an SD picture with a 20-step
#    sampler and classifier-free guidance is 20 UNet passes on a batch of 2.  How many *sequential*
#    passes does each need, and which part of each pass grows with the picture's size?

