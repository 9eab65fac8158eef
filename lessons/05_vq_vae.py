# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 5 — VQ-VAE: pictures as grids of codebook indices
#
# A VQ-VAE (van den Oord et al. 2017) squeezes an image through a *discrete* bottleneck.  An encoder
# turns the 32x32 picture into an 8x8 grid of vectors $z \in \mathbb R^D$; each vector is replaced
# by its nearest entry of a learned codebook $e_1, \dots, e_K$,
#
# $$k = \arg\min_j \|z - e_j\|^2, \qquad z_q = e_k,$$
#
# and a decoder paints the picture back from the $z_q$.  The picture *is* now 64 integers in
# $\{0..K-1\}$: the vocabulary that lesson 6's transformer writes, like words.
#
# Three ideas make it train:
#
# 1. **Nearest code, cheaply**: $\|z - e\|^2 = \|z\|^2 - 2 z\cdot e + \|e\|^2$ — one matrix product,
#    never an $N \times K \times D$ array (`minidiff.vq.squared_distances`).
# 2. **Straight-through gradients**: argmin has no gradient, so the decoder's gradient with respect
#    to $z_q$ is handed to $z$ unchanged: $z_{st} = z + \mathrm{sg}(z_q - z)$.
# 3. **Moving the codes**: either by gradient on the codebook loss $\|\mathrm{sg}(z) - e\|^2$, or as
#    an exponential moving average of the vectors assigned to each code (k-means, online), plus a
#    commitment loss $\beta\|z - \mathrm{sg}(e)\|^2$ that keeps the encoder near its codes.  Codes
#    nobody picks are *dead*; restarting them on live encoder outputs keeps the codebook in use.

# %%
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
from _lesson import QUICK, ROOT, plt, savefig, trained_run

from minidiff import vq
from minidiff.data import ShapesDataset, to_uint8, to_unit_range
from minidiff.nn.quantizer import VectorQuantizer
from minidiff.nn.vqvae import VQVAE, psnr
from minidiff.images import image_grid
from minidiff.train.vqvae import VQVAETrainConfig, VQVAETrainer, evaluate_vqvae, load_vqvae

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The codebook picture, in 2-D
# Encoder outputs (dots) and a codebook of 12 codes (stars).  Every point of the plane belongs to
# its nearest code: the coloured cells (a Voronoi diagram).  Quantization moves each dot to the star
# of its cell (the grey lines).

# %%
z = np.concatenate([rng.normal(c, 0.35, (150, 2)) for c in ([-2, -1], [1.5, 1.5], [1, -1.5], [-1, 2])])
codebook = rng.normal(0, 1.5, (12, 2))
k, z_q = vq.quantize(z, codebook)

g = np.linspace(-4, 4, 300)
grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
cells = vq.quantize(grid, codebook)[0].reshape(300, 300)

fig, ax = plt.subplots(figsize=(6, 6))
ax.imshow(cells, extent=(-4, 4, -4, 4), origin="lower", cmap="tab20", alpha=0.35)
ax.plot(np.stack([z[:, 0], z_q[:, 0]]), np.stack([z[:, 1], z_q[:, 1]]), color="grey", lw=0.4, alpha=0.5)
ax.scatter(z[:, 0], z[:, 1], s=6, c=k, cmap="tab20")
ax.scatter(codebook[:, 0], codebook[:, 1], marker="*", s=250, c=np.arange(12), cmap="tab20", edgecolors="k")
ax.set_title(f"nearest-code quantization: {len(np.unique(k))} of 12 codes in use")
savefig(fig, "05_codebook_2d.png")

# %% [markdown]
# The expansion gives exactly the brute-force distances, with a fraction of the memory:

# %%
zz, ee = rng.normal(size=(2000, 32)), rng.normal(size=(512, 32))
start = time.perf_counter()
brute = ((zz[:, None, :] - ee[None]) ** 2).sum(-1)  # a 2000 x 512 x 32 array on the way
t_brute = time.perf_counter() - start
start = time.perf_counter()
fast = vq.squared_distances(zz, ee)
t_fast = time.perf_counter() - start
print(f"max difference {np.abs(brute - fast).max():.1e}; brute force {t_brute * 1e3:.0f} ms "
      f"({zz.shape[0] * ee.shape[0] * 32 * 8 / 2**20:.0f} MiB temporary), expansion {t_fast * 1e3:.1f} ms")

# %% [markdown]
# ## 2. Straight-through
# A "decoder" $L = \sum w \cdot z_{st}$.  The gradient reaching the encoder output $z$ is exactly
# $w$ (as if quantization were the identity), the codebook gets nothing from $L$: only the
# codebook loss moves it.

# %%
quantizer = VectorQuantizer(num_codes=12, dim=2)
variables = {"params": {"codebook": jnp.asarray(codebook, jnp.float32)}}
w = jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)
z5 = jnp.asarray(z[:5], jnp.float32)


def decoder_loss(z, params):
    z_st, _, aux = quantizer.apply({"params": params}, z)
    return jnp.sum(w * z_st), aux


(dz, dcode), aux = jax.grad(decoder_loss, argnums=(0, 1), has_aux=True)(z5, variables["params"])
print("dL/dz == w:", bool(jnp.allclose(dz, w)), "  |dL/dcodebook| =", float(jnp.abs(dcode["codebook"]).max()))
print("codebook loss", float(aux["codebook_loss"]), " commitment loss", float(aux["commitment_loss"]))

# %% [markdown]
# ## 3. Codebook collapse, and restarting dead codes
# The codebook learned by gradient descent on the codebook loss (Adam), started in a bad place:
# spread far beyond the data.  A code receives a gradient only from the vectors assigned to it, so
# codes that never win a point never move — they are *dead*, and a few codes carry all the data.
# With a restart every 20 steps (dead codes jump onto random encoder outputs,
# `minidiff.vq.restart_dead_codes`) the whole codebook ends up in use.

# %%
import optax  # noqa: E402


def train_codebook(restart: bool, steps: int = 200):
    params = {"codebook": jnp.asarray(np.random.default_rng(5).uniform(-8, 8, (12, 2)), jnp.float32)}
    opt = optax.adam(0.05)
    state = opt.init(params)
    grad = jax.jit(jax.grad(lambda p, x: quantizer.apply({"params": p}, x)[2]["codebook_loss"]))
    used = np.zeros(12)
    r = np.random.default_rng(1)
    for step in range(1, steps + 1):
        batch = z[r.integers(len(z), size=64)].astype(np.float32)
        used += vq.codebook_usage(vq.quantize(batch, np.asarray(params["codebook"]))[0], 12)
        updates, state = opt.update(grad(params, batch), state)
        params = optax.apply_updates(params, updates)
        if step % 20 == 0 and step < steps:
            if restart:
                book, _ = vq.restart_dead_codes(np.asarray(params["codebook"]), used, batch, r)
                params = {"codebook": jnp.asarray(book)}
            used[:] = 0
    book = np.asarray(params["codebook"])
    return book, vq.quantize(z, book)[0]


fig, axes = plt.subplots(2, 2, figsize=(10, 8))
for col, restart in enumerate((False, True)):
    book, idx = train_codebook(restart)
    ax = axes[0, col]
    ax.scatter(z[:, 0], z[:, 1], s=5, c=idx, cmap="tab20", vmin=0, vmax=11)
    ax.scatter(book[:, 0], book[:, 1], marker="*", s=250, c=np.arange(12), cmap="tab20", edgecolors="k")
    ax.set(xlim=(-9, 9), ylim=(-9, 9))
    ax.set_title(("with" if restart else "without") + f" dead-code restart: perplexity {vq.perplexity(idx, 12):.1f}")
    axes[1, col].bar(np.arange(12), vq.codebook_usage(idx, 12))
    axes[1, col].set(xlabel="code", ylabel="points assigned", title=f"{vq.fraction_used(idx, 12):.0%} of codes used")
savefig(fig, "05_collapse_and_restart.png")

# %% [markdown]
# ## 4. A VQ-VAE on the shapes
# `minidiff train-vqvae --out runs/vqvae` (3,000 steps, about 20 minutes on one CPU core) trains the
# encoder, the 512-entry EMA codebook and the decoder.  The lesson uses that run if it exists, else the
# small copy of the same run shipped with the lessons (`lessons/checkpoints/vqvae`, float16 weights).
#
# Two choices in the loss decide whether small shapes survive the 8x8 grid of codes.  Most pixels
# are black background, so a plain mean error is ruled by it: the shape's pixels count 11 times
# (`foreground_weight=10`).  And the absolute error (L1, as Stable Diffusion's VAE) keeps edges
# sharper than the squared error: a circle stays a circle, not a blob between circle and square.

# %%
def trained(name: str, cfg: VQVAETrainConfig, tiny: VQVAETrainConfig):
    """Your run or the shipped copy (``_lesson.trained_run``), else train (``tiny`` in quick mode)."""
    run = trained_run(name)
    if run is not None:
        return load_vqvae(run)
    trainer = VQVAETrainer(tiny if QUICK else cfg, None if QUICK else ROOT / "runs" / name)
    trainer.train(progress=not QUICK)
    return trainer.model, trainer.variables(), trainer.config


TINY = {"channels": [8, 16, 16], "groups": 4, "num_codes": 64, "latent_dim": 8}
model, variables, cfg = trained("vqvae", VQVAETrainConfig(),
                                VQVAETrainConfig(steps=20, batch=8, restart_every=10, model=TINY))

metrics = evaluate_vqvae(model, variables, cfg, n=100 if QUICK else 1000, judge=not QUICK)
print({k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()})

images, _, captions = ShapesDataset(seed=123).sample(8, np.random.default_rng(123))
x = to_unit_range(images)
x_hat, indices, _ = model.apply(variables, x)
fig, axes = plt.subplots(3, 8, figsize=(16, 6.5))
for i in range(8):
    axes[0, i].imshow(images[i])
    axes[0, i].set_title(textwrap.fill(captions[i].replace("a ", "", 1), 20), fontsize=7)
    axes[1, i].imshow(np.asarray(indices[i]), cmap="tab20")
    axes[2, i].imshow(to_uint8(np.asarray(x_hat[i])))
    axes[2, i].set_title(f"{float(psnr(jnp.clip(x_hat[i], -1, 1), x[i])):.1f} dB", fontsize=8)
for ax in axes.ravel():
    ax.axis("off")
axes[1, 0].set_title("code indices (8x8)", fontsize=8, loc="left")
fig.suptitle(f"picture -> {indices.shape[1]}x{indices.shape[2]} codebook indices -> picture "
             f"(held-out PSNR {metrics['psnr_mean']:.1f} dB, {metrics['fraction_used']:.0%} of "
             f"{model.config.num_codes} codes used, perplexity {metrics['perplexity']:.0f})")
savefig(fig, "05_reconstructions.png")

# %% [markdown]
# A warning about the number in the title.  PSNR averages the squared error over every pixel, and
# most pixels here are black background that any model gets right; a reconstruction that blurs a
# small triangle into a red smudge still scores over 25 dB.  So `evaluate_vqvae` also asks the
# shapes classifier to read the reconstructions (`reconstruction_accuracy_shape`): the question the
# DALL-E model of lesson 6 depends on is whether the *shape* survives the round trip.

# %% [markdown]
# How evenly are the codes used over 1,000 held-out pictures?  (Most of every picture is black
# background, so one code is very common; the rest share the edges and the colours.)

# %%
pool, _, _ = ShapesDataset(seed=7).sample(100 if QUICK else 1000, np.random.default_rng(7))
_, idx = model.apply(variables, to_unit_range(pool), method=VQVAE.encode)
counts = np.sort(vq.codebook_usage(np.asarray(idx), model.config.num_codes))[::-1]
fig, ax = plt.subplots(figsize=(8, 3.5))
ax.bar(np.arange(len(counts)), counts, width=1.0)
ax.set(yscale="log", xlabel="code (sorted by use)", ylabel="uses",
       title=f"codebook usage: {(counts > 0).mean():.0%} used, perplexity {vq.perplexity(np.asarray(idx), len(counts)):.0f}")
savefig(fig, "05_usage.png")

# %% [markdown]
# The decoder also paints from indices alone — which is how lesson 6 turns a transformer's tokens
# into a picture:

# %%
again = model.apply(variables, indices, method=VQVAE.decode_indices)
print("decode(indices) == reconstruction:", bool(jnp.allclose(again, x_hat, atol=1e-5)))
fig, ax = plt.subplots(figsize=(12, 3))
ax.imshow(image_grid(to_uint8(np.asarray(again)), 8))
ax.set_title("painted by the decoder from the 8x8 code grids alone")
ax.axis("off")
savefig(fig, "05_decoded_from_indices.png")

# %% [markdown]
# ## 5. DALL-E's discrete VAE: a distribution over the codes, and the Gumbel-softmax
# DALL-E (Ramesh et al. 2021, sec. 2.1) also turns pictures into grids of codes (32 x 32 of 8,192), but
# not by the nearest code.  Its encoder outputs *logits* $l_1..l_K$ at each position, a distribution
# $q(k \mid x) = \mathrm{softmax}(l)_k$ over the codes; training maximises the ELBO
#
# $$\log p(x) \ge \mathbb E_{k \sim q}\big[\log p(x \mid e_k)\big] - \mathrm{KL}\big(q(k \mid x) \,\|\, p(k)\big),$$
#
# with a uniform prior $p(k) = 1/K$ while the autoencoder trains, so the KL term is
# $\sum_k q_k \log(K q_k)$ (`minidiff.vq.kl_to_uniform`): 0 for an undecided encoder, $\log K$ for a
# certain one.  The expectation needs a *sample* $k \sim q$ that gradients can pass.  Two facts give one:
#
# * **Gumbel-max**: with $g_k = -\log(-\log U_k)$, $U_k \sim U(0, 1)$, the index
#   $\arg\max_k (\log q_k + g_k)$ is distributed exactly as $q$.
# * **Gumbel-softmax** (Jang et al. 2017; Maddison et al. 2017): replace the argmax's one-hot by
#   $y = \mathrm{softmax}((\log q + g)/\tau)$; the decoder reads $z = \sum_k y_k e_k$.  At $\tau \to 0$,
#   $y$ is the one-hot of the sample; for $\tau > 0$ it is smooth, and the gradient reaches the logits and
#   the codebook without a straight-through copy.  DALL-E anneals $\tau$ from 1 to 1/16.
#
# First both facts, numerically (`minidiff.vq.gumbel_softmax` is the NumPy reference of
# `minidiff.nn.quantizer.GumbelQuantizer`):

# %%
logits = np.array([1.5, 0.5, 0.0, -0.5, 1.0])
q = np.exp(vq.log_softmax(logits))
n = 100_000
g = rng.gumbel(size=(n, len(q)))
freq = np.bincount((np.log(q) + g).argmax(-1), minlength=len(q)) / n
se = np.sqrt(q * (1 - q) / n)  # the binomial standard error of each frequency
print("q             ", np.round(q, 4))
print("argmax freq.  ", np.round(freq, 4), f"  largest |freq - q| = {np.abs(freq - q).max() / se.max():.1f} standard errors")
assert np.all(np.abs(freq - q) < 5 * se)

taus = (2.0, 1.0, 0.5, 1 / 16)
fig, axes = plt.subplots(1, len(taus) + 1, figsize=(15, 2.8), sharey=True)
axes[0].bar(range(len(q)), q, color="grey")
axes[0].set_title("q = softmax(l)")
for ax, tau in zip(axes[1:], taus):
    for j in range(3):  # three draws of g, the same in every panel
        ax.bar(np.arange(len(q)) + 0.27 * (j - 1), vq.gumbel_softmax(logits, g[j], tau), width=0.27)
    ax.set_title(f"y at tau = {tau:g} (3 draws)")
for ax in axes:
    ax.set_xlabel("code k")
fig.suptitle("Gumbel-softmax: a relaxed sample of q, nearly one-hot as tau falls", y=1.06)
savefig(fig, "05_gumbel_softmax.png")

# %% [markdown]
# The same architecture as the VQ-VAE above, with `quantizer="gumbel"`: the encoder's last layer gives
# 512 logits per position instead of a 32-vector, the codebook is a plain parameter (no EMA, no
# restarts: no code is ever left without gradient, since every code gets a share $y_k$ of every
# position), and the loss adds `kl_weight` times the KL.  Trained for the same 3,000 steps
# (`minidiff train-vqvae --model-kwargs '{"quantizer": "gumbel"}' --restart-every 0 --out runs/dvae`);
# after training the argmax code is the token, as for the VQ-VAE.

# %%
dvae, dvae_variables, dvae_cfg = trained(
    "dvae", VQVAETrainConfig(restart_every=0, model={**VQVAETrainConfig().model, "quantizer": "gumbel"}),
    VQVAETrainConfig(steps=20, batch=8, restart_every=0, model={**TINY, "quantizer": "gumbel"}))
dvae_metrics = evaluate_vqvae(dvae, dvae_variables, dvae_cfg, n=100 if QUICK else 1000, judge=not QUICK)
rows = [("", "VQ-VAE (nearest code)", "dVAE (Gumbel-softmax)")]
for key, name in (("psnr_mean", "PSNR (dB)"), ("reconstruction_accuracy_shape", "shape read back"),
                  ("reconstruction_accuracy_joint", "shape, colour, position read back"),
                  ("fraction_used", "codes used"), ("perplexity", "perplexity")):
    if key in metrics:
        rows.append((name, f"{metrics[key]:.3g}", f"{dvae_metrics[key]:.3g}"))
print(f"held-out pictures: n = {metrics['n']}")
for r in rows:
    print(f"{r[0]:36s}{r[1]:>24s}{r[2]:>24s}")

x_dvae, idx_dvae, _ = dvae.apply(dvae_variables, x)
fig, axes = plt.subplots(3, 8, figsize=(16, 6.3))
for i in range(8):
    for row, picture in enumerate((images[i], to_uint8(np.asarray(x_hat[i])), to_uint8(np.asarray(x_dvae[i])))):
        axes[row, i].imshow(picture)
        axes[row, i].set_xticks([])
        axes[row, i].set_yticks([])
for row, name in enumerate(("picture", "VQ-VAE", "dVAE")):
    axes[row, 0].set_ylabel(name)
fig.suptitle(f"held-out reconstructions: VQ-VAE {metrics['psnr_mean']:.1f} dB, dVAE {dvae_metrics['psnr_mean']:.1f} dB "
             f"(mean PSNR over n = {metrics['n']})")
savefig(fig, "05_vqvae_vs_dvae.png")

# %% [markdown]
# ## 6. VQGAN: a discriminator and a perceptual term
# Stable Diffusion's autoencoder descends from VQGAN (Esser et al. 2021), which kept the VQ-VAE and
# changed its loss.  A pixel-wise error rewards the *average* of the plausible pictures, and the
# average of slightly different edges is a blurred edge.  VQGAN adds two terms that do not average:
#
# * a **patch discriminator** $D$ (pix2pix's PatchGAN: one real-or-fake logit per ~10 x 10 window,
#   `minidiff.nn.discriminator`), trained with the hinge loss
#   $\mathbb E[\mathrm{relu}(1 - D(x))] + \mathbb E[\mathrm{relu}(1 + D(\hat x))]$, while the decoder adds
#   $-w_{adv}\,\mathbb E[D(\hat x)]$: blurred patches are easy to tell from real ones;
# * a **perceptual** distance: LPIPS compares pictures in a pretrained network's features.  We have no
#   VGG here, so the features are a shapes classifier's (trained with another seed than the judge
#   that scores the results): $\sum_l \mathrm{mean}\,|n(\phi_l(x)) - n(\phi_l(\hat x))|^2$, $n$ = unit length.
#
# One Adam step trains both networks: stop-gradients keep the decoder's term away from $D$ and
# $D$'s loss away from the decoder (tested in `tests/test_vq.py`).  The discriminator joins at step
# 1,000 of 3,000, with a fixed weight 0.05 (VQGAN weighs it adaptively).  Sharper or not?  The
# measure: `edge_ratio`, the mean squared difference of neighbouring pixels of the reconstructions
# over the pictures' (`minidiff.metrics.edge_strength`: a step blurred over $k$ pixels keeps $1/k$).

# %%
vqgan, vqgan_variables, vqgan_cfg = trained(
    "vqgan", VQVAETrainConfig(adversarial_weight=0.05, perceptual_weight=0.1, disc_start=1000),
    VQVAETrainConfig(steps=20, batch=8, restart_every=10, adversarial_weight=0.05, perceptual_weight=0.1,
                     disc_start=10, model=TINY))
vqgan_metrics = evaluate_vqvae(vqgan, vqgan_variables, vqgan_cfg, n=100 if QUICK else 1000, judge=not QUICK)
table = {"VQ-VAE": metrics, "VQGAN": vqgan_metrics, "dVAE": dvae_metrics}
print(f"held-out pictures, n = {metrics['n']}")
print(f"{'':36s}" + "".join(f"{name:>12s}" for name in table))
for key, name in (("psnr_mean", "PSNR (dB)"), ("edge_ratio", "edge strength / the picture's"),
                  ("reconstruction_accuracy_shape", "shape read back"),
                  ("reconstruction_accuracy_joint", "shape, colour, position read back"), ("perplexity", "perplexity")):
    if key in metrics:
        print(f"{name:36s}" + "".join(f"{m[key]:12.3f}" for m in table.values()))

x_gan = np.asarray(vqgan.apply(vqgan_variables, x)[0])
crop = slice(4, 28)
fig, axes = plt.subplots(4, 6, figsize=(12, 8.4))
for i in range(6):
    for row, picture in enumerate((images[i], to_uint8(np.asarray(x_hat[i])), to_uint8(x_gan[i]),
                                   to_uint8(np.asarray(x_dvae[i])))):
        axes[row, i].imshow(picture[crop, crop], interpolation="nearest")
        axes[row, i].set_xticks([])
        axes[row, i].set_yticks([])
for row, (name, m) in enumerate((("picture", None), ("VQ-VAE", metrics), ("VQGAN", vqgan_metrics), ("dVAE", dvae_metrics))):
    axes[row, 0].set_ylabel(name if m is None else f"{name}\nedges x{m['edge_ratio']:.2f}")
fig.suptitle(f"the same held-out pictures (centre 24 x 24 pixels, enlarged); edge strength relative to the "
             f"pictures' over n = {metrics['n']}")
savefig(fig, "05_vqgan.png")

# %% [markdown]
# ## Exercises
# Solutions, each checked by the test suite: `lessons/solutions/05_vq_vae.py`.
#
# 1. **What goes wrong without the straight-through estimator?** Build the smallest VQ autoencoder:
#    2-D points of four clusters, a linear encoder $z = x W_e$ started at rank 1 (two clusters land on
#    the same point), 8 codes, a linear decoder.  Train it with $z_{st} = z + \mathrm{sg}(z_q - z)$ and with
#    plain $z_q$ in the decoder.  Show that without ST the reconstruction sends the encoder exactly
#    zero gradient, and compare the reconstruction errors.
# 2. **Perplexity in bits.** Show that `vq.perplexity` is $2^{H}$ of the code usage (H in bits): K for
#    a uniformly used codebook of K codes, 1 for a collapsed one.  How many bits does one 8 x 8 grid
#    of codes from a 512-code book carry at most, against the 32 x 32 x 3 bytes of the picture?

