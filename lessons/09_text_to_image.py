# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 9 — Text to image: the built-in mini Stable Diffusion, step by step
#
# minidiff ships a complete Stable Diffusion in miniature (`minidiff/assets/mini_sd.safetensors`,
# trained by `minidiff train-mini-sd` on captioned shapes): a KL autoencoder, a CLIP text encoder
# trained contrastively, and a UNet with cross-attention.  This lesson opens it up:
#
# 1. CLIP: 8 pictures x 8 captions and their similarity matrix (the slide of every CLIP talk);
# 2. the prompt's path: tokens -> 77 x 64 text states;
# 3. the seed's noisy latent, one UNet prediction, and guidance $\hat v = v_u + s\,(v_c - v_u)$;
# 4. why guidance works: the implicit classifier, derived and checked on the exact mixture;
# 5. guidance scales 1, 3 and 7.5 side by side;
# 6. the trajectory: the latent decoded at several steps of the reverse chain;
# 7. cross-attention maps: where each word of the prompt looks;
# 8. what SDXL changed.

# %%
import time

import jax
import jax.numpy as jnp
import numpy as np
from _lesson import QUICK, plt, savefig

from minidiff.data import ShapesDataset
from minidiff.diffusion import ddim_step, split_prediction
from minidiff.images import to_unit_range
from minidiff.nn.clip import CLIPTextConfig, CLIPTextModel, ContrastiveCLIP
from minidiff.nn.unet import UNet2DCondition, UNetConfig
from minidiff.pipeline import load_pipeline
from minidiff.train.mini_sd import load_clip

t_start = time.perf_counter()
pipe = load_pipeline()  # no path: the built-in model
print(pipe.name)
print("UNet", pipe.unet_config.block_out_channels, "on latents", pipe.unet_config.sample_size, "x",
      pipe.unet_config.sample_size, "x", pipe.unet_config.in_channels, "| text width", pipe.text_config.hidden_size,
      "| VAE factor", pipe.vae_factor, "| predicts", pipe.scheduler.prediction_type)
count = lambda tree: sum(np.size(a) for a in jax.tree.leaves(tree))  # noqa: E731
for part in ("unet", "vae", "text_encoder"):
    print(f"  {part:13s} {count(pipe.params[part]):>10,d} parameters")

# %% [markdown]
# ## 1. CLIP: which caption goes with which picture?
#
# The text encoder was trained *before* the UNet, as OpenAI's was: a text tower and an image tower
# map captions and pictures into one space, and a batch's similarity matrix is pushed towards the
# identity (`minidiff.train.clip.clip_loss`).  Here are 8 fresh pictures against their 8 captions;
# the diagonal should stand out.

# %%
clip, clip_params = load_clip()
ds = ShapesDataset(seed=123)
images, _, captions = ds.sample(8)
ids = pipe.tokenize(captions)
t_emb = clip.apply({"params": clip_params}, ids, method=ContrastiveCLIP.encode_text)
v_emb = clip.apply({"params": clip_params}, to_unit_range(images), method=ContrastiveCLIP.encode_image)
t_emb = t_emb / jnp.linalg.norm(t_emb, axis=-1, keepdims=True)
v_emb = v_emb / jnp.linalg.norm(v_emb, axis=-1, keepdims=True)
similarity = np.asarray(t_emb @ v_emb.T)  # (captions, pictures), cosines
print("each caption's best picture is its own:", np.mean(similarity.argmax(1) == np.arange(8)))

fig, ax = plt.subplots(figsize=(9, 7.5))
ax.imshow(similarity, cmap="viridis")
for i in range(8):
    for j in range(8):
        ax.text(j, i, f"{similarity[i, j]:.2f}", ha="center", va="center", fontsize=7,
                color="black" if similarity[i, j] > similarity.mean() else "white")
ax.set_yticks(range(8), captions, fontsize=8)
ax.set_xticks([])
for j in range(8):
    ax.imshow(images[j], extent=(j - 0.45, j + 0.45, 8.4, 7.6))  # each picture under its column
ax.set_xlim(-0.5, 7.5)  # (every imshow resets the limits to its own extent)
ax.set_ylim(8.5, -0.5)
ax.set_title("cosine similarity of caption (row) and picture (column) embeddings")
savefig(fig, "09_clip_similarity.png")

# %% [markdown]
# ## 2. From a prompt to the UNet's context
#
# The pipeline's first two steps, exactly as for SD 1.5 (same BPE tokenizer, same 77 slots, pad
# with the end token): ids, then the text tower's *per-token* states — the UNet cross-attends to
# all 77 rows, not only to the pooled vector that CLIP's loss used.

# %%
prompt = "a large red triangle in the top right"
ids = pipe.tokenize([prompt])[0]
n_tokens = int(np.argmax(ids == 49407)) + 1  # up to and including the first end token
words = [pipe.tokenizer.decode([int(i)]).strip() or "<start>" for i in ids[:n_tokens]]
words[0], words[-1] = "<start>", "<end>"
print("ids:", ids[:n_tokens + 2], "...")
print("pieces:", words)
context = np.asarray(pipe.encode_text([prompt]))[0]  # (77, 64)
uncontext = np.asarray(pipe.encode_text([""]))[0]
print("context", context.shape, "| the empty prompt's context is the unconditional branch")

fig, axes = plt.subplots(1, 2, figsize=(12, 3.2))
for ax, c, title in ((axes[0], context, f'"{prompt}"'), (axes[1], uncontext, '"" (unconditional)')):
    ax.imshow(c[:16].T, aspect="auto", cmap="RdBu_r", vmin=-3, vmax=3)
    ax.set_xlabel("token slot (first 16 of 77)")
    ax.set_ylabel("feature")
    ax.set_title(title, fontsize=9)
axes[0].set_xticks(range(n_tokens), words, rotation=60, fontsize=7)
savefig(fig, "09_text_states.png")

# %% [markdown]
# ## 3. One step by hand: x_T, the UNet's two predictions, guidance
#
# The reverse chain below is the pipeline's loop written out in Python (the pipeline compiles the
# same arithmetic into one program per step and calls it `steps` times): at each timestep the UNet runs on the conditional and the
# unconditional context, the outputs are mixed with the guidance scale, and `ddim_step` — the
# formula of lesson 2 — moves the latent.  This model predicts $v$; `split_prediction` turns that
# into $(\hat x_0, \hat\epsilon)$.

# %%
unet = UNet2DCondition(pipe.unet_config)
unet_params = pipe.params["unet"]
apply = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
decode = lambda z: pipe.decode(np.asarray(z))  # noqa: E731  latents -> uint8 pictures
steps = 10 if QUICK else 30
schedule = pipe.scheduler.inference_schedule(steps)
latent_shape = (1, pipe.unet_config.sample_size, pipe.unet_config.sample_size, pipe.unet_config.in_channels)


def guided(x, t, ctx, s):
    both = apply(unet_params, jnp.concatenate([x, x]), jnp.full((2 * len(x),), t), jnp.concatenate([ctx, uncontext[None].repeat(len(x), 0)]))
    out_c, out_u = jnp.split(both, 2)
    return out_u + s * (out_c - out_u), out_c, out_u


def denoise(ctx, s, seed=0, keep=()):
    """DDIM (eta = 0) from the seed's x_T; returns x_0 and the x0-estimates at the steps in ``keep``."""
    x = jax.random.normal(jax.random.key(seed), latent_shape)
    kept = {}
    for i, (t, ab, ab_prev) in enumerate(zip(schedule.timesteps, schedule.alpha_bar_t, schedule.alpha_bar_prev)):
        out, _, _ = guided(x, int(t), ctx, s)
        x, x0_hat = ddim_step(x, out, ab, ab_prev, prediction_type=pipe.scheduler.prediction_type)
        if i in keep:
            kept[i] = x0_hat
    return x, kept


ctx = context[None]
x_T = jax.random.normal(jax.random.key(0), latent_shape)
t0, ab0 = int(schedule.timesteps[0]), schedule.alpha_bar_t[0]
out, out_c, out_u = guided(x_T, t0, ctx, 7.5)
x0_c, _ = split_prediction(out_c, x_T, ab0, pipe.scheduler.prediction_type)
x0_u, _ = split_prediction(out_u, x_T, ab0, pipe.scheduler.prediction_type)
x0_g, _ = split_prediction(out, x_T, ab0, pipe.scheduler.prediction_type)
print(f"first timestep t = {t0}, alpha_bar = {ab0:.2e}")

fig, axes = plt.subplots(1, 5, figsize=(14, 3))
axes[0].imshow(np.asarray(x_T[0, ..., :3]) * 0.25 + 0.5)
axes[0].set_title("x_T: 3 of the 4 latent channels")
for ax, x0, title in ((axes[1], x0_u, "x0 from v_u (empty prompt)"), (axes[2], x0_c, "x0 from v_c (prompt)"),
                      (axes[3], x0_g, "x0 from v_u + 7.5 (v_c - v_u)")):
    ax.imshow(decode(x0)[0])
    ax.set_title(title, fontsize=9)
final, _ = denoise(ctx, 7.5)
axes[4].imshow(decode(final)[0])
axes[4].set_title(f"after {steps} DDIM steps")
for ax in axes:
    ax.axis("off")
fig.suptitle(f'"{prompt}": what the UNet predicts at the very first step', fontsize=10)
savefig(fig, "09_one_step.png")

# %% [markdown]
# ## 4. Why guidance works: the implicit classifier
# Bayes' rule for the caption $c$ given the noisy picture, $p(c \mid x_t) = p(x_t \mid c)\,p(c) / p(x_t)$, has
# a gradient in $x_t$ without $p(c)$:
#
# $$\nabla \log p(c \mid x_t) = \nabla \log p(x_t \mid c) - \nabla \log p(x_t).$$
#
# *Classifier guidance* (Dhariwal & Nichol 2021) samples from $p(x_t \mid c)\,p(c \mid x_t)^{\gamma}$, i.e. follows
# the score $\nabla\log p(x_t \mid c) + \gamma\,\nabla\log p(c \mid x_t)$, with a separately trained classifier.
# Substitute Bayes' gradient and no classifier is left:
#
# $$\nabla\log p(x_t \mid c) + \gamma\big(\nabla\log p(x_t \mid c) - \nabla\log p(x_t)\big)
#   = (1+\gamma)\,\nabla\log p(x_t \mid c) - \gamma\,\nabla\log p(x_t).$$
#
# A noise predictor is a scaled score, $\varepsilon(x_t) = -\sqrt{1-\bar\alpha_t}\,\nabla\log p_t(x_t)$ (lesson 2's
# oracle is built that way), so with $s = 1 + \gamma$ this is exactly
# $\hat\varepsilon = \varepsilon_u + s(\varepsilon_c - \varepsilon_u)$ — *classifier-free* guidance (Ho & Salimans 2022): one
# network, trained with the caption sometimes dropped, supplies both scores, and the "classifier" is
# implicit in their difference.  (The same holds for $v$, a fixed linear mix of $\varepsilon$ and $x_t$.)
#
# Checked below on lesson 2's mixture, where every density is exact: the class is the component.
# The gradient of the log of the exact classifier $p(k \mid x_t)$ (the noised mixture's responsibility,
# differentiated numerically) equals the difference of the two exact scores, and the CFG prediction
# equals the classifier-guided one.  Sampling with it (the figure) shows what guidance buys and
# costs: $s = 1$ draws the component faithfully; $s = 4$ pushes the samples to where the classifier
# is surest, away from the other components, and so past the edge of the component itself: a
# narrower, shifted distribution, not the class's.  The colour drift at $s = 7.5$ in §5 is the same
# overshoot.

# %%
from minidiff.data import TOY_MIXTURE as gm  # noqa: E402
from minidiff.diffusion import InferenceSchedule, NoiseSchedule, sample  # noqa: E402
from minidiff.diffusion.oracle import GaussianMixture  # noqa: E402

toy = NoiseSchedule.from_name("linear")
k_req, t_chk = 2, 400
ab = toy.alpha_bar[t_chk]
component = GaussianMixture([1.0], gm.means[k_req:k_req + 1], gm.covariances[k_req:k_req + 1])
x_chk = np.random.default_rng(1).standard_normal((5, 2)) * 1.5
log_classifier = lambda x: np.log(gm.noised(ab).responsibilities(x)[:, k_req])  # noqa: E731
h = 1e-5
grad_numeric = np.stack([(log_classifier(x_chk + h * e) - log_classifier(x_chk - h * e)) / (2 * h) for e in np.eye(2)], 1)
grad_bayes = component.noised(ab).score(x_chk) - gm.noised(ab).score(x_chk)
print("max |grad log p(k|x) - (score_c - score_u)| =", np.abs(grad_numeric - grad_bayes).max())
assert np.allclose(grad_numeric, grad_bayes, atol=1e-5)
s_chk = 3.0
eps_c, eps_u = component.eps_oracle(x_chk, ab), gm.eps_oracle(x_chk, ab)
eps_cfg = eps_u + s_chk * (eps_c - eps_u)
eps_classifier_guided = -np.sqrt(1 - ab) * (component.noised(ab).score(x_chk) + (s_chk - 1) * grad_numeric)
assert np.allclose(eps_cfg, eps_classifier_guided, atol=1e-4)

fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharex=True, sharey=True)
data_pts, _ = gm.sample(2000, np.random.default_rng(2))
isc = InferenceSchedule.create(toy, 50)
for ax, s_g in zip(axes, (0.0, 1.0, 4.0)):
    eps_guided = lambda x, t, s_g=s_g: (gm.eps_oracle(x, toy.alpha_bar[t]) + s_g * (  # noqa: E731
        component.eps_oracle(x, toy.alpha_bar[t]) - gm.eps_oracle(x, toy.alpha_bar[t])))
    pts = sample(eps_guided, np.random.default_rng(3).standard_normal((1000, 2)), isc, "ddim")
    ax.scatter(data_pts[:, 0], data_pts[:, 1], s=1, color="0.8")
    ax.scatter(pts[:, 0], pts[:, 1], s=2, color="C3")
    label = "unconditional" if s_g == 0 else ("conditional" if s_g == 1 else "guided")
    ax.set_title(f"s = {s_g:g} ({label}), class = component {k_req}", fontsize=9)
    ax.set_aspect("equal")
savefig(fig, "09_guidance_implicit_classifier.png")

# %% [markdown]
# ## 5. Guidance scale: 1 vs 3 vs 7.5
#
# $s = 1$ is the plain conditional model; larger $s$ pushes the sample away from what the empty
# prompt would give and towards what the prompt adds.  On this model position holds at every
# scale; moderate guidance ($s = 3$) helps most with the *shape*, and at $s = 7.5$ the
# extrapolation starts to overshoot: colours drift and saturate (the README measures all three
# scales over 216 samples with the shapes classifier).

# %%
prompts = ["a large red triangle in the top right", "a small blue circle at the bottom",
           "a large yellow square on the left", "a small green triangle in the center"]
if QUICK:
    prompts = prompts[:2]
scales = (1.0, 3.0, 7.5)
fig, axes = plt.subplots(len(prompts), len(scales) * 4, figsize=(len(scales) * 4 * 1.1, len(prompts) * 1.3))
for r, p in enumerate(prompts):
    for c, s in enumerate(scales):
        pics = pipe([p], num_images_per_prompt=4, steps=steps, guidance_scale=s, seed=r)
        for k in range(4):
            ax = axes[r, 4 * c + k]
            ax.imshow(pics[k])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and k == 0:
                ax.set_title(f"guidance {s}", fontsize=9, loc="left")
    axes[r, 0].set_ylabel(p.replace(" in the ", "\n").replace(" on the ", "\n").replace(" at the ", "\n"),
                          fontsize=6, rotation=0, ha="right", va="center")
savefig(fig, "09_guidance_scales.png")

# %% [markdown]
# ## 6. The trajectory
#
# The x0-estimate $\hat x_0$ decoded at several steps of the chain: colour and place are decided
# in the first few steps, the outline later.

# %%
keep = sorted({0, 1, 2, steps // 4, steps // 2, steps - 1})
_, kept = denoise(ctx, 7.5, keep=keep)
fig, axes = plt.subplots(1, len(keep), figsize=(2 * len(keep), 2.3))
for ax, i in zip(axes, keep):
    ax.imshow(decode(kept[i])[0])
    ax.set_title(f"step {i + 1}/{steps}\nt = {schedule.timesteps[i]}", fontsize=8)
    ax.axis("off")
savefig(fig, "09_trajectory.png")

# %% [markdown]
# ## 7. Cross-attention: where does each word look?
#
# Every `Transformer2D` block's second attention (`attn2`) lets each latent position (query)
# attend over the 77 text states (keys).  Asking Flax for the "intermediates" collection makes
# the attention layers record their weights (`sow`); we average them over heads, layers and the
# last few steps, and show one map per word, upsampled to the picture.

# %%
def attention_maps(x, t, ctx):
    _, state = unet.apply({"params": unet_params}, x, jnp.full((1,), t), ctx, mutable=["intermediates"])
    maps = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
        names = [getattr(k, "key", "") for k in path]
        if "attn2" in names:
            probs = leaf.mean(axis=1)[0]  # (Lq, 77): average over heads
            side = int(round(np.sqrt(probs.shape[0])))
            m = probs.reshape(side, side, -1)
            m = jax.image.resize(m, (latent_shape[1], latent_shape[2], m.shape[-1]), "linear")
            maps.append(np.asarray(m))
    return np.mean(maps, axis=0)  # (h, w, 77)


x = jax.random.normal(jax.random.key(0), latent_shape)
acc = 0
for i, (t, ab, ab_prev) in enumerate(zip(schedule.timesteps, schedule.alpha_bar_t, schedule.alpha_bar_prev)):
    out, _, _ = guided(x, int(t), ctx, 7.5)
    if i >= steps // 2:
        acc = acc + attention_maps(x, int(t), ctx)
    x, _ = ddim_step(x, out, ab, ab_prev, prediction_type=pipe.scheduler.prediction_type)
picture = decode(x)[0]
fig, axes = plt.subplots(1, n_tokens + 1, figsize=(1.7 * (n_tokens + 1), 2.2))
axes[0].imshow(picture)
axes[0].set_title("sample", fontsize=8)
for k in range(n_tokens):
    m = acc[..., k] / acc[..., k].max()
    axes[k + 1].imshow(np.kron(m, np.ones((pipe.vae_factor, pipe.vae_factor))), cmap="magma", vmin=0, vmax=1)
    axes[k + 1].set_title(words[k], fontsize=8)
for ax in axes:
    ax.axis("off")
fig.suptitle(f'"{prompt}": cross-attention weight of each token, averaged over heads, layers and late steps',
             fontsize=9)
savefig(fig, "09_cross_attention.png")

# %% [markdown]
# ## 8. What SDXL changed
#
# Stable Diffusion XL (Podell et al. 2023) keeps the recipe -- a VAE, a text-conditioned UNet
# predicting eps, classifier-free guidance -- and changes four things:
#
# 1. **Two text encoders.**  The context is the penultimate hidden states of OpenAI CLIP ViT-L
#    (768 wide) and of OpenCLIP ViT-bigG (1280 wide) concatenated: 77 x 2048.
# 2. **Pooled text.**  bigG's final-LayerNorm state at the end token, through its `text_projection`
#    (a 1280 x 1280 matrix, no bias), conditions the network globally, like the timestep does.
# 3. **Micro-conditioning.**  Six numbers -- the training picture's original size, the crop's top-left
#    corner and the target size -- each get a 256-dim sinusoidal embedding; with the pooled text they
#    form a 2816-vector that an MLP (`add_embedding`) maps to the time-embedding width, added to
#    temb:  temb = MLP(sin/cos(t)) + MLP([pooled, sin/cos(h0), sin/cos(w0), sin/cos(top), ...]).
#    At sampling time one asks for an uncropped, high-resolution picture: (1024, 1024, 0, 0, 1024, 1024).
# 4. **A different UNet shape.**  Three levels instead of four (320, 640, 1280 channels), no attention
#    at the highest resolution, and the depth moved into the transformers: 1, 2 and 10 transformer
#    blocks per attention layer (10 in the mid block).  The VAE is SD's architecture retrained
#    (scaling factor 0.13025); it overflows in float16, so minidiff runs it in float32.
#
# The parameter count per block, from `jax.eval_shape` (shapes only: no memory is allocated):

# %%
def unet_shapes(cfg):
    added = None if cfg.addition_embed_type is None else {"text_embeds": jnp.zeros((1, cfg.pooled_text_dim)),
                                                          "time_ids": jnp.zeros((1, 6))}
    args = (jnp.zeros((1, 8, 8, 4)), jnp.zeros(1), jnp.zeros((1, 1, cfg.cross_attention_dim)))
    return jax.eval_shape(lambda: UNet2DCondition(cfg).init(jax.random.key(0), *args, added_cond=added))["params"]


def count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


sd15, sdxl = unet_shapes(UNetConfig.sd15()), unet_shapes(UNetConfig.sdxl())
print(f"{'block':<18}{'SD 1.5':>15}{'SDXL':>15}")
for name in sorted(set(sd15) | set(sdxl), key=lambda n: (n.split("_")[0] not in ("time", "add", "conv"), n)):
    print(f"{name:<18}{count(sd15.get(name, {})):>15,}{count(sdxl.get(name, {})):>15,}")
print(f"{'UNet':<18}{count(sd15):>15,}{count(sdxl):>15,}")
for what, cfg in (("CLIP ViT-L text", CLIPTextConfig.sd15()), ("OpenCLIP bigG text", CLIPTextConfig.sdxl_g())):
    n = count(jax.eval_shape(lambda cfg=cfg: CLIPTextModel(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))))
    print(f"{what:<18}{n:>30,}")

# %% [markdown]
# The UNet triples (most of it in the ten-deep transformers of the two low-resolution levels), and the
# text side grows from 123 M to 818 M parameters.  `minidiff.pipeline.sdxl_time_ids` builds the six
# numbers; `StableDiffusion(...)(prompt, original_size=..., crops_coords_top_left=..., target_size=...)`
# passes them for an SDXL model (README, "SDXL").

# %%
print(f"lesson 9 took {time.perf_counter() - t_start:.0f} s")

# %% [markdown]
# ## Exercises
# Solutions, each checked by the test suite: `lessons/solutions/09_text_to_image.py`.
#
# 1. **Guidance in v or in epsilon?** This model predicts v; §4 derived guidance for $\varepsilon$.  Show that
#    mixing the two v predictions, $v_u + s(v_c - v_u)$, and then converting to $\varepsilon$ gives the same
#    as converting each to $\varepsilon$ first and mixing those (`split_prediction`), on one real UNet call.
#    Is the same true for $\hat x_0$?
# 2. **What goes wrong at s = 20?** Draw the same prompts at guidance 1, 3, 7.5 and 20 and measure the
#    pictures: how bright the (black) background gets and how many channel values are clipped at 255.

