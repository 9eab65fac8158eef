# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 7 — The latent space: SD's VAE, why 8x, and the scaling factor
#
# Stable Diffusion is a *latent* diffusion model (Rombach et al. 2022).  The work is split in two:
#
# 1. **perceptual compression**: an autoencoder, trained once, turns an image
#    $x \in \mathbb R^{512\times512\times3}$ into a latent $z \in \mathbb R^{64\times64\times4}$ and back;
# 2. **generation**: the diffusion model (lessons 1-4) learns the distribution of the *latents*.
#    Sampling runs the UNet on $z$ only; the decoder paints the pixels once, at the very end.
#
# $$x \xrightarrow{\ \mathcal E\ } z \sim q(z\mid x) \xrightarrow{\ \times\, 0.18215\ } z_0
#   \xrightarrow{\text{forward process}} z_t \quad\cdots\quad
#   \hat z_0 \xrightarrow{\ \div\, 0.18215\ } \mathcal D(\cdot) = \hat x$$
#
# This lesson puts numbers on that picture: the size of SD's VAE and why $f = 8$; what the KL
# term and the scaling factor 0.18215 are for; then it trains a small VAE of the same architecture
# on a CPU, on crops of scikit-image's example photographs, and looks at its latents.

# %%
import os
import time
from dataclasses import replace

from _lesson import QUICK, plt, savefig

if QUICK:  # the test suite's quick run: let XLA compile fast rather than well (it runs only a few steps)
    os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
from PIL import Image  # noqa: E402

from minidiff.diffusion import NoiseSchedule, q_sample  # noqa: E402
from minidiff.images import example_photo, to_uint8, to_unit_range  # noqa: E402
from minidiff.nn.autoencoder import AutoencoderKL, AutoencoderKLConfig  # noqa: E402
from minidiff.nn.vqvae import psnr  # noqa: E402
from minidiff.train.autoencoder import random_crops, train_vae  # noqa: E402

rng = np.random.default_rng(0)
lesson_start = time.perf_counter()


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


# %% [markdown]
# ## 1. SD's VAE in numbers
# `AutoencoderKLConfig.sd()` is the VAE of SD 1.x and 2.x ("KL-f8").  `jax.eval_shape` traces
# `init` without computing anything, so counting its parameters is instant.

# %%
sd = AutoencoderKLConfig.sd()
sd_shapes = jax.eval_shape(lambda: AutoencoderKL(sd).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))["params"]
n_pixels = sd.sample_size**2 * sd.in_channels
n_latent = sd.latent_size**2 * sd.latent_channels
print(f"SD's VAE: {count(sd_shapes):,} parameters (encoder {count(sd_shapes['encoder']):,}, "
      f"decoder {count(sd_shapes['decoder']):,})")
print(f"f = {sd.downsample_factor}: image {sd.sample_size}x{sd.sample_size}x{sd.in_channels} = {n_pixels:,} numbers "
      f"-> latent {sd.latent_size}x{sd.latent_size}x{sd.latent_channels} = {n_latent:,} numbers "
      f"({n_pixels // n_latent}x fewer)")

# %% [markdown]
# **Why diffuse in latent space.**  Sampling calls the UNet 20-50 times.  A convolution costs
# $\propto H W$ (every position is visited), a self-attention layer $\propto (HW)^2$ (every pair of
# positions).  At $f = 8$ the UNet's input has $8^2 = 64$ times fewer positions than the image, so its
# convolutions are ~64x cheaper and a full-resolution attention would be $64^2 = 4096$x cheaper.
# What is lost is the fine, high-frequency detail — which a pixel diffusion model spends most of
# its capacity on, although it carries little of the *meaning* of a picture.  Latent diffusion hands
# that detail to the decoder, trained once (with a perceptual LPIPS loss and a patch discriminator,
# so textures come out sharp), and lets the diffusion model spend itself on composition.
#
# **Why 8x.**  Rombach et al. trained the same diffusion model on autoencoders with
# $f \in \{1, 2, 4, 8, 16, 32\}$ ("LDM-1" ... "LDM-32"): $f = 1, 2$ (nearly pixels) train slowly,
# because the diffusion model is left with the perceptual compression; at $f = 32$ the first stage
# has thrown away so much that quality stalls early.  $f = 4$ to $16$ strike the balance, $f = 4$
# and $8$ best of all, and SD took $f = 8$ with 4 channels: a 48x smaller array.

# %%
sd_pos, sd_lat = sd.sample_size**2, sd.latent_size**2
rows = {"numbers per image": (n_pixels, n_latent),
        "positions a conv visits": (sd_pos, sd_lat),
        "pairs an attention layer scores": (sd_pos**2, sd_lat**2)}
fig, ax = plt.subplots(figsize=(8, 3.8))
y = np.arange(len(rows))
pix, lat = np.array(list(rows.values()), dtype=float).T
ax.barh(y - 0.2, pix, 0.4, label=f"pixels {sd.sample_size}x{sd.sample_size}x3", color="tab:red")
ax.barh(y + 0.2, lat, 0.4, label=f"latent {sd.latent_size}x{sd.latent_size}x4", color="tab:blue")
for i, (p, q) in enumerate(zip(pix, lat)):
    ax.text(p * 1.3, i - 0.2, f"{p:.3g}", va="center", fontsize=9)
    ax.text(q * 1.3, i + 0.2, f"{q:.3g}  ({p / q:,.0f}x fewer)", va="center", fontsize=9)
ax.set(xscale="log", yticks=y, yticklabels=list(rows), xlim=(1e3, 1e13),
       title="one image at SD's resolution: pixel space vs latent space (f = 8)")
ax.invert_yaxis()
ax.legend(loc="upper right")
savefig(fig, "07_sd_numbers.png")

# %% [markdown]
# ### The KL-regularised posterior, and why its weight is tiny
# The encoder does not output one $z$ but a diagonal Gaussian $q(z\mid x) = \mathcal N(\mu, \sigma^2)$
# (`encode` returns a `DiagonalGaussian`, clipping $\log\sigma^2$ to $[-30, 20]$), and training
# decodes a sample $z = \mu + \sigma\varepsilon$.  The loss is
#
# $$\mathcal L = \|x - \mathcal D(z)\|_1 \;(+\ \text{LPIPS} + \text{GAN})\; + \;\lambda_{KL}\,
#    \mathrm{KL}\big(q(z\mid x)\,\|\,\mathcal N(0, I)\big), \qquad
#    \mathrm{KL} = \tfrac12 \textstyle\sum \big(\mu^2 + \sigma^2 - 1 - \log\sigma^2\big),$$
#
# with $\lambda_{KL} = 10^{-6}$ (the reconstruction summed over pixels).  A real VAE needs
# $\lambda_{KL} \approx 1$, because it *samples from the prior* $\mathcal N(0, I)$ — and pays for it
# in blur.  Here nobody samples from $\mathcal N(0, I)$: the diffusion model *is* the prior.  The KL
# term only has to keep the latent space from drifting to huge, spiky values and to make it smooth
# (nearby $z$ decode to similar images, because training adds the noise $\sigma\varepsilon$).  So it
# is set just large enough to do that, and the latents end up far from unit variance: SD's have a
# standard deviation of about $1/0.18215 \approx 5.5$.
#
# ### The scaling factor
# The forward process $z_t = \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon$ mixes
# the data with *unit-variance* noise.  The schedule was designed for data of about unit variance;
# for data of variance $v$ the signal-to-noise ratio at step $t$ is
#
# $$\mathrm{SNR}(t) = \frac{v\, \bar\alpha_t}{1 - \bar\alpha_t}.$$
#
# With raw SD latents ($v \approx 30$) the SNR at every step would be 30x higher than intended: the
# last step $t = 999$ would still hold the picture (SNR 0.14, what unit-variance latents have
# at $t \approx 640$), while sampling starts from pure noise.  So
# SD's authors measured the standard deviation of a batch of latents and multiply every latent by
# `scaling_factor = 1 / std = 0.18215` (`AutoencoderKL.latents_from_images`), and divide by it
# before decoding (`images_from_latents`) — the only place it is applied.

# %%
sched = NoiseSchedule.from_name("scaled_linear")  # SD's training schedule
t = np.arange(len(sched))
photo_var = np.mean([to_unit_range(example_photo(n, 256)).var() for n in ("chelsea", "astronaut", "coffee")])
v_raw = 1 / sd.scaling_factor**2
variances = {"SD latents x 0.18215 (v = 1)": (1.0, "tab:blue", "-"),
             f"SD latents, unscaled (v = 1/0.18215² = {v_raw:.1f})": (v_raw, "tab:red", "--"),
             f"photo pixels in [-1, 1] (v = {photo_var:.2f})": (photo_var, "tab:gray", ":")}
fig, ax = plt.subplots(figsize=(8, 4.2))
for label, (v, color, ls) in variances.items():
    snr = v * sched.snr
    t_half = int(np.argmin(np.abs(np.log(snr))))
    ax.plot(t, np.log10(snr), color=color, ls=ls, label=f"{label}: SNR = 1 at t = {t_half}, SNR(999) = {snr[-1]:.3f}")
    ax.plot(t_half, 0, "o", color=color)
ax.axhline(0, color="k", lw=0.5)
ax.set(xlabel="timestep t", ylabel=r"$\log_{10}\ \mathrm{SNR}(t) = \log_{10}\ v\,\bar\alpha_t/(1-\bar\alpha_t)$",
       title="SD's noise schedule seen by data of variance v: why latents are scaled to unit variance")
ax.legend(fontsize=8, loc="lower left")
savefig(fig, "07_snr_scaling.png")
print(f"unscaled latents: SNR(999) = {sched.snr[-1] / sd.scaling_factor**2:.3f} instead of {sched.snr[-1]:.4f}")

# %% [markdown]
# ## 2. A small VAE, trained here on a CPU
# The same `AutoencoderKL` at toy widths: three blocks of (16, 32, 64) channels, one ResnetBlock
# each, mid-block attention included, so $f = 4$ (two downsamplings) and 4 latent channels: 12x
# fewer numbers than pixels.  (At $f = 8$, 48x, a model this small trained for minutes on a pixel
# loss alone keeps too little detail to be worth looking at.)
#
# Data: random 32x32 crops, flipped at random, of three photographs from scikit-image at two
# scales each — the astronaut, the coffee cup and the rocket.  The cat (`chelsea`) is **held out**.
# Loss: mean squared error + $\lambda_{KL}$ KL / (number of pixel values), $\lambda_{KL} = 10^{-6}$
# (`minidiff.train.autoencoder.train_vae`).  That is SD's loss without LPIPS and the discriminator
# (both need another trained network), and with the squared error — what PSNR measures — in place
# of SD's L1 (`reconstruction="l1"`).


# %%
def scaled(pixels, factor):
    img = Image.fromarray(pixels)
    return np.asarray(img.resize((round(img.width * factor), round(img.height * factor)), Image.Resampling.LANCZOS))


train_photos = []
for pixels in (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.rocket()):
    train_photos += [pixels, scaled(pixels, 256 / min(pixels.shape[:2]))]  # native size, and short side 256
size = 128 if QUICK else 256  # side of the held-out photo (quick mode: smaller, for speed)
held_out = example_photo("chelsea", size)
print("training photos:", [p.shape[:2] for p in train_photos], " held out: chelsea", held_out.shape[:2])

cfg = AutoencoderKLConfig.toy(sample_size=32, block_out_channels=(16, 32, 64), layers_per_block=1)
steps = 10 if QUICK else 400
start = time.perf_counter()
params, history = train_vae(train_photos, cfg, steps=steps, batch=8 if QUICK else 16, crop=32, lr=2e-3,
                            kl_weight=1e-6, reconstruction="l2", log_every=1 if QUICK else 10, progress=not QUICK)
train_seconds = time.perf_counter() - start
print(f"toy VAE: {count(params):,} parameters, f = {cfg.downsample_factor}; {steps} steps in {train_seconds:.0f} s "
      f"(compile included); last batch MSE {history['mse'][-1]:.4f}, posterior sigma {history['sigma'][-1]:.3f}")

# %%
crops = random_crops(train_photos, 16, 32, np.random.default_rng(1))
fig = plt.figure(figsize=(14, 3.6))
grid = fig.add_gridspec(2, 13)
for i in range(16):
    ax = fig.add_subplot(grid[i // 8, i % 8])
    ax.imshow(to_uint8(crops[i]))
    ax.axis("off")
fig.text(0.33, 0.95, "training data: random 32x32 crops", ha="center")
ax = fig.add_subplot(grid[:, 9:])
ax.plot(history["step"], history["mse"], label="reconstruction MSE (the loss, per batch)")
ax.plot(history["step"], history["sigma"], label=r"mean posterior $\sigma$")
ax.set(xlabel="step", yscale="log", title=f"training: {steps} Adam steps, {train_seconds:.0f} s on the CPU",
       ylim=(None, 10 * max(history["mse"] + history["sigma"])))  # headroom for the legend
ax.legend(loc="upper right")
savefig(fig, "07_training.png")

# %% [markdown]
# The posterior $\sigma$ starts near 1 (the decoder gets mostly noise) and shrinks as training goes:
# with a KL weight of $10^{-6}$ nothing stops the encoder from becoming nearly deterministic.
#
# ### Encoding a whole photo
# Every layer is a convolution (plus one attention over all positions), so a VAE trained on 32x32
# crops encodes the held-out 256x256 photo in one go, to a 64x64x4 latent (quick mode: 128x128).
# The functions are compiled once (`jax.jit`) and reused for every image of that size.

# %%
model = AutoencoderKL(cfg)
encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))

x = to_unit_range(held_out)[None]
posterior = encode(params, x)
mu, sigma = np.asarray(posterior.mean[0]), np.asarray(posterior.std[0])
print(f"held-out photo {x.shape[1:]} -> latent {mu.shape};  mean |mu| {np.abs(mu).mean():.2f}, "
      f"mean sigma {sigma.mean():.3f}")

# %% [markdown]
# ### The scaling factor of *our* VAE, measured as SD's authors did
# Encode a batch of training images, *sample* $z \sim q(z\mid x)$, and take one over the standard
# deviation of all the numbers (the latent-diffusion code: `scale_factor = 1. / z.flatten().std()`,
# computed on the first batch).

# %%
batch_big = random_crops(train_photos, 4 if QUICK else 12, size, np.random.default_rng(2))
key = jax.random.PRNGKey(0)
z_train = []
for i, image in enumerate(batch_big):
    q = encode(params, image[None])
    z_train.append(np.asarray(q.sample(jax.random.fold_in(key, i))[0]))
z_train = np.stack(z_train)
scaling_factor = float(1.0 / z_train.std())
print(f"std of the latents {z_train.std():.3f} -> scaling_factor = {scaling_factor:.4f}   (SD's: {sd.scaling_factor})")
print("per channel: mean", np.round(z_train.mean(axis=(0, 1, 2)), 2), " std", np.round(z_train.std(axis=(0, 1, 2)), 2))

# %% [markdown]
# As with SD's, nothing in our loss pinned the latents' scale: the tiny KL term let it drift
# (printed above).  A trained VAE records its own factor in its config (`AutoencoderKLConfig.toy`
# says so): from here on the model is `AutoencoderKL(replace(cfg, scaling_factor=...))`, and the
# diffusion model's latents come from `latents_from_images` and go back through `images_from_latents`.

# %%
cfg = replace(cfg, scaling_factor=scaling_factor)
model = AutoencoderKL(cfg)
to_latents = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.latents_from_images))
to_images = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.images_from_latents))

latents = to_latents(params, x)  # = posterior mean * scaling_factor
x_hat = np.asarray(to_images(params, latents))  # = decode(latents / scaling_factor)
print("latents_from_images == mean * scaling_factor:", bool(np.allclose(latents[0], mu * scaling_factor, atol=1e-5)),
      f"  latent std {float(latents.std()):.2f}")

x_hat = np.clip(x_hat, -1, 1)
vae_psnr = float(psnr(x_hat, x)[0])
# a baseline with the same budget: shrink the photo to 64x64x3 (12,288 numbers, fewer than the
# latent's 16,384) and blow it up again with bicubic interpolation
side = size // cfg.downsample_factor
small = Image.fromarray(held_out).resize((side, side), Image.Resampling.LANCZOS)
bicubic = to_unit_range(np.asarray(small.resize((size, size), Image.Resampling.BICUBIC)))[None]
bicubic_psnr = float(psnr(bicubic, x)[0])
print(f"held-out PSNR: VAE {vae_psnr:.2f} dB, bicubic {side}x{side} -> {size}x{size} {bicubic_psnr:.2f} dB")

# %%
fig, axes = plt.subplots(1, 4, figsize=(16, 4.6))
error = np.abs(x_hat[0] - x[0]).mean(-1)
panels = [(held_out, f"held-out photo {size}x{size}x3"),
          (to_uint8(x_hat[0]), f"VAE: {side}x{side}x4 latent -> decoded\nPSNR {vae_psnr:.1f} dB"),
          (error, f"|x - decoded| per pixel, RGB average\n(overall {error.mean():.3f} on the [-1, 1] scale)"),
          (to_uint8(bicubic[0]), f"baseline: {side}x{side}x3 + bicubic\nPSNR {bicubic_psnr:.1f} dB")]
for ax, (img, title) in zip(axes, panels):
    gray = img.ndim == 2  # the error map: colour scale up to its 99th percentile
    im = ax.imshow(img, cmap="magma" if gray else None, vmin=0 if gray else None,
                   vmax=np.quantile(img, 0.99) if gray else None)
    ax.set_title(title)
    ax.axis("off")
    if gray:
        fig.colorbar(im, ax=ax, fraction=0.046)
fig.suptitle(f"toy VAE (f = {cfg.downsample_factor}, {count(params):,} parameters, {steps} steps on CPU) "
             "on a photo it never saw")
savefig(fig, "07_reconstruction.png")

# %% [markdown]
# Read the two PSNRs with care.  A VAE trained for a few minutes is blurry, and a bicubic
# thumbnail of the same size is a strong opponent in PSNR.  SD's own VAE scores only
# 23.4 ± 3.8 dB on 256x256 COCO images (the table on Stability AI's `sd-vae-ft-mse` model card),
# after 246,803 training steps, because LPIPS and the discriminator reward sharp, plausible texture
# rather than the exact pixels — and a PSNR cannot see that.  What the latent buys is not PSNR, but
# a compact array on which a diffusion model can learn what images *look like*.
#
# ### What the latent channels look like
# Each of the 4 channels is a 64x64 grayscale image.  They are not colour planes, nor anything
# predefined: the encoder chose what to put where.  But they are still *images*: a thumbnail of the
# photo, spatially aligned with it — which is why a UNet, built for images, works on them.

# %%
z_show = np.asarray(latents[0])
fig, axes = plt.subplots(1, 6, figsize=(21, 3.8))
axes[0].imshow(held_out)
axes[0].set_title("photo")
for c in range(4):
    lim = np.abs(z_show[..., c]).max()
    im = axes[c + 1].imshow(z_show[..., c], cmap="gray", vmin=-lim, vmax=lim)
    axes[c + 1].set_title(f"latent channel {c}\nmean {z_show[..., c].mean():+.2f}, std {z_show[..., c].std():.2f}")
    fig.colorbar(im, ax=axes[c + 1], fraction=0.046)
im = axes[5].imshow(sigma.mean(-1), cmap="viridis")
axes[5].set_title(f"posterior $\\sigma$ (unscaled z, channel mean)\ncompare: mean |$\\mu$| = {np.abs(mu).mean():.2f}")
fig.colorbar(im, ax=axes[5], fraction=0.046)
for ax in axes:
    ax.axis("off")
fig.suptitle(f"the held-out photo's scaled latent ({side}x{side}x4), channel by channel", y=1.04)
savefig(fig, "07_latent_channels.png")

# %%
fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
bins = np.linspace(z_train.min(), z_train.max(), 101)
for c in range(4):
    a.hist(z_train[..., c].ravel(), bins=bins, histtype="step", label=f"channel {c}: std {z_train[..., c].std():.2f}")
a.set(xlabel="z (unscaled)", ylabel="count",
      title=f"sampled latents of {len(z_train)} training crops ({size}x{size})\nstd {z_train.std():.2f}"
            f" -> scaling factor 1/std = {scaling_factor:.3f}")
a.legend(fontsize=8)
scaled_z = (z_train * scaling_factor).ravel()
b.hist(scaled_z, bins=100, density=True, alpha=0.6,
       label=f"z x {scaling_factor:.3f}: mean {scaled_z.mean():+.2f}, std 1")
g = np.linspace(-4, 4, 200)
b.plot(g, np.exp(-g**2 / 2) / np.sqrt(2 * np.pi), "k", label="N(0, 1): the noise the forward process adds")
b.set(xlabel="scaled latent", ylabel="density", xlim=(-5, 5),
      title="after scaling: unit variance, like the noise\n(not Gaussian, and not zero-mean per channel)")
b.legend(fontsize=8)
savefig(fig, "07_latent_histogram.png")

# %% [markdown]
# Unit variance is all the factor buys: the distribution is not Gaussian and the channels are not
# centred.  SD's authors used one number for all channels; later models (SDXL's VAE has its own
# factor 0.13025, SD 3 adds a shift) refine it, but the reason is the same.
#
# ## 3. Noise in latent space vs pixel space
# What does the UNet see at timestep $t$?  Below, the same forward process $q(x_t\mid x_0)$ with SD's
# schedule, applied
#
# * to the pixels (what a pixel diffusion model would see),
# * to the scaled latent, then decoded: the *image* behind the UNet's input,
# * to the scaled latent, shown as the first latent channel: the UNet's actual input,
# * to the *unscaled* latent, decoded: the same $t$ is far less noisy — the SNR mismatch of section 1.

# %%
timesteps = (0, 100, 300, 500, 700, 999)
eps_pixels = rng.standard_normal(x.shape).astype(np.float32)
eps_latent = rng.standard_normal(latents.shape).astype(np.float32)
z0 = np.asarray(latents)
v_pix, v_lat = float(x.var()), float(z0.var())
row_titles = ["pixels $x_t$", "scaled latent $z_t$, decoded", "scaled latent $z_t$, channel 0",
              "unscaled latent, decoded"]
fig, axes = plt.subplots(4, len(timesteps), figsize=(2.6 * len(timesteps), 11.5))
for j, tt in enumerate(timesteps):
    ab = sched.alpha_bar[tt]
    x_t = q_sample(x, ab, eps_pixels)
    z_t = q_sample(z0, ab, eps_latent)                                        # what the UNet sees
    z_raw_t = q_sample(z0 / scaling_factor, ab, eps_latent)                    # without the factor
    shown = [(to_uint8(x_t[0]), v_pix), (to_uint8(np.clip(to_images(params, z_t)[0], -1, 1)), v_lat),
             (z_t[0, ..., 0], v_lat),
             (to_uint8(np.clip(to_images(params, z_raw_t * scaling_factor)[0], -1, 1)), v_lat / scaling_factor**2)]
    for i, (img, v) in enumerate(shown):
        ax = axes[i, j]
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        ax.set_title(f"t = {tt}: SNR {v * sched.snr[tt]:.3g}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if j == 0:
            ax.set_ylabel(row_titles[i], fontsize=10)
fig.suptitle("the forward process at the same t: on pixels, on the scaled latent, and on the unscaled latent "
             r"(SNR = $v\,\bar\alpha_t / (1-\bar\alpha_t)$)", y=0.995)
fig.tight_layout()
savefig(fig, "07_noise_latent_vs_pixel.png")

# %% [markdown]
# Three things to notice.  The latent has 16x fewer positions than the photo here (64x at SD's
# $f = 8$), so each latent value stands for a 4x4 patch: Gaussian noise on the latent decodes to
# blotchy, structured texture, not to pixel speckle — the decoder only knows how to paint images.
# Even scaled, the latent keeps more signal than the pixels at the same $t$ (variance ~1 against a
# photo's ~0.2): SD's `scaled_linear` schedule was tuned for unit-variance latents.  And without the
# scaling factor the picture survives much deeper into the schedule — here to $t \approx 700$, and
# with SD's 30x larger variance to the very end ($\mathrm{SNR}(999) = 0.14$): the UNet would be
# trained on a schedule that never reaches noise, and sampling from $z_T \sim \mathcal N(0, I)$
# would start from something it had never seen.

# %%
print(f"lesson 07 ran in {time.perf_counter() - lesson_start:.0f} s ({'quick' if QUICK else 'full'} mode)")

# %% [markdown]
# ## Exercises
# Solutions, each checked by the test suite: `lessons/solutions/07_latent_space_vae.py`.
#
# 1. **What goes wrong if** the decoder gets the latent at the wrong scale?  The built-in model's
#    factor is 1 (`pipe.vae_config.scaling_factor`: its VAE was trained to give unit-scale latents).
#    Sample a few latents (`load_pipeline().sample_latents`) and decode them correctly, as if SD's
#    factor 0.18215 applied (`pipe.decode(z / 0.18215)`, a wrong config), and with the factor
#    applied in the wrong direction (`pipe.decode(z * 0.18215)`).  Describe and measure the pictures.
# 2. **The same mistake at the other end.** An img2img call encodes a picture, scales it, and noises
#    it to the timestep that `strength` selects.  If the scaling were forgotten there, what SNR would
#    the UNet see at strength 0.6 with SD's schedule and factor 0.18215 — and at which strength would
#    the correct pipeline see the same SNR?

