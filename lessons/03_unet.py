# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 3 — The UNet: the network that predicts the noise
#
# Lessons 1-2 needed only one function, $\varepsilon_\theta(x_t, t)$.  In Stable Diffusion it is
# a UNet with ~860 M parameters: a convolutional encoder-decoder with skip connections, told
# the timestep through a sinusoidal embedding and the prompt through cross-attention.
# `minidiff.nn.UNet2DCondition` builds it from one config (`UNetConfig.sd15()`, `.sd2()`, `.toy()`),
# with the parameter names of the public checkpoints.  This lesson takes it apart.

# %%
import jax
import jax.numpy as jnp
import numpy as np
from _lesson import QUICK, plt, savefig
from flax.traverse_util import flatten_dict

from minidiff.images import example_photo, to_unit_range
from minidiff.nn.layers import ResnetBlock, attention, timestep_embedding
from minidiff.nn.unet import UNet2DCondition, UNetConfig

# %% [markdown]
# ## 1. Telling the network the time: sinusoidal embeddings
# $t$ becomes $[\cos(t\,\omega_i), \sin(t\,\omega_i)]$ with frequencies $\omega_i = 10000^{-i/160}$
# (SD: 320 dimensions, cosines first).  Fast frequencies tell nearby timesteps apart, slow ones
# say roughly where in the chain we are; an MLP then maps this to a 1280-d vector that every
# ResNet block adds to its features.

# %%
t = np.arange(1000)
emb = np.asarray(timestep_embedding(t, 320))
sim = emb @ emb.T / (np.linalg.norm(emb, axis=1)[:, None] * np.linalg.norm(emb, axis=1)[None])
fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
a.imshow(emb.T, aspect="auto", cmap="RdBu", origin="lower")
a.set(title="timestep_embedding(t, 320): cos half (0-159), sin half (160-319)", xlabel="t", ylabel="dimension")
b.imshow(sim, cmap="viridis", origin="lower")
b.set(title="cosine similarity between the embeddings of t and t'", xlabel="t", ylabel="t'")
savefig(fig, "03_timestep_embedding.png")

# %% [markdown]
# ## 2. A ResNet block
# GroupNorm → SiLU → 3×3 conv, plus the projected time embedding, → GroupNorm → SiLU → 3×3 conv,
# added to the input.  The same weights give different features at different t: the time
# embedding shifts every channel.  (Random weights here; what matters is the wiring.)

# %%
photo = to_unit_range(example_photo("chelsea", size=32))[None]  # (1, 32, 32, 3)
block = ResnetBlock(out_channels=32, groups=1)  # 3 input channels: one GroupNorm group
temb_of = lambda tt: jnp.asarray(timestep_embedding(np.array([tt]), 128))  # noqa: E731
params = block.init(jax.random.PRNGKey(0), photo, temb_of(0))
fig, axes = plt.subplots(2, 5, figsize=(11, 4.6))
for row, tt in enumerate((10, 900)):
    h = np.asarray(block.apply(params, photo, temb_of(tt)))[0]
    axes[row, 0].imshow((photo[0] + 1) / 2)
    axes[row, 0].set_title(f"input (t = {tt})", fontsize=9)
    for k in range(4):
        axes[row, k + 1].imshow(h[..., k], cmap="magma")
        axes[row, k + 1].set_title(f"channel {k}", fontsize=9)
for ax in axes.flat:
    ax.axis("off")
savefig(fig, "03_resnet_block.png")

# %% [markdown]
# ## 3. Attention
# Each pixel (query) looks at every pixel (keys) and takes a weighted average of their values,
# weights $\mathrm{softmax}(q\cdot k/\sqrt d)$.  To *see* it, use the pixel colours themselves as
# queries and keys (no learned projection): a query pixel then attends to pixels of similar colour.
# In cross-attention the keys and values come from the text tokens instead.

# %%
feat = photo[0].reshape(1, 32 * 32, 1, 3) * 3.0  # (B, L, heads, d): colours as q = k = v
queries = {"eye": (13, 10), "fur": (4, 16), "nose": (22, 16)}
fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
axes[0].imshow((photo[0] + 1) / 2)
axes[0].set_title("query pixels")
d = feat.shape[-1]
for ax, (name, (r, c)) in zip(axes[1:], queries.items()):
    q = feat[:, r * 32 + c][:, None]
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q * d**-0.5, feat), axis=-1)
    ax.imshow(np.asarray(w).reshape(32, 32), cmap="inferno")
    ax.set_title(f"attention of the {name} pixel")
    axes[0].plot(c, r, "c+", ms=12, mew=2)
for ax in axes:
    ax.axis("off")
savefig(fig, "03_attention.png")

# %% [markdown]
# At SD's 64×64 latents there are 4096 tokens, so one head's weight matrix has 4096² ≈ 16.8 M
# entries (64 MiB in float32; ×8 heads ×2 images).  `attention(q, k, v, chunk_size=256)`
# processes the queries 256 at a time, so only a sixteenth of that exists at once — same result:

# %%
key = jax.random.PRNGKey(1)
q, k, v = (jax.random.normal(kk, (1, 4096 if not QUICK else 1024, 2, 40)) for kk in jax.random.split(key, 3))
full, chunked = attention(q, k, v), attention(q, k, v, chunk_size=256)
print(f"max |full - chunked| = {float(jnp.abs(full - chunked).max()):.2e}")

# %% [markdown]
# ## 4. The U shape
# Down blocks halve the resolution and widen the channels; up blocks mirror them and concatenate
# the skip connections of the same resolution.  Transformer2D (self- and cross-attention) sits in
# the blocks marked "attn".

# %%
cfg = UNetConfig.sd15()
n = len(cfg.block_out_channels)
fig, ax = plt.subplots(figsize=(12, 4.8))


def box(x, y, text, color):
    ax.add_patch(plt.Rectangle((x - 0.42, y - 0.3), 0.84, 0.6, color=color, alpha=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=8)


path = []
for i, ch in enumerate(cfg.block_out_channels):
    res = 64 // 2**i
    text = f"{res}×{res}\n{ch} ch" + (" attn" if cfg.attention[i] else "")
    box(i, -i, text, "C0")
    box(2 * n - i, -i, text, "C1")
    ax.annotate("", xy=(2 * n - i - 0.45, -i), xytext=(i + 0.45, -i),
                arrowprops=dict(arrowstyle="->", color="gray", ls="--"))
box(n, -n, f"mid {64 // 2 ** (n - 1)}×{64 // 2 ** (n - 1)}\n{cfg.block_out_channels[-1]} ch attn", "C2")
xs = list(range(2 * n + 1))
ax.plot(xs, [-min(x, 2 * n - x) for x in xs], color="k", lw=0.8, zorder=0)
ax.set(xlim=(-0.6, 2 * n + 0.6), ylim=(-n - 0.6, 0.6), xticks=[], yticks=[],
       title="SD 1.5 UNet on 64×64 latents: down blocks (blue), middle, up blocks (orange); dashed: skips")
savefig(fig, "03_u_shape.png")

# %% [markdown]
# ## 5. Where the 860 M parameters live
# `jax.eval_shape` traces `init` without allocating anything, so counting SD 1.5's parameters
# takes a second.

# %%
def param_counts(config, ctx_dim):
    x = jnp.zeros((1, 64, 64, config.in_channels))
    ctx = None if ctx_dim is None else jnp.zeros((1, 77, ctx_dim))
    shapes = jax.eval_shape(lambda: UNet2DCondition(config).init(jax.random.PRNGKey(0), x, jnp.zeros(1), ctx))
    flat = flatten_dict(shapes["params"])
    per_block = {}
    for path, leaf in flat.items():
        per_block[path[0]] = per_block.get(path[0], 0) + int(np.prod(leaf.shape))
    return per_block


sd = param_counts(UNetConfig.sd15(), 768)
total = sum(sd.values())
print(f"SD 1.5 UNet: {total:,} parameters")
toy = param_counts(UNetConfig.toy(in_channels=4), None)
print(f"toy UNet:    {sum(toy.values()):,} parameters")
order = ["conv_in", "time_embedding"] + [f"down_blocks_{i}" for i in range(4)] + ["mid_block"] + \
        [f"up_blocks_{i}" for i in range(4)] + ["conv_norm_out", "conv_out"]
fig, ax = plt.subplots(figsize=(11, 4))
ax.bar(range(len(order)), [sd[k] / 1e6 for k in order])
ax.set_xticks(range(len(order)), order, rotation=45, ha="right")
ax.set(ylabel="millions of parameters", title=f"SD 1.5 UNet: {total:,} parameters")
savefig(fig, "03_parameters.png")

# %% [markdown]
# **Takeaways.** The UNet is convolutions for local detail, attention for global context and
# text, and a time embedding that tells every block how noisy its input is.  Lesson 4 trains a
# toy-sized one on a CPU.

# %% [markdown]
# ## Exercises
# Solutions, each checked by the test suite: `lessons/solutions/03_unet.py`.
#
# 1. **A shift is a rotation.** Show that the embedding of $t + \Delta$ is a fixed linear map of the
#    embedding of $t$ (the same map for every t: a rotation by $\Delta\omega_i$ in each (cos, sin) pair),
#    and check it on `timestep_embedding(t, 320)` for all t.  Why does that make "how far apart are
#    two timesteps" easy for the next layer?
# 2. **Attention does not know where.** Permute the tokens (pixels) of q, k and v with the same
#    permutation: show that `attention` returns the permuted output.  So what tells SD's UNet where a
#    pixel is?
# 3. **The memory of one attention.** How many bytes do the attention weights of one SD 1.5 self-
#    attention at 512 x 512 take in float32 (64 x 64 latents, 8 heads, a guided batch of 2), and with
#    `chunk_size=256`?  Check that chunking changes nothing in the result.

