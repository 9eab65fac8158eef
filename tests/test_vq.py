"""Vector quantization: the NumPy reference (minidiff.vq) against brute force and hand-written
oracles, and the Flax VectorQuantizer against it, with its straight-through gradients."""

import subprocess
import sys

import numpy as np
import pytest

from minidiff import vq


def brute_force_distances(z, e):
    """||z_n - e_k||^2 from the (N, K, D) array of differences, in float64."""
    diff = z.astype(np.float64)[:, None, :] - e.astype(np.float64)[None, :, :]
    return (diff**2).sum(-1)


def test_importing_vq_loads_no_jax():
    code = ("import sys, minidiff.vq; bad = [m for m in ('jax', 'jaxlib', 'flax', 'optax', 'torch') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --- nearest code ---

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_quantize_matches_brute_force(dtype, rng):
    z = rng.standard_normal((300, 5)).astype(dtype)
    e = rng.standard_normal((17, 5)).astype(dtype)
    d = vq.squared_distances(z, e)
    assert d.shape == (300, 17) and d.dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(d, brute_force_distances(z, e), rtol=tol, atol=tol)
    idx, z_q = vq.quantize(z, e)
    np.testing.assert_array_equal(idx, brute_force_distances(z, e).argmin(-1))
    np.testing.assert_array_equal(z_q, e[idx])


def test_quantize_keeps_leading_axes(rng):
    z, e = rng.standard_normal((2, 3, 4, 6)), rng.standard_normal((9, 6))
    idx, z_q = vq.quantize(z, e)
    assert idx.shape == (2, 3, 4) and z_q.shape == z.shape
    np.testing.assert_array_equal(idx.reshape(-1), vq.quantize(z.reshape(-1, 6), e)[0])
    np.testing.assert_array_equal(vq.quantize(e, e)[0], np.arange(9))  # every code is its own nearest code


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(4, 3\).*D = 2.*\(8, 2\)"):
        vq.quantize(np.zeros((4, 3)), np.zeros((8, 2)))
    with pytest.raises(ValueError, match=r"\(K, D\).*\(8,\)"):
        vq.squared_distances(np.zeros((4, 3)), np.zeros(8))


# --- statistics ---

def test_usage_fraction_and_perplexity():
    K = 8
    uniform = np.tile(np.arange(K), 5)
    np.testing.assert_array_equal(vq.codebook_usage(uniform, K), np.full(K, 5))
    assert vq.perplexity(uniform, K) == pytest.approx(K)
    assert vq.fraction_used(uniform, K) == 1.0
    one = np.full((3, 4), 5)
    assert vq.perplexity(one, K) == pytest.approx(1.0)
    assert vq.fraction_used(one, K) == 1 / K
    half = np.array([0, 0, 1, 1, 2, 2, 3, 3])  # 4 codes used equally often
    assert vq.perplexity(half, K) == pytest.approx(4.0)
    assert vq.fraction_used(half, K) == 0.5
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        vq.codebook_usage(np.array([0, 8]), K)
    with pytest.raises(ValueError, match="empty"):
        vq.perplexity(np.array([], dtype=np.int64), K)


# --- EMA ---

def ema_oracle(n, m, z, idx, decay, eps):
    """The EMA step written out with loops, one code at a time."""
    K, D = m.shape
    n_new, m_new = np.zeros(K), np.zeros((K, D))
    for k in range(K):
        count, total = 0.0, np.zeros(D)
        for z_i, k_i in zip(z, idx):
            if k_i == k:
                count += 1
                total += z_i
        n_new[k] = decay * n[k] + (1 - decay) * count
        m_new[k] = decay * m[k] + (1 - decay) * total
    n_all = sum(n_new)
    e = np.zeros((K, D))
    for k in range(K):
        e[k] = m_new[k] / ((n_new[k] + eps) / (n_all + K * eps) * n_all)
    return n_new, m_new, e


def test_ema_update_matches_hand_computed_example():
    n = np.array([2.0, 1.0, 0.5])
    m = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    z = np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5], [-2.0, 1.0]])
    idx = np.array([0, 0, 2, 0])  # code 1 unused
    got = vq.ema_update(n, m, z, idx, decay=0.9, eps=0.1)
    for g, w in zip(got, ema_oracle(n, m, z, idx, 0.9, 0.1)):
        np.testing.assert_allclose(g, w, rtol=1e-12)
    # code 0 by hand: n_0 = 0.9*2 + 0.1*3 = 2.1;  m_0 = 0.9*(1, 0) + 0.1*(2, 2) = (1.1, 0.2)
    np.testing.assert_allclose(got[0][0], 2.1)
    np.testing.assert_allclose(got[1][0], [1.1, 0.2])
    # inputs untouched
    np.testing.assert_array_equal(n, [2.0, 1.0, 0.5])


def test_ema_without_memory_gives_cluster_means(rng):
    K, D = 6, 3
    z = rng.standard_normal((2, 50, D))
    idx = rng.integers(0, K - 2, size=(2, 50))  # the last two codes unused
    m0 = rng.standard_normal((K, D))
    with np.errstate(invalid="ignore"):  # the unused codes are 0 / 0
        n, m, e = vq.ema_update(np.ones(K), m0, z, idx, decay=0.0, eps=0.0)
    zf, kf = z.reshape(-1, D), idx.reshape(-1)
    for k in range(K - 2):
        np.testing.assert_allclose(e[k], zf[kf == k].mean(0), rtol=1e-12)
    np.testing.assert_array_equal(n[K - 2:], 0.0)  # unused: no count, no sum (e is 0/0 there)
    np.testing.assert_array_equal(m[K - 2:], 0.0)


def test_ema_update_checks_shapes(rng):
    with pytest.raises(ValueError, match="cluster_size"):
        vq.ema_update(np.ones(4), np.zeros((3, 2)), np.zeros((5, 2)), np.zeros(5, int))
    with pytest.raises(ValueError, match=r"indices must have shape.*\(5,\)"):
        vq.ema_update(np.ones(3), np.zeros((3, 2)), np.zeros((5, 2)), np.zeros(4, int))


# --- restarts ---

def test_restart_replaces_only_dead_codes(rng):
    K, D = 6, 4
    codebook = rng.standard_normal((K, D))
    counts = np.array([5, 0, 3, 0.5, 0, 9])
    z = rng.standard_normal((2, 10, D))
    before = (codebook.copy(), counts.copy(), z.copy())
    new, n = vq.restart_dead_codes(codebook, counts, z, np.random.default_rng(1))
    assert n == 3
    dead, live = [1, 3, 4], [0, 2, 5]
    np.testing.assert_array_equal(new[live], codebook[live])
    rows = z.reshape(-1, D)
    picked = [int(np.flatnonzero((rows == new[k]).all(-1))[0]) for k in dead]  # each one is a row of z
    assert len(set(picked)) == 3  # drawn without replacement
    for a, b in zip(before, (codebook, counts, z)):
        np.testing.assert_array_equal(a, b)  # inputs not modified
    # fewer rows than dead codes: drawn with replacement; noise moves them off the rows
    new, n = vq.restart_dead_codes(codebook, counts, z[0, :2], np.random.default_rng(2), noise=1e-3)
    assert n == 3
    d = brute_force_distances(new[dead], z[0, :2]).min(-1)
    assert np.all(d > 0) and np.all(d < 1e-4)
    same, n = vq.restart_dead_codes(codebook, np.ones(K), z, np.random.default_rng(3))
    assert n == 0 and np.array_equal(same, codebook) and same is not codebook


# --- the Flax module ---

jax = pytest.importorskip("jax")
jnp = jax.numpy

from minidiff.nn.quantizer import VectorQuantizer  # noqa: E402


def test_module_indices_match_numpy_under_jit(rng):
    K, D = 16, 4
    model = VectorQuantizer(K, D)
    z = rng.standard_normal((2, 5, 5, D)).astype(np.float32)
    e = rng.standard_normal((K, D)).astype(np.float32)
    variables = {"params": {"codebook": jnp.asarray(e)}}
    z_st, idx, aux = jax.jit(model.apply)(variables, z)
    want_idx, want_zq = vq.quantize(z, e)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_allclose(np.asarray(z_st), want_zq, atol=1e-6)  # forward value is z_q
    lookup = jax.jit(lambda v, i: model.apply(v, i, method=VectorQuantizer.lookup))
    np.testing.assert_array_equal(np.asarray(lookup(variables, idx)), e[want_idx])
    np.testing.assert_allclose(float(aux["codebook_loss"]), np.mean((z - want_zq) ** 2), rtol=1e-5)
    np.testing.assert_allclose(float(aux["commitment_loss"]), 0.25 * np.mean((z - want_zq) ** 2), rtol=1e-5)
    with pytest.raises(ValueError, match="last dimension"):
        model.apply(variables, z[..., :3])


def test_straight_through_and_loss_gradients(rng):
    K, D, beta = 8, 3, 0.4
    model = VectorQuantizer(K, D, beta=beta)
    z = jnp.asarray(rng.standard_normal((4, 5, D)), jnp.float32)  # the encoder output
    e = jnp.asarray(rng.standard_normal((K, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(z.shape), jnp.float32)  # a fixed linear "decoder"

    def losses(e, z):
        z_st, _, aux = model.apply({"params": {"codebook": e}}, z)
        return {"rec": jnp.sum(w * z_st), "codebook": aux["codebook_loss"], "commit": aux["commitment_loss"]}

    grads = jax.jacrev(losses, argnums=(0, 1))(e, z)  # {loss: (d/de, d/dz)}
    idx, z_q = vq.quantize(np.asarray(z), np.asarray(e))
    size = z.size  # N * D: the losses are means over all numbers

    # the encoder receives the decoder's gradient unchanged; the codebook receives none of it
    np.testing.assert_array_equal(grads["rec"][1], w)
    np.testing.assert_array_equal(grads["rec"][0], 0.0)

    # codebook loss: d/de_k = sum_{n: k_n = k} 2 (e_k - z_n) / (N D);  nothing for the encoder
    want = np.zeros((K, D))
    zf, kf = np.asarray(z).reshape(-1, D), idx.reshape(-1)
    for z_n, k in zip(zf, kf):
        want[k] += 2 * (np.asarray(e)[k] - z_n) / size
    np.testing.assert_allclose(grads["codebook"][0], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grads["codebook"][1], 0.0)

    # commitment loss: d/dz = 2 beta (z - z_q) / (N D);  nothing for the codebook
    np.testing.assert_allclose(grads["commit"][1], 2 * beta * (np.asarray(z) - z_q) / size, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grads["commit"][0], 0.0)


def test_ema_mode_codebook_gets_no_gradient_and_follows_ema_update(rng):
    K, D = 8, 3
    model = VectorQuantizer(K, D, ema=True, decay=0.9, eps=1e-3)
    z = jnp.asarray(rng.standard_normal((4, 6, D)), jnp.float32)
    variables = model.init(jax.random.key(0), z, update=True)  # init does not update
    assert "codebook" not in variables.get("params", {})
    state = variables["vq_ema"]
    np.testing.assert_array_equal(state["cluster_size"], np.ones(K))
    np.testing.assert_array_equal(state["embed_sum"], state["codebook"])
    w = jnp.asarray(rng.standard_normal(z.shape), jnp.float32)

    def total(state, z):
        z_st, _, aux = model.apply({"vq_ema": state}, z)
        return jnp.sum(w * z_st) + aux["loss"]

    g_state, g_z = jax.grad(total, argnums=(0, 1))(state, z)
    for leaf in jax.tree_util.tree_leaves(g_state):
        np.testing.assert_array_equal(leaf, 0.0)
    assert np.any(np.asarray(g_z) != 0)

    (_, idx, aux), new = jax.jit(lambda v, z: model.apply(v, z, update=True, mutable=["vq_ema"]))(variables, z)
    assert float(aux["codebook_loss"]) == 0.0
    old = {k: np.asarray(v) for k, v in state.items()}
    want_idx, _ = vq.quantize(np.asarray(z), old["codebook"])  # quantized with the codebook before the update
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    want = vq.ema_update(old["cluster_size"], old["embed_sum"], np.asarray(z), want_idx, 0.9, 1e-3)
    for name, w_ in zip(("cluster_size", "embed_sum", "codebook"), want):
        np.testing.assert_allclose(np.asarray(new["vq_ema"][name]), w_, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(new["vq_ema"]["codebook"]), old["codebook"])

    with pytest.raises(ValueError, match="mutable"):
        model.apply(variables, z, update=True)


@pytest.mark.parametrize("reconstruction", ["l1", "l2"])
def test_vqvae_training_loss_counts_shape_pixels_1_plus_w_times(reconstruction):
    """train-vqvae --foreground-weight w: the reconstruction term (|error| or error^2) is averaged with
    weight 1 + w on every non-black pixel (the shared rule of the autoencoders), plus the VQ losses."""
    pytest.importorskip("jax")
    from minidiff.train.vqvae import VQVAETrainConfig, VQVAETrainer, shapes_batch

    cfg = VQVAETrainConfig(steps=1, batch=4, foreground_weight=4.0, reconstruction=reconstruction,
                           model={"channels": [8, 8, 8], "groups": 4, "num_codes": 16, "latent_dim": 4})
    trainer = VQVAETrainer(cfg)
    x, _, _ = shapes_batch(trainer.dataset, cfg.seed, 0, cfg.batch)
    batch = trainer.batch(0)
    np.testing.assert_array_equal(batch[0], x)
    loss = trainer.loss(trainer.engine.params, batch, None, None, trainer.engine.state["model_state"])[0]
    x_hat, _, aux = trainer.model.apply(trainer.variables(), x)
    diff = np.asarray(x) - np.asarray(x_hat)
    error = np.abs(diff) if reconstruction == "l1" else diff**2
    w = np.where((np.asarray(x) > -0.9).any(axis=-1, keepdims=True), 5.0, 1.0)
    assert 0.05 < w.mean() - 1 < 3  # the batch has both shape and background pixels
    np.testing.assert_allclose(float(loss), (w * error).sum() / (w.sum() * 3) + float(aux["loss"]), rtol=1e-4)
    with pytest.raises(ValueError, match="reconstruction"):
        VQVAETrainConfig(reconstruction="l3")


# --- DALL-E's dVAE: the Gumbel-softmax relaxation instead of the nearest code ----------------------------------

def test_gumbel_max_samples_q_and_the_relaxation_tends_to_its_one_hot(rng):
    """argmax_k (log q_k + g_k) with g ~ Gumbel(0, 1) is a sample of q (the Gumbel-max trick): the
    frequencies over n draws lie within 5 binomial standard deviations of q; and as tau -> 0 the
    Gumbel-softmax becomes that one-hot."""
    logits = np.array([2.0, 0.5, 0.0, -1.0, 1.0])
    q = np.exp(vq.log_softmax(logits))
    n = 200_000
    g = rng.gumbel(size=(n, 5))
    counts = np.bincount((vq.log_softmax(logits) + g).argmax(-1), minlength=5)
    assert np.all(np.abs(counts / n - q) < 5 * np.sqrt(q * (1 - q) / n)), (counts / n, q)
    y = vq.gumbel_softmax(logits, g[:1000], tau=0.01)  # the sample's own code, and nearly one-hot
    np.testing.assert_array_equal(y.argmax(-1), (logits + g[:1000]).argmax(-1))
    assert np.median(y.max(-1)) > 1 - 1e-6 and y.max(-1).mean() > 0.97
    np.testing.assert_allclose(vq.gumbel_softmax(logits, g[:3], tau=1e4), 0.2, atol=1e-3)  # hot: uniform
    np.testing.assert_allclose(vq.gumbel_softmax(logits, g[:100], tau=0.7).sum(-1), 1.0)
    with pytest.raises(ValueError, match="tau"):
        vq.gumbel_softmax(logits, g[:1], tau=0.0)


def test_kl_to_uniform_is_zero_for_equal_logits_and_log_k_for_one_hot():
    assert abs(vq.kl_to_uniform(np.zeros(8))) < 1e-12
    np.testing.assert_allclose(vq.kl_to_uniform(np.array([100.0, 0, 0, 0])), np.log(4), rtol=1e-9)
    q = np.array([0.5, 0.25, 0.25])
    np.testing.assert_allclose(vq.kl_to_uniform(np.log(q)), np.sum(q * np.log(3 * q)), rtol=1e-12)


def test_gumbel_quantizer_matches_the_numpy_reference_and_its_gradient_reaches_the_logits(rng):
    from minidiff.nn.quantizer import GumbelQuantizer

    K, D, tau = 6, 3, 0.5
    model = GumbelQuantizer(K, D, kl_weight=0.1)
    logits = jnp.asarray(rng.standard_normal((2, 4, K)), jnp.float32)
    g = rng.gumbel(size=logits.shape).astype(np.float32)
    variables = model.init(jax.random.key(0), logits)
    e = np.asarray(variables["params"]["codebook"])
    z, idx, aux = model.apply(variables, logits, tau, jnp.asarray(g))
    np.testing.assert_allclose(z, vq.gumbel_softmax(np.asarray(logits), g, tau) @ e, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(idx, np.asarray(logits).argmax(-1))
    np.testing.assert_allclose(aux["kl"], vq.kl_to_uniform(np.asarray(logits)).mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["loss"], 0.1 * aux["kl"], rtol=1e-6)
    hard, _, _ = model.apply(variables, logits)  # evaluation: the argmax code itself
    np.testing.assert_allclose(hard, e[np.asarray(idx)], rtol=1e-6)
    # unlike the nearest code, the relaxed sample is differentiable: every logit gets a gradient
    w = jnp.asarray(rng.standard_normal(z.shape), jnp.float32)
    grad = jax.grad(lambda l: jnp.sum(w * model.apply(variables, l, tau, jnp.asarray(g))[0]))(logits)
    assert np.all(np.asarray(grad) != 0)
    drawn = jax.jit(lambda l, k: model.apply(variables, l, tau, rngs={"gumbel": k})[0])
    assert not np.allclose(drawn(logits, jax.random.key(1)), drawn(logits, jax.random.key(2)))
    with pytest.raises(ValueError, match="6 codes"):
        model.apply(variables, logits[..., :5])


def test_a_dvae_trains_on_the_shapes_with_falling_temperature_and_resumes_exactly(tmp_path):
    from minidiff.train.vqvae import VQVAETrainConfig, VQVAETrainer

    cfg = VQVAETrainConfig(steps=4, batch=4, restart_every=0, warmup=1, model={
        "channels": [8, 8], "groups": 4, "num_codes": 16, "latent_dim": 4, "quantizer": "gumbel"})
    assert cfg.tau(0) == 1.0 and abs(cfg.tau(3) - 1 / 16) < 1e-12 and cfg.tau(1) > cfg.tau(2)
    whole = VQVAETrainer(cfg)
    whole.train(progress=False)
    assert whole.engine.history["kl"] and np.isfinite(whole.engine.history["loss"]).all()
    VQVAETrainer(cfg, tmp_path).train(until=2, progress=False)
    resumed = VQVAETrainer.resume(tmp_path)
    resumed.train(progress=False)
    for a, b in zip(jax.tree.leaves(resumed.engine.state), jax.tree.leaves(whole.engine.state)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="restart_every=0"):
        VQVAETrainConfig(model={"quantizer": "gumbel"})
    with pytest.raises(ValueError, match="quantizer must be"):
        VQVAETrainConfig(model={"quantizer": "kmeans"})


# --- the VQGAN experiment: a patch discriminator and a perceptual term on the VQ-VAE ------------------------------

def test_vqgan_losses_each_move_only_their_own_side(monkeypatch):
    """One Adam step trains the autoencoder and the discriminator together; stop-gradients keep the
    decoder's adversarial term away from D and D's hinge loss away from the autoencoder."""
    from minidiff.nn.classifier import ShapesClassifier
    from minidiff.train import classifier as C
    from minidiff.train.vqvae import VQVAETrainConfig, VQVAETrainer, perceptual_distance, without_discriminator

    net = ShapesClassifier(heads=(("shape", 3),), stem=4, features=(8,), hidden=8)
    random_classifier = net.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))["params"]
    monkeypatch.setattr(C, "cached_classifier", lambda *a, **k: random_classifier)  # no minute of training
    cfg = VQVAETrainConfig(steps=4, batch=4, restart_every=0, warmup=1, adversarial_weight=0.5, perceptual_weight=1.0,
                           disc_start=2, model={"channels": [8, 8], "groups": 4, "num_codes": 16, "latent_dim": 4})
    trainer = VQVAETrainer(cfg)
    engine = trainer.engine
    assert "discriminator" in engine.params and "discriminator" not in trainer.variables()["params"]
    x = trainer.batch(0)[0]
    assert float(perceptual_distance(net, random_classifier, x, x)) == 0.0
    assert 0 < float(perceptual_distance(net, random_classifier, x, -x)) <= 4 * 2

    batch = trainer.batch(2)  # (the adversarial terms are on from step 2)

    def terms(p):
        total, aux = trainer.loss(p, batch, jax.random.key(0), engine.frozen, engine.state["model_state"])
        return {"total": total, "discriminator": aux["discriminator"], "generator": aux["generator"]}

    grads = jax.jit(jax.jacrev(terms))(engine.params)  # {term: d term / d params}
    leaves = lambda tree: jax.tree.leaves(tree)  # noqa: E731
    # D's gradient is its hinge loss's alone; the generator term sends D nothing and the hinge loss sends the AE nothing
    for a, b in zip(leaves(grads["total"]["discriminator"]), leaves(grads["discriminator"]["discriminator"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert all(not np.any(g) for g in leaves(grads["generator"]["discriminator"]))
    assert all(not np.any(g) for g in leaves(without_discriminator(grads["discriminator"])))
    assert any(np.any(g) for g in leaves(without_discriminator(grads["generator"])))
    # before disc_start D is left alone
    before = jax.tree.map(np.asarray, engine.params["discriminator"])
    trainer.train(until=2, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(before), leaves(engine.params["discriminator"])))
    trainer.train(progress=False)
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(before), leaves(engine.params["discriminator"])))
    assert {"generator", "discriminator", "perceptual"} <= set(engine.history)
