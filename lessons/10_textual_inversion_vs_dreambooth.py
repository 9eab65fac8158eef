# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 10 — Teaching a model a new subject: textual inversion, DreamBooth and LoRA
#
# The built-in model knows four colours, three shapes, two sizes and nine places.  We show it
# four pictures of something it has never drawn — **a red ring** (a circle with a hole; it only ever
# drew filled discs) — and teach it three ways:
#
# | | textual inversion (Gal et al. 2022) | DreamBooth (Ruiz et al. 2023) | LoRA (Hu et al. 2021) |
# |---|---|---|---|
# | learns | one new word's embedding, $e_{v}$ | the UNet's weights $\theta$ | a low-rank update $\frac{\alpha}{r} BA$ of each attention projection |
# | prompt | "a red <ring> circle in the top left" | "a red sks circle in the top left" | "a red sks circle in the top left" |
# | keeps the class by | construction (nothing else changes) | a prior-preservation loss on the frozen model's "a red circle ..." | the same prior loss, and few parameters |
#
# Both minimise the same diffusion loss on the subject's latents, $\| v - \hat v(z_t, t, c) \|^2$;
# they differ only in *what* the gradient may move.  We then measure the seed's comparison: storage,
# fidelity to the subject (in places it was never shown), drift of the class prior.  And we show
# what textual inversion *can* do: a concept within the frozen model's reach, a new colour (orange).

# %%
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from _lesson import QUICK, ROOT, plt, savefig, trained_run

from minidiff.embeddings import load_embedding, save_embedding
from minidiff.lora import save_lora
from minidiff.pipeline import load_pipeline
from minidiff.train import finetune as F
from minidiff.train.dreambooth import DreamBoothConfig, class_pictures, train_dreambooth
from minidiff.train.lora import LoRAConfig, init_adapters, lora_layers, lora_targets, train_lora, with_adapters
from minidiff.train.textual_inversion import TextualInversionConfig, train_textual_inversion

t_start = time.perf_counter()
pipe = load_pipeline()  # the built-in model, frozen
STEPS = 6 if QUICK else 300  # training steps of each method
SAMPLE_STEPS = 4 if QUICK else 30  # DDIM steps when drawing
SAMPLES = 1 if QUICK else 2  # pictures per prompt when measuring
RANKS = (1, 4, 16)  # LoRA ranks
# The word vectors and LoRA files of a full run (300 steps each: several minutes) are kept in runs/lesson10,
# and a copy ships in lessons/checkpoints/lesson10 (tens of kB to 0.4 MB each): read back if there, else
# trained here.  DreamBooth's UNets (8 MB each) are not kept: section 2 always trains them.
SAVED = trained_run("lesson10", ["ring.safetensors", "orange.safetensors", "history.json",
                                *(f"lora_r{r}.safetensors" for r in RANKS)])
KEEP = None if (SAVED or QUICK) else ROOT / "runs" / "lesson10"  # a full run keeps what it trained
if KEEP:
    KEEP.mkdir(parents=True, exist_ok=True)
history = json.loads((SAVED / "history.json").read_text()) if SAVED else {}

ring, orange = F.draw_subject("ring"), F.draw_subject("orange")
fig, axes = plt.subplots(2, 4, figsize=(8, 4.4))
for row, (name, s) in enumerate((("ring", ring), ("orange", orange))):
    for ax, im, cap in zip(axes[row], s.images, s.captions):
        ax.imshow(im)
        ax.set_title(cap.replace("{}", "[V]"), fontsize=7)
        ax.axis("off")
fig.suptitle("the subjects: four pictures each, with captions ([V] = the word to learn)")
savefig(fig, "10_subjects.png")

# %% [markdown]
# ## 1. Textual inversion: one new row in the embedding table
#
# The tokenizer gets a new token (id 49408, after CLIP's 49,408) and the text encoder's table a new
# row, initialised from a related word ("circle" for the ring, "red" for orange).  Only that row is an
# optax parameter; the loss writes it into the frozen table (`table.at[49408].set(e)`), so every other
# weight stays bit-identical.  (The cell reads back the 300-step vectors a full run kept, `SAVED`, and
# trains them only when there are none.)

# %%
ti = {}
for word, subject, init in (("ring", ring, "circle"), ("orange", orange, "red")):
    if SAVED:
        ti[word] = load_embedding(SAVED / f"{word}.safetensors")[f"<{word}>"]
    else:
        cfg = TextualInversionConfig(token=f"<{word}>", init_word=init, steps=STEPS)
        ti[word], history[f"ti_{word}"] = train_textual_inversion(pipe, subject, cfg, progress=False)
        if KEEP:
            save_embedding(KEEP / f"{word}.safetensors", f"<{word}>", ti[word])
ti_ring, ti_orange = ti["ring"], ti["orange"]
h_ti_ring, h_ti_orange = history["ti_ring"], history["ti_orange"]
with_words = load_pipeline()
with_words.add_tokens({"<ring>": ti_ring, "<orange>": ti_orange})

# Which known words are the learned vectors closest to?
table = np.asarray(pipe.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"], np.float32)
words = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "small", "large", "top", "left"]
ids = [pipe.tokenizer.encode(w)[0] for w in words]
cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
for name, v in (("<ring>", ti_ring), ("<orange>", ti_orange)):
    near = sorted(((cos(v, table[i]), w) for w, i in zip(words, ids)), reverse=True)[:3]
    print(f"{name:9s} nearest words: " + ", ".join(f"{w} ({c:.2f})" for c, w in near))

# %% [markdown]
# ## 2. DreamBooth: fine-tune the UNet, with and without prior preservation
#
# First the frozen model draws the *class*: "a red circle in the top left" etc. (the subject's captions
# without the identifier).  Then the UNet trains on the subject's pictures with "a red sks circle ...",
# plus, with prior preservation, on those class pictures with their class prompts (lambda = 1).
#
# **The objective, term by term** (Ruiz et al. 2023, eq. 2).  With the subject's latents $z$ and
# captions $c$ ("a red sks circle ..."), and $N$ pictures $z^{pr}$ that the *frozen* model drew for
# the class prompts $c^{pr}$ ("a red circle ..."):
#
# $$L(\theta) = \mathbb E\,\|v - \hat v_\theta(z_t, t, c)\|^2 \;+\; \lambda\,\mathbb E\,\|v^{pr} - \hat v_\theta(z^{pr}_t, t', c^{pr})\|^2 .$$
#
# The first term alone is the plain diffusion loss on four pictures: minimised, the model draws
# the subject whenever it sees "red ... circle", because nothing asks it to keep drawing circles
# (the "language drift" and overfitting of the paper).  The second term is the same regression on
# the frozen model's *own* samples: its minimiser for $c^{pr}$ is the frozen model's behaviour on
# that prompt, so it anchors the class while the first term moves the identifier.  In code it is
# one line, `finetune.prior_preservation_loss`, shared by DreamBooth and LoRA.
#
# **Why a rare identifier.** The identifier should carry as little meaning as possible, so that
# the fine-tuning writes the subject into it instead of fighting what it already means (a known
# word, e.g. "blue", would pull the pictures towards blue, and learning the subject would change
# what "blue" means everywhere).  The cell below measures how much inserting a word moves the
# frozen UNet's prediction, relative to how much the whole prompt moves it from the empty prompt:
# "sks", a word the mini model never saw, moves it least of the words tried at high noise, where the
# layout is decided, and a colour word ("blue") most.  It is not zero: an unseen token's random
# embedding still shifts the attention, which is why the paper picks tokens that are rare *and*
# short, and why the frozen row of §4 is worth looking at (what the model draws for the "sks"
# prompts before any training).

# %%
from minidiff.nn.unet import UNet2DCondition  # noqa: E402

unet_apply = jax.jit(lambda x, t, c: UNet2DCondition(pipe.unet_config).apply({"params": pipe.params["unet"]}, x, t, c))
base_prompt = "a red circle in the top left"
inserted = {w: f"a red {w} circle in the top left" for w in ("sks", "large", "left", "blue")}
contexts = {k: pipe.encode_text([p])[0] for k, p in {"base": base_prompt, "empty": "", **inserted}.items()}
lat = jax.random.normal(jax.random.key(0), (16, pipe.unet_config.sample_size, pipe.unet_config.sample_size,
                                            pipe.unet_config.in_channels))
moved = {}
for t in (200, 500, 800):
    out = {k: np.asarray(unet_apply(lat, np.full(len(lat), t), np.broadcast_to(c, (len(lat), *c.shape))))
           for k, c in contexts.items()}
    signal = np.linalg.norm(out["base"] - out["empty"])
    moved[t] = {w: float(np.linalg.norm(out[w] - out["base"]) / signal) for w in inserted}
    print(f"t = {t}: prediction moved by inserting the word, relative to the prompt's own effect: "
          + ", ".join(f"{w} {m:.2f}" for w, m in moved[t].items()))
assert moved[800]["sks"] < moved[800]["blue"]

# %%
db_cfg = DreamBoothConfig(steps=STEPS, class_images=2 if QUICK else 8, class_steps=SAMPLE_STEPS)
class_set = class_pictures(pipe, ring, db_cfg, progress=False)
unet_prior, h_prior = train_dreambooth(pipe, ring, db_cfg, progress=False, class_set=class_set)
if QUICK:  # quick mode shows the mechanics once: the run without the prior is the same code with lambda = 0
    unet_free, h_free = unet_prior, h_prior
else:
    unet_free, h_free = train_dreambooth(pipe, ring, DreamBoothConfig(steps=STEPS, prior_weight=0.0), progress=False)


db_prior, db_free = pipe.with_params(unet=unet_prior), pipe.with_params(unet=unet_free)
db_prior.vocabulary = db_free.vocabulary = pipe.vocabulary | {"sks"}  # the tuned UNets know the identifier

# %% [markdown]
# ## 3. LoRA: a low-rank change of a few weights
#
# DreamBooth moves all of the UNet's weights.  LoRA freezes them and learns, for each attention
# projection $W$ ($d_{out} \times d_{in}$: $W_q, W_k, W_v, W_o$ of every self- and cross-attention), two thin
# matrices: $W' = W + \frac{\alpha}{r} B A$ with $A$ ($r \times d_{in}$) and $B$ ($d_{out} \times r$).  That is
# $r (d_{in} + d_{out})$ numbers instead of $d_{in} d_{out}$, and the update has rank at most $r$.  $B$
# starts at zero, so training starts exactly at the frozen model (checked below); $A$ starts random,
# so that $B$'s gradient, $\partial L / \partial W' \cdot A^T$, is not zero.  The loss is DreamBooth's, prior
# term included, and the result is a small file in the diffusers / PEFT layout (`minidiff lora`;
# `txt2img --lora`; diffusers' `load_lora_weights` reads it too).

# %%
unet32 = jax.tree.map(lambda a: np.asarray(a, np.float32), pipe.params["unet"])
targets = lora_targets(unet32, LoRAConfig.targets)
for r in (1, 4, 16):
    a0 = init_adapters(unet32, targets, r, jax.random.PRNGKey(0))
    n_lora = sum(f["down"].size + f["up"].size for f in a0.values())
    n_dense = sum(f["down"].shape[1] * f["up"].shape[0] for f in a0.values())
    same = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(with_adapters(unet32, a0, targets, 1.0)),
                                                    jax.tree.leaves(unet32)))
    print(f"rank {r:2d}: {len(targets)} projections, {n_lora:,} numbers (the projections hold {n_dense:,}); "
          f"B = 0 gives the frozen UNet exactly: {same}")

lora_files, loras = {}, {}
RANKS = (4,) if QUICK else RANKS  # quick mode: one rank (read back, or trained a few steps)
if not SAVED:
    lora_dir = KEEP or Path(tempfile.mkdtemp(prefix="minidiff_lesson10_"))
for r in RANKS:
    if SAVED:
        lora_files[r] = SAVED / f"lora_r{r}.safetensors"
    else:
        cfg = LoRAConfig(rank=r, steps=STEPS, class_images=db_cfg.class_images, class_steps=SAMPLE_STEPS)
        adapters, history[f"lora_r{r}"] = train_lora(pipe, ring, cfg, progress=False, class_set=class_set)
        # the diffusers / PEFT file (float16: half the bytes, the same pictures to rounding)
        lora_files[r] = save_lora(lora_dir / f"lora_r{r}.safetensors", lora_layers(adapters, 1.0), dtype=np.float16)
    loras[r] = pipe.with_params()  # the pipeline's own loading path: fuse W + (alpha / r) B A into a copy
    loras[r].load_lora(lora_files[r])
    loras[r].vocabulary = pipe.vocabulary | {"sks"}
lora_bytes = {r: lora_files[r].stat().st_size for r in RANKS}
h_lora = {r: history[f"lora_r{r}"] for r in RANKS}
if KEEP:
    (KEEP / "history.json").write_text(json.dumps({k: {"step": list(map(int, h["step"])), "loss": list(map(float, h["loss"]))}
                                                   for k, h in history.items()}))

fig, ax = plt.subplots(figsize=(6, 3.2))
for name, h in (("TI <ring>", h_ti_ring), ("TI <orange>", h_ti_orange), ("DreamBooth + prior", h_prior),
                ("DreamBooth, no prior", h_free), *((f"LoRA r={r} + prior", h_lora[r]) for r in RANKS)):
    ax.plot(h["step"], h["loss"], label=name)
ax.set_xlabel("step")
ax.set_ylabel("loss (10-step mean)")
ax.legend(fontsize=8)
ax.set_title("training losses (with the prior: instance + class terms)")
savefig(fig, "10_losses.png")

# %% [markdown]
# ## 4. The seed's experiment: the same prompts with and without the identifier, across contexts
#
# Rows: the frozen model, textual inversion, DreamBooth with and without prior preservation, LoRA.
# Columns: the subject in three places it was shown at and three it never was; in a colour it was
# never shown in; then the class ("a red circle ...", "a green circle ...") that it must not take over.

# %%
places = ["top left", "center", "bottom left", "bottom right", "top", "right"]
prompts = ([f"a red [V] circle {F.where(p)}" for p in places] + ["a blue [V] circle on the right", "a red circle in the bottom right",
                                                                  "a green circle on the left"])
models = [("frozen", pipe, "sks"), ("textual inversion", with_words, "<ring>"),
          ("DreamBooth + prior", db_prior, "sks"), ("DreamBooth, no prior", db_free, "sks"),
          ("LoRA r=4 + prior", loras[4], "sks")]
fig, axes = plt.subplots(len(models), len(prompts), figsize=(1.35 * len(prompts), 1.6 * len(models)))
for r, (name, model, word) in enumerate(models):
    images = model([p.replace("[V]", word) for p in prompts], steps=SAMPLE_STEPS, seed=2)
    for c, (ax, im) in enumerate(zip(axes[r], images)):
        ax.imshow(im)
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0:
            ax.set_title(prompts[c].replace(" in the ", "\n").replace(" on the ", "\n").replace(" at the ", "\n"),
                         fontsize=7)
        if c == 0:
            ax.set_ylabel(name, fontsize=7)
fig.suptitle("the subject in seen and unseen places (first three seen), then the class; [V] = <ring> for textual "
             "inversion, sks for the others and the frozen model", fontsize=9)
savefig(fig, "10_contexts.png")

# %% [markdown]
# ## 5. The comparison table, measured
#
# - **storage**: what must be kept to use the result (the embedding file; the UNet in float16; the LoRA file);
# - **fidelity**: "a red [V] circle <place>" over all 9 places, fraction drawn as a red ring in the right
#   place (`finetune.is_ring`: the shape's centre is dark); and "a green / blue / yellow [V] circle <place>",
#   a context never shown, drawn as a ring of that colour;
# - **class drift**: "a red circle <place>" drawn as a ring (the class taking the subject's look), and
#   "a <colour> circle <place>" still drawn with the asked shape, colour and place (the class's variety).

# %%
bytes_embedding = ti_ring.astype(np.float32).nbytes
bytes_unet = sum(np.size(a) for a in jax.tree.leaves(unet_prior)) * 2  # float16, as the model file stores it
rows = []
for name, model, word, storage in [("frozen model", pipe, "sks", 0), ("textual inversion", with_words, "<ring>", bytes_embedding),
                                   ("DreamBooth + prior", db_prior, "sks", bytes_unet),
                                   ("DreamBooth, no prior", db_free, "sks", bytes_unet),
                                   *((f"LoRA r={r} + prior", loras[r], "sks", lora_bytes[r]) for r in RANKS)]:
    fid, _ = F.evaluate_subject(model, "ring", word, samples=SAMPLES, steps=SAMPLE_STEPS)
    # Prompts without the new token give bit-identical pictures after textual inversion (tested in
    # tests/test_finetune.py), so its class drift is the frozen model's: no need to draw it again.
    if name != "textual inversion":
        drift = F.evaluate_class(model, samples=1, steps=SAMPLE_STEPS)
    rows.append([name, f"{storage:,}", f"{fid['ring_red_placed']:.0%}", f"{fid['other_colours_ring_right_colour']:.0%}",
                 f"{drift['class_prompt_rings']:.0%}", f"{drift['coloured_circles_right']:.0%}"])
orange_fid, _ = F.evaluate_subject(with_words, "orange", "<orange>", samples=SAMPLES, steps=SAMPLE_STEPS)
red_fid, _ = F.evaluate_subject(pipe, "orange", "red", samples=SAMPLES, steps=SAMPLE_STEPS)
n_subject, n_class = 9 * SAMPLES, 9  # pictures behind each percentage (the class: one picture per prompt)
header = ["", "bytes to keep", f"red ring,\nright place (n={n_subject})", f"ring in other\ncolours (n={3 * n_subject})",
          f"'a red circle'\ndrawn as a ring (n={n_class})", f"coloured circles\nright (n={4 * n_class})"]
print(" | ".join(h.replace("\n", " ") for h in header))
for r in rows:
    print(" | ".join(r))
print(f"textual inversion of a colour: 'a <orange> <shape> <place>' orange in {orange_fid['orange']:.0%} "
      f"(median hue {orange_fid['median_hue']:.0f} deg); 'a red <shape> <place>' in {red_fid['orange']:.0%}")

fig, ax = plt.subplots(figsize=(11, 1.2 + 0.35 * len(rows)))
ax.axis("off")
t = ax.table(cellText=rows, colLabels=header, loc="center", cellLoc="center")
t.auto_set_font_size(False)
t.set_fontsize(8)
t.scale(1, 1.9)
ax.set_title(f"{STEPS} steps each, {SAMPLE_STEPS} DDIM steps, guidance 7.5" + (" (quick mode)" if QUICK else ""),
             fontsize=9)
savefig(fig, "10_comparison_table.png")

# %% [markdown]
# What to take away:
#
# - Textual inversion stores a few hundred bytes and cannot hurt the model, but it can only point at
#   what the frozen UNet already draws: a ring is out of reach, orange (between red and yellow) is not.
# - DreamBooth learns the ring's *look* and carries it to places it never saw, at the cost of a whole
#   UNet per subject; without the prior loss the class starts to turn into the subject.
# - LoRA keeps a file of kilobytes and the frozen model untouched (remove the LoRA and the weights are
#   bit for bit the originals): how much of the ring it learns, and how much of the class it moves,
#   depends on its rank and steps — the table above, and `benchmarks/finetune_methods.py`, measure it.

# %%
print(f"lesson 10 ran in {time.perf_counter() - t_start:.0f} s")

# %% [markdown]
# ## Exercises
# Solutions, each checked by the test suite: `lessons/solutions/10_textual_inversion_vs_dreambooth.py`.
#
# 1. **The bytes at Stable Diffusion's size.** Count (with `jax.eval_shape`, nothing allocated) what
#    each method keeps for SD 1.5: textual inversion (one 768-d row), DreamBooth (the UNet in float16)
#    and LoRA at rank 4 on the same attention projections as here (`LoRAConfig.targets`, float16).
# 2. **What the LoRA update can express.** Show that $\frac{\alpha}{r}BA$ has rank at most r (measure the
#    singular values of one trained-size random update), and that a LoRA of rank $\min(d_{in}, d_{out})$
#    can represent any change of W (fit a random $\Delta W$ exactly with a full-rank B, A).
