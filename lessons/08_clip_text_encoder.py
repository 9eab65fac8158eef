# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 8 — CLIP's text encoder: from a prompt to a 77 x 768 context
#
# Stable Diffusion's UNet never sees letters.  It cross-attends to a matrix of 77 rows of 768
# numbers (1024 for SD 2.x): the *context* $c$.  This lesson follows a prompt all the way there:
#
#     "A photo of a cat"  --clean, pre-tokenize-->  a | photo | of | a | cat
#                         --UTF-8 bytes, BPE----->  a</w> photo</w> of</w> a</w> cat</w>
#                         --ids, 77 slots-------->  49406 320 1125 539 320 2368 49407 49407 ... (77)
#                         --CLIP text transformer->  c in R^{77 x 768}
#
# 1. byte-level BPE, one merge at a time (`minidiff.tokenizer`);
# 2. the 77 slots: start token, end token, and the two padding rules of SD 1.x and SD 2.x;
# 3. the transformer and its *causal* mask: position $i$ only ever sees tokens $0..i$
#    (`minidiff.nn.clip`);
# 4. what "similar prompts" means to an encoder, and what it cannot mean without trained weights;
# 5. the contrastive loss that trains it (symmetric InfoNCE, derived and checked), and what the
#    built-in mini CLIP, trained that way on captioned shapes, learned.

# %%
import sys
import time
import unicodedata
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _lesson import QUICK, plt, savefig

from minidiff.nn.clip import CLIPTextConfig, CLIPTextModel, quick_gelu
from minidiff.tokenizer import PATTERN, CLIPTokenizer, bytes_to_unicode, clean_text

if hasattr(sys.stdout, "reconfigure"):  # the lesson prints an emoji; never crash on a non-UTF-8 console
    sys.stdout.reconfigure(errors="backslashreplace")
t_start = time.perf_counter()
tok = CLIPTokenizer.from_bpe_gz()  # OpenAI's merges file, shipped with minidiff
print(tok)

# %% [markdown]
# ## 1. Byte-level BPE
#
# ### 1a. 256 bytes, 256 printable characters
# A word-level vocabulary meets words it has never seen ("minidiff", "🐱", "café" in a new
# spelling) and must answer "unknown".  CLIP's BPE works on the word's **UTF-8 bytes** instead:
# 256 symbols spell every possible text, so nothing is ever unknown; frequent byte sequences are
# then glued into bigger symbols.
#
# The merges file is a text file with one "a b" pair a line, split on spaces, so every byte
# needs a visible, space-free stand-in.  `bytes_to_unicode` keeps the 188 printable bytes
# ("!".."~", "¡".."¬", "®".."ÿ") as themselves and moves the other 68 (space, control
# characters, the soft hyphen) to chr(256), chr(257), ...: a space is "Ġ", a newline "Ċ".
# "é" is the two bytes C3 A9, spelled "Ã©"; an emoji is four bytes, so four symbols.

# %%
table = bytes_to_unicode()
for b in (ord("a"), ord("!"), 0x20, 0x0A, 0x00, 0xAD, 0xC3, 0xA9, 0xF0):
    print(f"  byte 0x{b:02X}  ->  {table[b]!r:6s} (U+{ord(table[b]):04X})")
print("'café' ->", "".join(table[b] for b in "café".encode()), " '\N{CAT FACE}' ->",
      "".join(table[b] for b in "\N{CAT FACE}".encode()))

fig, ax = plt.subplots(figsize=(10, 10.5))
shifted = np.array([[ord(table[16 * r + c]) != 16 * r + c for c in range(16)] for r in range(16)])
ax.imshow(shifted, cmap="Oranges", vmin=0, vmax=2.2)
for r in range(16):
    for c in range(16):
        ax.text(c, r - 0.12, table[16 * r + c], ha="center", va="center", fontsize=14, family="DejaVu Sans Mono")
        ax.text(c, r + 0.32, f"{16 * r + c:02X}", ha="center", va="center", fontsize=6, color="dimgrey")
ax.set_xticks(range(16), [f"_{c:X}" for c in range(16)])
ax.set_yticks(range(16), [f"{r:X}_" for r in range(16)])
ax.set_title("bytes_to_unicode: the character that spells each byte (small: the byte in hex)\n"
             "white: printable byte, kept as itself;  orange: moved to chr(256 + n)")
savefig(fig, "08_byte_alphabet.png")

# %% [markdown]
# ### 1b. Pre-tokenization
# Before any merging, the prompt is cleaned (Unicode NFC, runs of whitespace -> one space,
# lower case) and cut into "words" by CLIP's regular expression
#
#     's|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
#
# English contractions, a run of letters, **one** digit (so "1920" costs four tokens), or a run
# of anything that is neither space, letter nor digit ("!!", an emoji).  Merges never cross the
# border of a word, and the spaces themselves disappear: the end of each word is marked with
# `</w>` on its last symbol instead.

# %%
prompt = "A photo-realistic CAFÉ's 1920s cat!! \N{CAT FACE} don't"
print("prompt :", prompt)
print("clean  :", clean_text(prompt))
print(f"  {'word':12s} {'spelled (bytes)':18s} {'BPE symbols':34s} ids")
for word in PATTERN.findall(clean_text(prompt)):
    spelled = "".join(table[b] for b in word.encode("utf-8"))
    symbols = tok.bpe(spelled)
    print(f"  {word!r:12s} {spelled:18s} {' '.join(symbols):34s} {[tok.encoder[s] for s in symbols]}")

# %% [markdown]
# ### 1c. The merge loop
# The merges file lists symbol pairs in the order they were learnt on CLIP's training captions,
# most frequent first: rank 0 is ("i", "n"), rank 1 ("t", "h"), ...  Each merge adds the joined
# symbol to the vocabulary, so its id is $512 + \text{rank}$ (after the 256 byte symbols and the
# 256 byte symbols with `</w>`): "cat</w>" is merge 1856, id 2368.
#
# To encode one word, start from its bytes, `</w>` glued to the last one, and repeat:
#
# $$ (a, b)^\star = \arg\min_{(a, b)\ \text{adjacent}} \operatorname{rank}(a, b), \qquad
#    \text{replace every adjacent } a\,b \text{ by } ab, $$
#
# until no adjacent pair is in the merges list.  The loop below is the one in
# `CLIPTokenizer.bpe`, with a record of every step; the assertion checks it against the library.
# In the figure every row is the word before one merge; the small number in each gap is the rank
# of that adjacent pair ("·": not a merge), and the lowest one (red) is merged next.


# %%
def bpe_steps(word):
    """[(symbols, ranks of adjacent pairs, index of the pair merged next or None), ...]."""
    symbols, steps = [*word[:-1], word[-1] + "</w>"], []
    while True:
        ranks = [tok.bpe_ranks.get(pair) for pair in zip(symbols, symbols[1:])]
        known = [r for r in ranks if r is not None]
        if not known:
            steps.append((symbols, ranks, None))
            break
        best = ranks.index(min(known))
        steps.append((symbols, ranks, best))
        pair, merged, i = (symbols[best], symbols[best + 1]), [], 0
        while i < len(symbols):  # merge every occurrence of the pair, left to right
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    assert tuple(symbols) == tok.bpe(word), (symbols, tok.bpe(word))
    return steps


def describe(word):
    if word.isascii():
        return repr(word)
    names = ", ".join(f"U+{ord(ch):04X} {unicodedata.name(ch)}" for ch in word if not ch.isascii())
    utf8 = f"UTF-8 {word.encode().hex(' ').upper()}"
    if any(ord(ch) > 0xFFFF for ch in word):  # the figure font has no emoji glyphs: name it instead
        return f"emoji {names}, {utf8}"
    return f"{word!r} ({names}; {utf8})"


words = ["tokenizer", "photorealistic", "café", "\N{CAT FACE}"]
traces = [bpe_steps("".join(table[b] for b in w.encode("utf-8"))) for w in words]
for w, steps in zip(words, traces):
    final = steps[-1][0]
    print(f"{describe(w)}: {len(steps) - 1} merges -> {final} -> ids {[tok.encoder[s] for s in final]}")

W, FS = 13.0, 10  # figure width (inches), font size of the symbols (points)
fig, axes = plt.subplots(len(words), 1, figsize=(W, 0.42 * sum(len(s) for s in traces) + 1.2 * len(words)),
                         gridspec_kw={"height_ratios": [len(s) + 1.2 for s in traces]})
fig.subplots_adjust(left=0.01, right=0.99)
PT = 100 / (0.98 * W * 72)  # x axis runs 0..100: data units per point
CW, PAD, GAP = 0.602 * FS * PT, 8 * PT, 34 * PT  # monospace advance width, box padding, gap between boxes
for ax, w, steps in zip(axes, words, traces):
    for row, (symbols, ranks, best) in enumerate(steps):
        x = 0.0
        for j, s in enumerate(symbols):
            width = CW * len(s) + PAD
            hot = best is not None and j in (best, best + 1)
            ax.add_patch(plt.Rectangle((x, -row - 0.38), width, 0.76, facecolor="mistyrose" if hot else "aliceblue",
                                       edgecolor="crimson" if hot else "steelblue", lw=1.2 if hot else 0.7))
            ax.text(x + width / 2, -row, s, ha="center", va="center", fontsize=FS, family="DejaVu Sans Mono")
            x += width
            if j < len(ranks):
                r = ranks[j]
                ax.text(x + GAP / 2, -row, "·" if r is None else str(r), ha="center", va="center", fontsize=7,
                        color="crimson" if j == best else "dimgrey", weight="bold" if j == best else "normal")
                x += GAP
        note = (f"merge rank {ranks[best]}: {symbols[best]!r} + {symbols[best + 1]!r}" if best is not None
                else "no adjacent pair is a merge: done -> ids " + " ".join(str(tok.encoder[s]) for s in symbols))
        ax.text(x + 2, -row, note, va="center", fontsize=8, color="crimson" if best is not None else "darkgreen")
    ax.set_xlim(0, 100)
    ax.set_ylim(-len(steps) + 0.4, 0.8)
    ax.axis("off")
    ax.set_title(f"{describe(w)}: {len(steps) - 1} merges", loc="left", fontsize=10)
savefig(fig, "08_bpe_merges.png")

# %% [markdown]
# "tokenizer" ends as `token` + `izer</w>`: a frequent stem and a frequent ending, each one id.
# The emoji's four bytes collapse into one symbol because emoji are common in web captions;
# a rare character would stay as several byte tokens — long, but never unknown.

# %% [markdown]
# ## 2. 77 slots
# CLIP's text transformer has 77 learned position embeddings, so every prompt becomes exactly
# 77 ids:
#
# $$ [\,49406\ (\texttt{<|startoftext|>}),\ t_1, \dots, t_n,\ 49407\ (\texttt{<|endoftext|>}),\
#    \text{pad}, \dots, \text{pad}\,], \qquad n \le 75. $$
#
# The padding differs between the two families:
#
# * **SD 1.x** (OpenAI CLIP, transformers' tokenizer) pads with the end token 49407 again;
# * **SD 2.x** (OpenCLIP) pads with **0**, which is the token "!" (`CLIPTokenizer(..., pad_id=0)`
#   or `tok(prompts, pad_token=0)`).
#
# Neither pipeline passes an attention mask: the UNet cross-attends to all 77 rows, padding
# included, so each model must be fed the padding it was trained with (section 3 shows that the
# padding changes those rows).  A prompt longer than 75 tokens is cut, with a warning.

# %%
short = "a photo of a cat"
long = ("a highly detailed photorealistic portrait of an old sea captain with a white beard and a blue coat, "
        "standing on the deck of a wooden ship in a storm, dramatic lighting, lightning in the dark clouds, "
        "waves crashing over the rail, rain, spray, seagulls, a lighthouse in the distance, sharp focus, 8k, "
        "trending on artstation, oil painting by a famous old master")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    long_ids = tok([long])[0]
print("encode(long) has", len(tok.encode(long)), "tokens; warning:\n ", caught[0].message)
print("kept:", tok.decode(long_ids))

rows = [("SD 1.x: pad with the end token 49407", tok([short])[0]),
        ("SD 2.x: pad with 0 ('!')", tok([short], pad_token=0)[0]),
        (f"a {len(tok.encode(long))}-token prompt, cut to 75 (dropped: {tok.decode(tok.encode(long)[75:])!r})",
         long_ids)]
fig, axes = plt.subplots(len(rows), 1, figsize=(18, 2.4 * len(rows)))
for ax, (title, ids) in zip(axes, rows):
    end = int(np.argmax(ids == tok.end_id))
    kind = ["start" if i == 0 else "word" if i < end else "end" if i == end else "pad" for i in range(77)]
    colours = {"start": "tab:green", "word": "tab:blue", "end": "tab:red", "pad": "lightgrey"}
    ax.bar(np.arange(77), 1, width=0.92, color=[colours[k] for k in kind])
    for i, (t, k) in enumerate(zip(ids.tolist(), kind)):
        label = str(t) if k != "word" else f"{t} {tok.decoder[t].removesuffix('</w>')}"
        ax.text(i, 0.5, label, rotation=90, ha="center", va="center", fontsize=6.5,
                color="white" if k in ("start", "word", "end") else "black")
    ax.set(xlim=(-0.6, 76.6), yticks=[], title=f"{title}  (green start, blue words, red end, grey padding)")
    ax.set_xticks(range(0, 77, 4))
axes[-1].set_xlabel("slot (position embedding index)")
fig.tight_layout()
savefig(fig, "08_77_slots.png")

# %% [markdown]
# ## 3. The transformer and its causal mask
# Each id becomes a learned token embedding plus a learned position embedding,
# $x^0_i = E[t_i] + P_i$, and then $N$ pre-LayerNorm blocks (12 for SD 1.x) update all 77 rows:
#
# $$ h = x + \mathrm{Attn}(\mathrm{LN}_1(x)), \qquad x' = h + W_2\,\mathrm{act}(W_1\,\mathrm{LN}_2(h)), $$
#
# $$ \mathrm{Attn}(X) = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt d} + M\right) V, \qquad
#    M_{ij} = \begin{cases} 0 & j \le i \\ -\infty & j > i \end{cases} $$
#
# with $Q, K, V = XW_Q, XW_K, XW_V$ per head ($d$ = 64, 12 heads).  $M$ is the **causal mask**:
# $e^{-\infty} = 0$, so row $i$ of the softmax puts no weight on later tokens, and by induction
# over the layers the output at position $i$ is a function of $t_0, \dots, t_i$ only.  CLIP was
# trained this way (like a language model, though with a contrastive loss), and SD keeps it.
#
# `act` is **quick_gelu**, $x\,\sigma(1.702\,x)$, OpenAI's cheap stand-in for GELU $x\,\Phi(x)$
# (SD 2.x's OpenCLIP uses the exact GELU).  The two differ by at most ~0.02 — but a model must
# run with the one it was trained with.
#
# What SD takes from the encoder:
#
# * **SD 1.x**: `last_hidden_state` $= \mathrm{LN}_f(x^{12})$, the last layer after the final
#   LayerNorm, all 77 rows: $c \in \mathbb R^{77 \times 768}$;
# * **SD 2.x**: the **penultimate** layer of OpenCLIP's 24-layer tower, then the final LayerNorm:
#   $c = \mathrm{LN}_f(x^{23}) \in \mathbb R^{77 \times 1024}$ (`clip_skip=1`; diffusers' SD 2
#   folders store just those 23 layers);
# * the *pooled* output — the row at the end token, which has seen the whole prompt — is what
#   CLIP's contrastive loss uses; SD 1.x/2.x's UNet does not (SDXL does).

# %%
def parameter_count(cfg):
    """Where the parameters are: embeddings, then per layer attention + MLP + two LayerNorms."""
    D, I = cfg.hidden_size, cfg.intermediate_size
    parts = {"token embedding": cfg.vocab_size * D, "position embedding": cfg.max_position_embeddings * D,
             "attention (q, k, v, out)": cfg.num_hidden_layers * 4 * (D * D + D),
             "MLP (fc1, fc2)": cfg.num_hidden_layers * (D * I + I + I * D + D),
             "LayerNorms": cfg.num_hidden_layers * 2 * 2 * D + 2 * D}
    return parts, sum(parts.values())


for name in ("toy", "sd15", "sd2"):
    cfg = getattr(CLIPTextConfig, name)()
    parts, total = parameter_count(cfg)
    print(f"  {name:5s} width {cfg.hidden_size:4d}, {cfg.num_hidden_layers:2d} layers, {cfg.hidden_act:10s} "
          f"{total / 1e6:6.1f} M parameters -> context (77, {cfg.hidden_size})")
print("  SD 1.x:", ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in parameter_count(CLIPTextConfig.sd15())[0].items()))

x = np.linspace(-4, 4, 401)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
axes[0].plot(x, quick_gelu(x), label=r"quick_gelu $x\,\sigma(1.702x)$")
axes[0].plot(x, nn.gelu(x, approximate=False), "--", label=r"gelu $x\,\Phi(x)$")
axes[0].plot(x, np.maximum(x, 0), ":", color="grey", label="relu")
axes[0].legend()
axes[0].set_title("the MLP's activation")
axes[1].plot(x, quick_gelu(x) - nn.gelu(x, approximate=False))
axes[1].axhline(0, color="grey", lw=0.5)
axes[1].set_title("quick_gelu - gelu")
savefig(fig, "08_quick_gelu.png")

# %% [markdown]
# The mask itself (white: $M_{ij} = 0$, may attend; black: $-\infty$), for the 77 slots and, on
# the right, for the first 9 slots of a prompt: "cat" sees "a photo of a" and itself, "of" does
# not yet know what it is a photo of.

# %%
mask = np.tril(np.ones((77, 77), bool))  # the mask CLIPTextModel builds: key j <= query i
prompt = "a photo of a cat on a sofa"
ids = tok([prompt])[0]
names = ["<start>" if t == tok.start_id else "<end>" if t == tok.end_id else tok.decoder[t].removesuffix("</w>")
         for t in ids[:9]]
fig, axes = plt.subplots(1, 2, figsize=(13, 6.2))
axes[0].imshow(mask, cmap="gray", interpolation="nearest")
axes[0].set(title="causal mask, 77 x 77", xlabel="key j (attended to)", ylabel="query i (attending)")
axes[1].imshow(mask[:9, :9], cmap="gray", interpolation="nearest", vmin=0, vmax=1)
for i in range(9):
    for j in range(9):
        axes[1].text(j, i, "0" if mask[i, j] else "-inf", ha="center", va="center", fontsize=8,
                     color="black" if mask[i, j] else "white")
axes[1].set_xticks(range(9), names, rotation=45)
axes[1].set_yticks(range(9), names)
axes[1].set_title(f"M for {prompt!r}, first 9 slots")
savefig(fig, "08_causal_mask.png")

# %% [markdown]
# Now the test of the claim, on `CLIPTextModel` with random weights (no trained CLIP weights can
# be downloaded here; the causal structure does not depend on the weights).  Quick mode uses the
# toy tower (width 64, 2 layers), full mode the SD 1.x size (123 M parameters, 12 layers).  Three
# pairs of inputs that agree up to some slot and differ after it:
#
# 1. "a photo of a **cat** on a sofa" vs "a photo of a **dog** on a sofa" (slot 5 differs);
# 2. the same prompt padded the SD 1.x way and the SD 2.x way (everything after the end token);
# 3. 77 random token ids, and the same with every id after slot 40 redrawn.
#
# For each slot $i$ we plot $\max_k |c_{ik} - c'_{ik}|$ over the 768 (or 64) features of
# `last_hidden_state`.

# %%
config = CLIPTextConfig.toy() if QUICK else CLIPTextConfig.sd15()
model = CLIPTextModel(config)
t0 = time.perf_counter()
params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32))
encode = jax.jit(model.apply)  # encode(params, ids) -> CLIPTextOutput
n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
assert n_params == parameter_count(config)[1]
print(f"random {'toy' if QUICK else 'SD 1.x-size'} text encoder ({n_params:,} parameters) initialised in "
      f"{time.perf_counter() - t0:.1f} s")

rng = np.random.default_rng(0)
random_ids = rng.integers(0, tok.start_id, 77)
random_ids2 = random_ids.copy()
random_ids2[41:] = rng.integers(0, tok.start_id, 77 - 41)
pairs = [("cat -> dog", tok([prompt])[0], tok([prompt.replace("cat", "dog")])[0]),
         ("SD 1.x vs SD 2.x padding", tok([prompt])[0], tok([prompt], pad_token=0)[0]),
         ("random ids, redrawn after slot 40", random_ids, random_ids2)]
batch = np.stack([ids for _, a, b in pairs for ids in (a, b)]).astype(np.int32)
t0 = time.perf_counter()
out = encode(params, batch)
hidden = np.asarray(out.last_hidden_state)
print(f"encoded {batch.shape} -> {hidden.shape} in {time.perf_counter() - t0:.1f} s (including compilation)")

fig, axes = plt.subplots(len(pairs), 1, figsize=(13, 2.6 * len(pairs)), sharex=True)
for k, (ax, (title, a, b)) in enumerate(zip(axes, pairs)):
    diff = np.abs(hidden[2 * k] - hidden[2 * k + 1]).max(-1)
    first = int(np.argmax(a != b))
    assert diff[:first].max() <= 1e-5 and diff[first:].min() > 1e-3, title  # 0 on a CPU, bit for bit
    print(f"  {title:34s}: first differing token at slot {first}; max|diff| before it = {diff[:first].max():.1e}, "
          f"from it on >= {diff[first:].min():.2g}")
    ax.bar(np.arange(first, 77), diff[first:], color="tab:blue", width=0.8, label="max |difference|")
    ax.scatter(np.arange(first), np.full(first, 1e-3), marker="o", s=10, color="tab:green",
               label="exactly 0 (bit for bit)" if diff[:first].max() == 0 else f"< {diff[:first].max():.0e}")
    ax.axvline(first - 0.5, color="crimson", ls="--", label=f"first changed token (slot {first})")
    ax.set_yscale("log")
    ax.set_ylim(5e-4, diff.max() * 3)
    ax.set(ylabel="max |difference|", title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
axes[-1].set_xlabel("slot i of last_hidden_state")
fig.suptitle(f"changing tokens after slot i never changes the output at slot i "
             f"({'toy' if QUICK else 'SD 1.x-size'} CLIP text encoder, random weights)", y=1.0)
fig.tight_layout()
savefig(fig, "08_causality.png")

# %% [markdown]
# Two consequences.  Everything up to the end token is the same whichever padding is used, but
# the rows after it are not — and the UNet reads them, so a model must get its own padding rule.
# And the pooled row (at the end token) is the only one that has seen the whole prompt.
#
# SD 2.x's "penultimate layer" is the same machinery stopped one block early:
# `clip_skip=1` equals the final LayerNorm applied to the second-to-last hidden state (to float32
# rounding).

# %%
full, skip1 = jax.jit(lambda p, ids: (model.apply(p, ids, output_hidden_states=True),
                                      model.apply(p, ids, clip_skip=1)))(params, batch[:1])
ln_f = nn.LayerNorm(epsilon=config.layer_norm_eps).apply({"params": params["params"]["final_layer_norm"]},
                                                         full.hidden_states[-2])
print(f"{len(full.hidden_states)} hidden states (embeddings + {config.num_hidden_layers} layers); "
      f"max |clip_skip=1 - LN_f(hidden_states[-2])| = {float(jnp.abs(skip1.last_hidden_state - ln_f).max()):.1e}")

# %% [markdown]
# ## 4. Embeddings of related prompts
# With trained weights, CLIP's text encoder places prompts that *mean* similar things near each
# other: it was trained (Radford et al. 2021) so that the pooled text vector of a caption has a
# high cosine with the image vector of its picture, and low with other pictures in the batch.
# "a photo of a cat" lands near "a photo of a kitten", "a car" near "an automobile".
#
# **This lesson has no trained weights** (nothing can be downloaded), so here is the honest
# comparison.  For ten prompts, cosine similarities $\cos(u, v) = u\cdot v / \|u\|\|v\|$ of
#
# * (a) **bag of tokens**: the count vector of each prompt's token ids — pure overlap;
# * (b) the random-weight encoder's **pooled** output (the row at the end token);
# * (c) its **mean** over the prompt's rows (start to last word);
# * (d) the pooled outputs again, after subtracting their mean over the ten prompts.
#
# A random network is a fixed but arbitrary smooth function of the token sequence: it maps
# prompts that share tokens (and positions, and length) to similar vectors, and nothing else.
# "kitten" is as far from "cat" as "dog" is, and "a car" / "an automobile" share no token at
# all — whatever similarity the random encoder gives them comes from their equal length (the
# pooled row sits at the same slot, with the same position embedding).  Raw cosines are high
# everywhere (b, c) because all prompts share a large common part — the start token, the
# position embeddings of the same slots, which attention mixes into every row; subtracting the
# mean over the ten prompts (d) shows the structure underneath.  The random encoder's grid
# follows the grid of token overlap (the correlations in the titles), which is the point: the
# *semantic* part of a trained encoder's similarity — cat/kitten, car/automobile — is learnt,
# and here we have none of it.  Stable Diffusion's frozen encoder brings it from CLIP's 400
# million captioned images.
#
# Section 5 shows the other side: the built-in mini CLIP, trained contrastively on captioned shapes.

# %%
prompts = ["a red circle", "a red square", "a blue circle", "a blue square", "a photo of a cat",
           "a photo of a kitten", "a photo of a dog", "a painting of a cat", "a car", "an automobile"]
for p in prompts:
    print(f"  {p:22s} {tok.tokenize(p)}")
ids = tok(prompts)
bag = np.zeros((len(prompts), tok.vocab_size))
for row, p in enumerate(prompts):
    np.add.at(bag[row], tok.encode(p), 1)
out = encode(params, ids)
h, pooled = np.asarray(out.last_hidden_state), np.asarray(out.pooler_output)
n_rows = np.argmax(ids == tok.end_id, axis=1)  # start + words
mean = np.stack([h[r, :n_rows[r]].mean(0) for r in range(len(prompts))])


def cosine(v):
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    return v @ v.T


overlap, overlap_centred = cosine(bag), cosine(bag - bag.mean(0))
panels = [("(a) bag of tokens (overlap)", cosine(bag), None),  # (title, similarities, what to correlate with)
          ("(b) random encoder, pooled", cosine(pooled), overlap),
          ("(c) random encoder, mean over tokens", cosine(mean), overlap),
          ("(d) random encoder, pooled - mean pooled", cosine(pooled - pooled.mean(0)), overlap_centred)]
off = ~np.eye(len(prompts), dtype=bool)
fig, axes = plt.subplots(2, 2, figsize=(14, 13))
for ax, (title, s, reference) in zip(axes.flat, panels):
    ax.imshow(s, cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(len(prompts)):
        for j in range(len(prompts)):
            ax.text(j, i, f"{s[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(s[i, j]) > 0.6 else "black")
    ax.set_xticks(range(len(prompts)), prompts, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(prompts)), prompts, fontsize=8)
    if reference is not None:  # Pearson correlation over the 90 off-diagonal pairs
        r = np.corrcoef(s[off], reference[off])[0, 1]
        title += f"\ncorrelation with (a){' centred the same way' if reference is overlap_centred else ''}: {r:.2f}"
    ax.set_title(title, fontsize=10)
    print(f"  {title.splitlines()[0]:42s} cat~kitten {s[4, 5]:+.2f}  cat~dog {s[4, 6]:+.2f}  "
          f"car~automobile {s[8, 9]:+.2f}")
fig.suptitle(f"cosine similarity of prompts — {'toy' if QUICK else 'SD 1.x-size'} text encoder with RANDOM "
             "weights: it sees spelling, not meaning")
fig.tight_layout()
savefig(fig, "08_prompt_similarity.png")

# %% [markdown]
# ## 5. How CLIP is trained: the symmetric InfoNCE loss
# A batch holds $B$ (caption, picture) pairs.  The text tower gives $t_i$, the image tower $v_j$,
# both normalised to unit length, and the logits are their cosines over a temperature,
# $\ell_{ij} = \cos(t_i, v_j)/\tau$ with $\tau = e^{-s}$ ($s$ is learned; CLIP caps $e^{s}$ at 100).  Each
# caption must pick out its own picture among the $B$ — a $B$-way classification whose correct
# class is the diagonal — and each picture its caption:
#
# $$L = \frac12\Big[\underbrace{-\frac1B\sum_i \log\frac{e^{\ell_{ii}}}{\sum_j e^{\ell_{ij}}}}_{\text{caption}\to\text{picture}}
#      \ \underbrace{-\frac1B\sum_j \log\frac{e^{\ell_{jj}}}{\sum_i e^{\ell_{ij}}}}_{\text{picture}\to\text{caption}}\Big].$$
#
# Three facts follow from the formula and are checked below on a batch of four: when all logits
# are equal (an untrained model) each softmax is uniform and $L = \log B$; when every pair is
# closer to its partner than to the others, $L \to 0$ as $\tau \to 0$ (the temperature sets how much a
# margin counts); and $\log B - L$ lower-bounds the mutual information between captions and
# pictures (van den Oord et al. 2018), so a bigger batch can certify more.  In minidiff
# `clip_loss` (`minidiff/train/clip.py`) computes it, counting two pairs with the same caption
# both as matches (the shapes data repeat captions).

# %%
from minidiff.train.clip import clip_loss  # noqa: E402


def infonce_by_hand(t, v, tau):
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    logits = t @ v.T / tau
    log_softmax_rows = logits - np.log(np.exp(logits).sum(1, keepdims=True))  # caption -> pictures
    log_softmax_cols = logits - np.log(np.exp(logits).sum(0, keepdims=True))  # picture -> captions
    return -0.5 * (np.diag(log_softmax_rows).mean() + np.diag(log_softmax_cols).mean())


B, dim = 4, 8
rng_c = np.random.default_rng(0)
t_batch, v_batch = rng_c.standard_normal((2, B, dim))
for tau in (1.0, 0.1):
    ours = float(clip_loss(jnp.asarray(t_batch), jnp.asarray(v_batch), jnp.log(1 / tau), jnp.eye(B, dtype=bool)))
    hand = infonce_by_hand(t_batch, v_batch, tau)
    print(f"tau = {tau}: clip_loss {ours:.6f}, by hand {hand:.6f}")
    assert abs(ours - hand) < 1e-5
same = np.ones((B, dim))
print(f"all embeddings equal: L = {infonce_by_hand(same, same, 0.1):.4f} = log B = {np.log(B):.4f}")
assert abs(infonce_by_hand(same, same, 0.1) - np.log(B)) < 1e-9
aligned = t_batch + 0.1 * rng_c.standard_normal((B, dim))  # each picture near its own caption
losses = [infonce_by_hand(t_batch, aligned, tau) for tau in (1.0, 0.1, 0.01)]
print("aligned pairs, tau = 1, 0.1, 0.01:", np.round(losses, 4))
assert losses[0] > losses[1] > losses[2] and losses[2] < 1e-3

# %% [markdown]
# **What the trained mini CLIP learned.** The built-in model's text encoder (`load_clip`, trained by
# `minidiff train-mini-sd` on captioned shapes before the UNet) puts captions that describe the same
# *picture content* close together.  Below, its pooled text vectors for nine prompts (three colours
# x three shapes): pairs that share the colour or the shape are more similar than pairs that share
# nothing, though all nine share the same tokens "a" and the same length — unlike the random
# encoder of section 4, which can only see token overlap.

# %%
from minidiff.nn.clip import ContrastiveCLIP  # noqa: E402
from minidiff.pipeline import load_pipeline  # noqa: E402
from minidiff.train.mini_sd import load_clip  # noqa: E402

mini = load_pipeline()
clip, clip_params = load_clip()
colours, shapes = ("red", "green", "blue"), ("circle", "square", "triangle")
shape_prompts = [f"a {c} {s}" for c in colours for s in shapes]
emb = np.asarray(clip.apply({"params": clip_params}, mini.tokenize(shape_prompts), method=ContrastiveCLIP.encode_text))
sim = cosine(emb)
share_colour = np.array([[a.split()[1] == b.split()[1] for b in shape_prompts] for a in shape_prompts])
share_shape = np.array([[a.split()[2] == b.split()[2] for b in shape_prompts] for a in shape_prompts])
groups = {"same colour, other shape": share_colour & ~share_shape, "same shape, other colour": share_shape & ~share_colour,
          "nothing shared": ~share_colour & ~share_shape}
for name, mask in groups.items():
    print(f"  {name:26s} mean cosine {sim[mask].mean():+.3f}  (n = {mask.sum()} ordered pairs)")
assert min(sim[groups["same colour, other shape"]].mean(), sim[groups["same shape, other colour"]].mean()) \
    > sim[groups["nothing shared"]].mean()

fig, ax = plt.subplots(figsize=(7.5, 6.5))
ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1)
for i in range(len(shape_prompts)):
    for j in range(len(shape_prompts)):
        ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=8, color="white" if abs(sim[i, j]) > 0.6 else "black")
ax.set_xticks(range(len(shape_prompts)), shape_prompts, rotation=60, ha="right", fontsize=8)
ax.set_yticks(range(len(shape_prompts)), shape_prompts, fontsize=8)
ax.set_title("the TRAINED mini CLIP's text embeddings (cosine):\nshared colour or shape means similar")
fig.tight_layout()
savefig(fig, "08_mini_clip_similarity.png")

# %%
print(f"lesson 8 done in {time.perf_counter() - t_start:.0f} s")

# %% [markdown]
# ## Exercises
# Solutions, each checked by the test suite: `lessons/solutions/08_clip_text_encoder.py`.
#
# 1. **What BPE does with rare words.** How many tokens do "cat", "photorealistic", "artstation" and
#    "minidiff" take, and how are they split?  Why can every string be encoded, whatever its letters?
# 2. **Why the temperature is learned.** A model whose matching pairs have cosine 0.3 and all other
#    pairs 0.1 ranks every batch perfectly.  Compute its InfoNCE loss for B = 32 at $\tau = 1$ and at
#    CLIP's initial $\tau = 0.07$ and final $\tau = 0.01$.  What would training with $\tau$ fixed at 1 do?

