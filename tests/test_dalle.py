"""The DALL-E-style transformer: masks, embeddings, the key-value cache, guidance, the loss, training."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from minidiff.data import CaptionTokenizer  # noqa: E402
from minidiff.nn import dalle  # noqa: E402
from minidiff.nn.dalle import DalleConfig, DalleTransformer, attention_mask  # noqa: E402

TINY = dict(text_vocab=24, text_len=5, num_codes=16, grid=4, width=32, layers=2, heads=2)


def setup(config, batch=3, seed=0):
    model = DalleTransformer(config)
    tokens = jnp.asarray(np.random.default_rng(seed).integers(1, 16, (batch, config.seq_len)), jnp.int32)
    params = model.init(jax.random.PRNGKey(seed), tokens)["params"]
    return model, params, tokens


# --- masks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", dalle.PATTERNS)
def test_masks_are_causal_and_every_image_token_sees_the_whole_text(pattern):
    Lt, G = 5, 4
    m = attention_mask(pattern, Lt, G)
    assert m.shape == (Lt + G * G,) * 2
    assert not np.triu(m, 1).any()  # nothing from the future
    assert m[np.diag_indices_from(m)].all()  # every token sees itself
    assert m[Lt:, :Lt].all()  # image -> all text
    assert np.array_equal(m[:Lt, :Lt], np.tril(np.ones((Lt, Lt), bool)))  # text: plain causal


def test_row_column_and_conv_patterns_by_their_definitions():
    Lt, G = 3, 5
    row, col, conv = (attention_mask(p, Lt, G)[Lt:, Lt:] for p in ("row", "column", "conv"))
    for a in range(G * G):
        for b in range(a + 1):
            assert row[a, b] == (a - b < G), (a, b)  # the previous G positions
            assert col[a, b] == (a % G == b % G), (a, b)  # same column, rows above
            assert conv[a, b] == (abs(a // G - b // G) <= 1 and abs(a % G - b % G) <= 1), (a, b)


def test_a_row_layer_then_a_column_layer_reach_every_earlier_token():
    Lt, G = 2, 6
    row, col = attention_mask("row", Lt, G).astype(int), attention_mask("column", Lt, G).astype(int)
    reach = (col @ row) > 0  # information flows row first, then column
    assert np.array_equal(reach, attention_mask("causal", Lt, G))
    assert not np.array_equal(row, attention_mask("causal", Lt, G))  # each alone is sparse


def test_the_model_obeys_its_mask():
    """One column layer: changing a token in another column leaves the output unchanged."""
    config = DalleConfig(**{**TINY, "layers": 1}, attention=("column",))
    model, params, tokens = setup(config, batch=1)
    Lt, G = config.text_len, config.grid
    a = Lt + 2 * G + 1  # image token (row 2, column 1)
    base = model.apply({"params": params}, tokens)[1][0, a]
    other_column = tokens.at[0, Lt + G + 2].set((tokens[0, Lt + G + 2] + 1) % 16)
    same_column = tokens.at[0, Lt + G + 1].set((tokens[0, Lt + G + 1] + 1) % 16)
    np.testing.assert_allclose(model.apply({"params": params}, other_column)[1][0, a], base, atol=1e-6)
    assert np.abs(model.apply({"params": params}, same_column)[1][0, a] - base).max() > 1e-4


def test_unknown_pattern_is_named():
    with pytest.raises(ValueError, match="diagonal"):
        DalleConfig(attention=("row", "diagonal"))


# --- embeddings ----------------------------------------------------------------------------


def test_each_padded_text_slot_has_its_own_pad_embedding_and_image_tokens_their_row_and_column():
    config = DalleConfig(**TINY)
    model, params, _ = setup(config)
    p = params
    tokens = jnp.asarray([[3, 0, 0, 0, 0] + [7] * 16], jnp.int32)
    x = model.apply({"params": p}, tokens, jnp.arange(config.seq_len), method="embed")[0]
    V, Lt, G = config.text_vocab, config.text_len, config.grid
    for i in range(1, Lt):  # pad at slot i -> row V + i of the word table, + position i
        want = p["text_embed"]["embedding"][V + i] + p["text_pos"]["embedding"][i]
        np.testing.assert_allclose(x[i], want, rtol=1e-6)
    assert not np.allclose(x[1] - p["text_pos"]["embedding"][1], x[2] - p["text_pos"]["embedding"][2])
    for a in (0, 5, 15):
        want = p["image_embed"]["embedding"][7] + p["row_embed"]["embedding"][a // G] + p["col_embed"]["embedding"][a % G]
        np.testing.assert_allclose(x[Lt + a], want, rtol=1e-6)


def test_caption_tokenizer_pads_round_trips_and_names_unknown_words():
    tok = CaptionTokenizer(length=10)
    ids = tok.encode(["a small red circle in the top left", "a large blue square at the bottom"])
    assert ids.shape == (2, 10) and ids.dtype == np.int32
    assert (ids[1, 7:] == CaptionTokenizer.PAD).all() and (ids[0] != CaptionTokenizer.PAD).sum() == 8
    assert tok.decode(ids) == ["a small red circle in the top left", "a large blue square at the bottom"]
    with pytest.raises(ValueError, match="'sqare'"):
        tok.encode(["a blue sqare"])
    with pytest.raises(ValueError, match="at most 3"):
        CaptionTokenizer(length=3).encode(["a red circle on the left"])


# --- the cache, sampling, guidance ----------------------------------------------------------


@pytest.mark.parametrize("attention", [("row", "column"), ("conv", "causal")])
def test_one_step_with_the_cache_equals_the_full_forward(attention):
    config = DalleConfig(**TINY, attention=attention)
    model, params, tokens = setup(config)
    text_full, image_full = model.apply({"params": params}, tokens)
    cache = dalle.empty_cache(config, tokens.shape[0])
    for p in range(config.seq_len):
        text, image, cache = model.apply({"params": params}, tokens[:, p], jnp.int32(p), cache, method="step")
        np.testing.assert_allclose(image, image_full[:, p], atol=2e-5)
        np.testing.assert_allclose(text, text_full[:, p], atol=2e-5)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampling_with_and_without_the_cache_draws_the_same_tokens(guidance):
    config = DalleConfig(**TINY)
    model, params, tokens = setup(config)
    text = tokens[:, : config.text_len]
    key = jax.random.PRNGKey(3)
    a = dalle.sample(model, params, text, key, guidance_scale=guidance, use_cache=True)
    b = dalle.sample(model, params, text, key, guidance_scale=guidance, use_cache=False)
    assert a.shape == (3, config.image_len)
    np.testing.assert_array_equal(a, b)
    assert ((a >= 0) & (a < config.num_codes)).all()


def test_greedy_guided_sampling_picks_the_argmax_of_the_guided_logits():
    """top_k = 1 makes sampling greedy: each token is argmax of l_u + s (l_c - l_u), recomputed here."""
    config = DalleConfig(**TINY)
    model, params, tokens = setup(config, batch=2)
    s, Lt = 3.0, config.text_len
    text = tokens[:, :Lt].at[1, 3:].set(0)  # the second caption padded
    codes = dalle.sample(model, params, text, jax.random.PRNGKey(0), top_k=1, guidance_scale=s)
    cond = jnp.concatenate([text, codes], axis=1)
    uncond = jnp.concatenate([jnp.zeros_like(text), codes], axis=1)  # the empty caption: all pads
    l_c = model.apply({"params": params}, cond)[1][:, Lt - 1 : -1]
    l_u = model.apply({"params": params}, uncond)[1][:, Lt - 1 : -1]
    np.testing.assert_array_equal(codes, np.argmax(l_u + s * (l_c - l_u), axis=-1))
    plain = dalle.sample(model, params, text, jax.random.PRNGKey(0), top_k=1)
    np.testing.assert_array_equal(plain, np.argmax(model.apply({"params": params}, jnp.concatenate(
        [text, plain], axis=1))[1][:, Lt - 1 : -1], axis=-1))


def test_filter_logits_keeps_the_top_k_and_divides_by_the_temperature():
    logits = jnp.asarray([[1.0, 5.0, 3.0, -2.0, 4.0]])
    out = np.asarray(dalle.filter_logits(logits, temperature=2.0, top_k=2))
    np.testing.assert_array_equal(np.isfinite(out), [[False, True, False, False, True]])
    np.testing.assert_allclose(out[0, [1, 4]], [2.5, 2.0])


def test_loss_is_the_weighted_next_token_cross_entropy():
    config = DalleConfig(**TINY)
    model, params, tokens = setup(config)
    w = 0.75
    loss, parts = dalle.loss_fn(model, params, tokens, image_weight=w)
    text_logits, image_logits = (np.asarray(a, np.float64) for a in model.apply({"params": params}, tokens))
    tok, Lt = np.asarray(tokens), config.text_len

    def nll(logits, target):
        return np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[target]

    text = np.mean([nll(text_logits[b, p], tok[b, p + 1]) for b in range(3) for p in range(Lt - 1)])
    image = np.mean([nll(image_logits[b, p], tok[b, p + 1]) for b in range(3) for p in range(Lt - 1, config.seq_len - 1)])
    np.testing.assert_allclose(parts["text"], text, rtol=1e-5)
    np.testing.assert_allclose(parts["image"], image, rtol=1e-5)
    np.testing.assert_allclose(loss, (1 - w) * text + w * image, rtol=1e-5)


# --- VQ-VAE + transformer training, end to end (tiny) ---------------------------------------


@pytest.mark.slow
def test_train_vqvae_then_dalle_save_load_generate_and_the_commands(tmp_path, capsys):
    from minidiff.cli import main
    from PIL import Image

    from minidiff.train.dalle import DalleTrainConfig, DalleTrainer, load_dalle
    from minidiff.train.vqvae import VQVAETrainConfig, VQVAETrainer, evaluate_vqvae, load_vqvae

    vq_cfg = VQVAETrainConfig(steps=6, batch=8, restart_every=3, model={"channels": [8, 16], "groups": 4,
                                                                        "num_codes": 32, "latent_dim": 8})
    VQVAETrainer(vq_cfg, tmp_path / "vq").train(progress=False)
    model, variables, cfg = load_vqvae(tmp_path / "vq")
    metrics = evaluate_vqvae(model, variables, cfg, n=20, batch=10, judge=False)
    assert np.isfinite(metrics["psnr_mean"]) and 0 < metrics["fraction_used"] <= 1 and metrics["grid"] == [16, 16]

    cfg = DalleTrainConfig(vqvae=str(tmp_path / "vq"), steps=4, batch=4, log_every=2,
                           model={"width": 16, "layers": 2, "heads": 2, "attention": ["row", "column"]})
    trainer = DalleTrainer(cfg, tmp_path / "dalle")
    # training captions: half without their size word (binomial, n = 400: 4 sigma = 0.1), 10 % empty
    seq, captions = trainer.tokens(0, n=400)
    named = np.mean([any(w in c.split() for w in ("small", "large")) for c in captions])
    assert abs(named - (1 - cfg.size_word_drop)) < 0.1, named
    text = seq[:, : trainer.tokenizer.length]
    empty = (text == 0).all(axis=1)
    assert abs(empty.mean() - cfg.cond_drop) < 4 * np.sqrt(0.09 / 400)
    np.testing.assert_array_equal(text[~empty], trainer.tokenizer.encode(captions)[~empty])
    trainer.train(progress=False)
    assert np.isfinite(trainer.history["loss"]).all()
    gen = load_dalle(tmp_path / "dalle")
    images, codes = gen.generate(["a red circle in the top left"] * 2, seed=1, guidance_scale=2.0, top_k=8,
                                 return_codes=True)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8 and codes.shape == (2, 256)
    again = gen.generate(["a red circle in the top left"] * 2, seed=1, guidance_scale=2.0, top_k=8)
    np.testing.assert_array_equal(images, again)  # same seed, same pictures

    out = tmp_path / "d.png"
    assert main(["dalle", "a blue square in the bottom right", "--checkpoint", str(tmp_path / "dalle"),
                 "--seed", "0", "-o", str(out)]) == 0
    meta = Image.open(out).text
    assert meta["prompt"] == "a blue square in the bottom right" and meta["seed"] == "0"
    assert main(["dalle", "a blue sqare", "--checkpoint", str(tmp_path / "dalle")]) == 2
    assert main(["dalle", "a blue square", "--checkpoint", str(tmp_path / "vq")]) == 2  # a VQ-VAE, not a DALL-E

    capsys.readouterr()
    assert main(["evaluate-dalle", "--checkpoint", str(tmp_path / "dalle"), "--samples-per-prompt", "1",
                 "--guidance", "1", "2"]) == 0
    table = capsys.readouterr().out.split("all three\n")[1].splitlines()  # one row per guidance scale
    assert [row.split()[:2] for row in table] == [["1", "1"], ["2", "1"]] and all(row.endswith("%") for row in table)


def test_the_papers_configuration_has_its_numbers_and_its_mask_pattern():
    """Ramesh et al. 2021: 64 layers (16 column, 47 row, the last convolutional), d_model 3,968,
    256 + 1,024 positions, 16,384 + 8,192 tokens, ~12 billion parameters (counted with eval_shape)."""
    c = dalle.DalleConfig.paper()
    patterns = [c.layer_pattern(k) for k in range(c.layers)]
    assert (patterns.count("column"), patterns.count("row"), patterns[-1]) == (16, 47, "conv")
    assert patterns[1] == "column" and patterns[5] == "column" and patterns[0] == patterns[2] == "row"
    assert (c.width, c.text_len + c.image_len, c.text_vocab, c.num_codes) == (3968, 1280, 16384, 8192)
    shapes = jax.eval_shape(lambda: dalle.DalleTransformer(c).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
    assert 12.0e9 < n < 12.4e9, n
