# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 6 — DALL-E: writing a picture as tokens, after the caption
#
# Lesson 5 turned every picture into an 8x8 grid of codebook indices.  A picture is now a
# sentence of 64 "words" from a vocabulary of 512, and generating pictures becomes language
# modelling (Ramesh et al. 2021): one transformer reads
#
#     caption tokens (padded to a fixed length)  ++  image tokens in raster order
#
# and predicts each token from the ones before it.  To draw "a blue square in the bottom right",
# feed the caption and sample the 64 image tokens one at a time; the VQ-VAE decoder paints them.
#
# The details this lesson shows, each from `minidiff.nn.dalle`:
#
# 1. the two vocabularies and the padding: a short caption is filled with pad tokens, and every
#    padded *slot* has its own learned pad embedding;
# 2. positions: text tokens get a position embedding, image tokens a row plus a column embedding;
# 3. sparse attention: every image token sees the whole caption, and among image tokens a layer
#    sees either its row (the previous 8 tokens), its column, or a small neighbourhood;
# 4. sampling with a key-value cache (one network step per token), temperature, top-k, and
#    classifier-free guidance on the logits.

# %%
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _lesson import QUICK, plt, savefig, trained_run

from minidiff.data import CaptionTokenizer
from minidiff.nn import dalle
from minidiff.nn.vqvae import VQVAE
from minidiff.train.dalle import DalleTrainConfig, DalleTrainer, evaluate_dalle, load_dalle, sampling_speed
from minidiff.images import image_grid
from minidiff.train.vqvae import VQVAETrainConfig, VQVAETrainer


# %% [markdown]
# ## 1. The sequence
# The caption "a red circle on the left" has 6 words; the text part has 10 slots, so 4 pads.

# %%
tok = CaptionTokenizer(length=10)
caption = "a red circle on the left"
ids = tok.encode([caption])[0]
print("vocabulary:", " ".join(tok.words))
print("ids:", ids.tolist())

config = dalle.DalleConfig(text_vocab=tok.vocab_size, text_len=10, num_codes=512, grid=8)
fig, ax = plt.subplots(figsize=(15, 2.2))
colors = ["tab:blue" if i else "lightgrey" for i in ids] + ["tab:orange"] * config.image_len
ax.bar(np.arange(config.seq_len), 1, color=colors, width=0.9)
for i, t in enumerate(ids):
    ax.text(i, 0.5, tok.words[t] if t else f"pad{i}", rotation=90, ha="center", va="center", fontsize=8)
for a in range(config.image_len):
    ax.text(config.text_len + a, 0.5, f"{a // 8},{a % 8}", rotation=90, ha="center", va="center", fontsize=6)
ax.set(yticks=[], xlabel="sequence position",
       title="text slots (words, then one distinct pad per empty slot) | 64 image tokens (row, column)")
savefig(fig, "06_sequence.png")

# %% [markdown]
# ## 2. The attention masks
# White = may attend.  Rows are queries, columns keys, in sequence order; the image block's
# patterns repeat every 8 positions (one image row).  Our small model alternates row and column
# masks (`DalleConfig.attention = ("row", "column")`); a row layer followed by a column layer
# already reaches every earlier token, at a fraction of the full causal mask's cost.  DALL-E's own
# pattern is different (section 2b).

# %%
fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
for ax, pattern in zip(axes, dalle.PATTERNS):
    m = dalle.attention_mask(pattern, config.text_len, config.grid)
    ax.imshow(m, cmap="gray", interpolation="nearest")
    ax.axhline(config.text_len - 0.5, color="tab:blue")
    ax.axvline(config.text_len - 0.5, color="tab:blue")
    ax.set_title(f"{pattern}: {m[config.text_len:].sum() / dalle.attention_mask('causal', 10, 8)[10:].sum():.0%}"
                 " of causal")
    ax.set_xticks([])
    ax.set_yticks([])
savefig(fig, "06_masks.png")

# %% [markdown]
# What one image token — row 4, column 3 — sees in each pattern, drawn on the 8x8 grid
# (it also sees every caption token):

# %%
a = 4 * 8 + 3
fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
for ax, pattern in zip(axes, dalle.PATTERNS):
    m = dalle.attention_mask(pattern, config.text_len, config.grid)[config.text_len + a, config.text_len:]
    picture = m.reshape(8, 8).astype(float)
    picture[4, 3] = 0.5
    ax.imshow(picture, cmap="gray", vmin=0, vmax=1)
    ax.set_title(pattern)
    ax.axis("off")
savefig(fig, "06_what_one_token_sees.png")

# %% [markdown]
# ## 2b. DALL-E at its real scale
# The model of this lesson is a miniature.  `DalleConfig.paper()` holds the published numbers
# (Ramesh et al. 2021, section 2 and appendix B.1), and `jax.eval_shape` counts its parameters
# without allocating them:
#
# | | this lesson | DALL-E |
# |---|---|---|
# | text | 10 slots, a 24-word vocabulary | 256 BPE tokens, vocabulary 16,384 |
# | image | 8 x 8 = 64 codes of a 512-code VQ-VAE | 32 x 32 = 1,024 codes of an 8,192-code dVAE (256 x 256 pixels) |
# | transformer | 6 layers, width 192, 6 heads | 64 layers, 62 heads of 64: width 3,968 |
# | image attention | row, column, row, column, ... | column in layers i with (i - 2) mod 4 = 0, row in the others, convolutional in the last |
# | loss | text 1/8, image 7/8 | the same |
#
# Both pad every empty text slot with its own learned pad token, as here.  DALL-E's image tokens
# come from a *discrete VAE* trained with the Gumbel-softmax relaxation (a soft, temperature-annealed
# mixture of codebook vectors, no straight-through estimator and no dead-code restarts) instead of
# lesson 5's VQ-VAE; the transformer does not care how the codes were made.

# %%
paper = dalle.DalleConfig.paper()
paper_shapes = jax.eval_shape(lambda: dalle.DalleTransformer(paper).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
n_paper = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(paper_shapes))
print(f"DALL-E: {paper.layers} layers, width {paper.width}, {paper.text_len} + {paper.image_len} positions: "
      f"{n_paper / 1e9:.2f} billion parameters (the paper: 12 billion)")
kinds = {"row": 0, "column": 1, "conv": 2}
fig, ax = plt.subplots(figsize=(14, 1.6))
ax.imshow([[kinds[paper.layer_pattern(k)] for k in range(paper.layers)]], cmap="Set2", vmin=0, vmax=7, aspect="auto")
for k in range(paper.layers):
    ax.text(k, 0, paper.layer_pattern(k)[:3], ha="center", va="center", fontsize=6, rotation=90)
ax.set(yticks=[], xlabel="layer i - 1", title=f"DALL-E's image attention by layer: {sum(paper.layer_pattern(k) == 'column' for k in range(64))} "
       "column, 47 row, the last convolutional")
savefig(fig, "06_dalle_layer_patterns.png")

# %% [markdown]
# ## 3. Training
# `minidiff train-vqvae` then `minidiff train-dalle --batch 32` (about 45 minutes on one core); the
# lesson uses `runs/dalle` when it exists, else the small copy of that run shipped with the lessons
# (`lessons/checkpoints/dalle`, float16 weights; `python lessons/checkpoints/build.py` remakes it).
# Without either, quick mode trains a tiny pair for a few steps, only to show the mechanics (its
# pictures are noise).  Each step draws fresh pictures and encodes them to codes
# with the frozen VQ-VAE; half the captions leave out the size word ("a red circle on the left",
# the caption above: a model that only ever saw sizes would not know what to do with it) and 10 %
# are empty (all pads), so the same model also learns p(image) for guidance.

# %%
run = trained_run("dalle")
if run is not None:
    from minidiff.train.checkpoint import load_checkpoint

    generator = load_dalle(run)
    history = load_checkpoint(run)[2]["history"]
elif QUICK:
    import tempfile

    vq_dir = Path(tempfile.mkdtemp()) / "vqvae"
    VQVAETrainer(VQVAETrainConfig(steps=10, batch=8, model={"channels": [8, 16, 16], "groups": 4, "num_codes": 64,
                                                            "latent_dim": 8}), vq_dir).train(progress=False)
    trainer = DalleTrainer(DalleTrainConfig(vqvae=str(vq_dir), steps=10, batch=8, log_every=5,
                                            model={"width": 32, "layers": 2, "heads": 2}))
    trainer.train(progress=False)
    generator, history = trainer.generator(), trainer.history
else:
    raise SystemExit("train the models first: minidiff train-vqvae && minidiff train-dalle --batch 32 (about 45 minutes on one core)")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(history["step"], history["image"], label="image tokens")
ax.plot(history["step"], history["text"], label="text tokens")
ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="training loss (7/8 image + 1/8 text)")
ax.legend()
savefig(fig, "06_loss.png")

# %% [markdown]
# ## 4. Sampling, token by token
# The grid fills in raster order.  Tokens not yet drawn are shown as the background code (the
# code of an all-black patch), so each frame is a decodable picture.

# %%
prompt = "a large yellow triangle in the top right"
images, codes = generator.generate([prompt], seed=0, return_codes=True)  # guidance 2, the default
black = np.asarray(generator.vqvae.apply(generator.vq_variables, -jnp.ones((1, 32, 32, 3)), method=VQVAE.encode)[1])
frames = [0, 8, 16, 24, 32, 40, 48, 56, 64]
partial = []
for n in frames:
    grid = black.reshape(-1).copy()
    grid[:n] = codes[0, :n]
    partial.append(grid.reshape(1, 8, 8))
decoded = generator.vqvae.apply(generator.vq_variables, jnp.asarray(np.concatenate(partial)),
                                method=VQVAE.decode_indices)
decoded = np.clip((np.asarray(decoded) + 1) * 127.5, 0, 255).astype(np.uint8)
fig, axes = plt.subplots(1, len(frames), figsize=(2 * len(frames), 2.4))
for ax, img, n in zip(axes, decoded, frames):
    ax.imshow(img)
    ax.set_title(f"{n} tokens", fontsize=9)
    ax.axis("off")
fig.suptitle(repr(prompt))
savefig(fig, "06_token_by_token.png")

# %% [markdown]
# ## 5. Guidance, and what the classifier says
# Classifier-free guidance on the logits, $\ell = \ell_u + s(\ell_c - \ell_u)$, where $\ell_u$ reads
# an empty caption (all pads: 10% of the training captions were dropped so the model knows it).
# Each row one prompt, each column another seed; s = 1 is plain sampling, s = 2 the default, and
# s = 4 shows what too much does: the extrapolated logits also favour codes that the plain model
# finds unlikely (it never had to rank them well), and the pictures break up.

# %%
prompts = ["a small red circle in the top left", "a large blue square at the bottom",
           "a small green triangle in the center", "a large yellow circle on the right"]
scales_shown = (1.0, 2.0, 4.0)
fig, axes = plt.subplots(len(prompts), len(scales_shown), figsize=(16, 0.7 + 1.0 * len(prompts)), squeeze=False)
for c, s in enumerate(scales_shown):
    imgs = generator.generate([p for p in prompts for _ in range(6)], seed=1, guidance_scale=s)
    for r, p in enumerate(prompts):
        ax = axes[r, c]
        ax.imshow(image_grid(imgs[6 * r:6 * r + 6], 6, pad=2, fill=255))  # white lines between the black tiles
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0:
            ax.set_title(f"guidance {s}")
        if c == 0:
            ax.set_ylabel(p.replace(" in the ", "\nin the ").replace(" on the ", "\non the ").replace(" at the ", "\nat the "),
                          rotation=0, ha="right", va="center", fontsize=9)
fig.suptitle("DALL-E-style transformer: one prompt per row, six seeds each", fontsize=10)
fig.subplots_adjust(hspace=0.05, wspace=0.05)
savefig(fig, "06_dalle_guidance.png")

# %% [markdown]
# The shapes classifier reads every picture drawn for the 108 evaluation prompts (each shape, colour
# and position once): how often are position, colour and shape all as asked, at each scale?

# %%
start = time.perf_counter()
scales = (1.0, 1.5, 2.0, 3.0)
if not QUICK:  # (the judge trains ~1 min once)
    sweep = [evaluate_dalle(generator, samples_per_prompt=2, guidance_scale=s) for s in scales]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("position", "color", "shape", "joint"):
        ax.plot(scales, [100 * m[f"accuracy_{key}"] for m in sweep], "o-", label="all three" if key == "joint" else key)
    ax.set(xlabel="guidance scale s", ylabel="% of pictures as asked", title="prompt following vs guidance")
    ax.legend()
    savefig(fig, "06_guidance_sweep.png")
metrics = {} if QUICK else sweep[scales.index(2.0)]
metrics.update(sampling_speed(generator, n=8 if QUICK else 32))
for key, value in metrics.items():
    print(f"  {key:24s} {value:.4g}" if isinstance(value, float) else f"  {key:24s} {value}")
print(f"({time.perf_counter() - start:.0f} s)")

# %% [markdown]
# ## Exercises
# Solutions, each checked by the test suite: `lessons/solutions/06_dalle.py`.
#
# 1. **What sparse attention saves.** For DALL-E's 32 x 32 grid after 256 text positions, what fraction
#    of the causal mask's (query, key) pairs among image tokens does each of the row, column and conv
#    masks keep (`attention_mask`)?  How many image-to-image pairs does the full causal mask have?
# 2. **Temperature and top-k.** Sampling reads `filter_logits(logits, temperature, top_k)`.  Measure the
#    entropy of the next-token distribution for temperatures 0.5, 1, 2 and for top-k 512, 64, 8 on the
#    logits of a peaked distribution.  Which knob removes the rare tokens entirely?
