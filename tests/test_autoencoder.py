"""SD's VAE (AutoencoderKL): parameter count, the posterior, parity with diffusers, the scaling
factor, and clear errors when loading a wrong state dict."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minidiff.nn.autoencoder import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian
from minidiff.weights import torch_to_flax, vae_from_torch, vae_key_map


def _template(cfg, size):
    model = AutoencoderKL(cfg)
    x = jnp.zeros((1, size, size, cfg.in_channels))
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))["params"]


def test_sd_parameter_count():
    shapes = _template(AutoencoderKLConfig.sd(), 64)
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes)) == 83_653_863  # SD's VAE


def test_sd_config_facts():
    cfg = AutoencoderKLConfig.sd()
    assert (cfg.downsample_factor, cfg.latent_size, cfg.latent_channels, cfg.scaling_factor) == (8, 64, 4, 0.18215)
    with pytest.raises(ValueError, match="GroupNorm groups"):
        AutoencoderKLConfig.toy(block_out_channels=(30, 60))


def test_posterior_is_the_clipped_diagonal_gaussian():
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    logvar = 3 * rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    logvar[0, 0, 0, :2] = (-50.0, 40.0)  # clipped to [-30, 20]
    q = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], axis=-1))
    clipped = np.clip(logvar, -30, 20)
    np.testing.assert_array_equal(q.mean, mean)
    np.testing.assert_array_equal(q.logvar, clipped)
    np.testing.assert_allclose(q.std, np.exp(0.5 * clipped), rtol=1e-6)
    assert q.mode() is q.mean
    key = jax.random.PRNGKey(3)
    np.testing.assert_allclose(q.sample(key), mean + np.exp(0.5 * clipped) * np.asarray(jax.random.normal(key, mean.shape)),
                               rtol=1e-5, atol=1e-6)
    # KL(q || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2), per batch element
    m, lv = mean.astype(np.float64), clipped.astype(np.float64)
    np.testing.assert_allclose(q.kl(), 0.5 * (m**2 + np.exp(lv) - 1 - lv).sum(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(q.kl(q), 0.0, atol=1e-3)
    p = DiagonalGaussian(jnp.zeros_like(q.mean), jnp.zeros_like(q.logvar))
    np.testing.assert_allclose(q.kl(p), q.kl(), rtol=1e-6)


def test_toy_vae_runs_and_bad_input_is_a_clear_error():
    cfg = AutoencoderKLConfig.toy()
    model = AutoencoderKL(cfg)
    x = jnp.ones((2, 32, 32, 3))
    rng = np.random.default_rng(0)  # random weights from the template: cheaper than compiling model.init
    params = jax.tree_util.tree_map(lambda a: rng.normal(0, 0.05, a.shape).astype(np.float32), _template(cfg, 32))
    x_hat, posterior = jax.jit(model.apply)({"params": params}, x, jax.random.PRNGKey(1))
    assert x_hat.shape == x.shape and posterior.mean.shape == (2, 16, 16, 4)
    assert bool(jnp.all(jnp.isfinite(x_hat))) and posterior.kl().shape == (2,)
    shapes = lambda method, a: jax.eval_shape(lambda: model.apply({"params": params}, a, method=method))  # noqa: E731
    with pytest.raises(ValueError, match="NHWC with 3 channels"):
        shapes(AutoencoderKL.encode, jnp.ones((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="multiples of 2"):
        shapes(AutoencoderKL.encode, jnp.ones((1, 31, 32, 3)))
    with pytest.raises(ValueError, match="NHWC with 4 channels"):
        shapes(AutoencoderKL.decode, jnp.ones((1, 16, 16, 3)))


def test_old_attention_names_are_renamed():
    assert vae_key_map("encoder.mid_block.attentions.0.query.weight") == "encoder.mid_block.attentions.0.to_q.weight"
    assert vae_key_map("decoder.mid_block.attentions.0.proj_attn.bias") == "decoder.mid_block.attentions.0.to_out.0.bias"
    assert vae_key_map("decoder.mid_block.attentions.0.to_v.bias") == "decoder.mid_block.attentions.0.to_v.bias"
    assert vae_key_map("encoder.down_blocks.0.resnets.1.conv1.weight") == "encoder.down_blocks.0.resnets.1.conv1.weight"


# --- parity with diffusers -------------------------------------------------------------------

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SMALL = dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, latent_channels=4, sample_size=32)


def _diffusers_vae(block_out_channels, **kw):
    torch.manual_seed(0)
    n = len(block_out_channels)
    m = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=block_out_channels,
                                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                                **kw).eval()
    with torch.no_grad():  # GroupNorm scales (ones) and biases (zeros) are constant at init: make them random
        for p in m.parameters():
            if torch.all(p == p.flatten()[0]):
                p.add_(0.1 * torch.randn_like(p))
    return m


def _state_dict(ref):
    return {k: v.numpy() for k, v in ref.state_dict().items()}


@pytest.fixture(scope="module")
def small():
    ref = _diffusers_vae(**SMALL)
    cfg = AutoencoderKLConfig(**SMALL)
    params = vae_from_torch(_state_dict(ref), _template(cfg, 32))
    return ref, AutoencoderKL(cfg), params


def _compare(name, got, want, atol=1e-4):
    err = float(np.abs(got - want).max())
    rel = err / float(np.abs(want).max())
    print(f"{name}: max abs error {err:.2e}, relative to max |ref| {rel:.2e}")
    assert err <= atol and rel <= 1e-4, (name, err, rel)


def _check_parity(ref, model, params, x, z, tag):
    """Posterior mean and logvar of x (NCHW), decoder output of z (NCHW), against diffusers."""
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(x)).latent_dist
        want_mean, want_logvar = dist.mean.numpy(), dist.logvar.numpy()
        want_x = ref.decode(torch.from_numpy(z)).sample.numpy()
    nhwc, nchw = (lambda a: a.transpose(0, 2, 3, 1)), (lambda a: np.asarray(a).transpose(0, 3, 1, 2))
    posterior = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))(params, nhwc(x))
    decoded = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))(params, nhwc(z))
    _compare(f"{tag} posterior mean", nchw(posterior.mean), want_mean)
    _compare(f"{tag} posterior logvar", nchw(posterior.logvar), want_logvar)
    _compare(f"{tag} decoder output", nchw(decoded), want_x)


@pytest.mark.parity
def test_small_vae_matches_diffusers(small):
    ref, model, params = small
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    z = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    _check_parity(ref, model, params, x, z, "small")


@pytest.mark.parity
def test_scaling_factor_is_applied_once(small):
    """latents_from_images = posterior mean (or sample) * 0.18215; images_from_latents inverts it
    exactly as diffusers' pipelines do: vae.decode(latents / vae.config.scaling_factor)."""
    ref, model, params = small
    sf = ref.config.scaling_factor
    assert sf == model.config.scaling_factor == 0.18215
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))

    key = jax.random.PRNGKey(7)

    def helpers(vae, x, key):  # one jit for all the calls (compiling is the slow part on a CPU)
        latents = vae.latents_from_images(x)
        return (vae.encode(x), latents, vae.latents_from_images(x, key), vae.images_from_latents(latents),
                vae.decode(vae.encode(x).mean))

    posterior, latents, sampled, images, decoded_mean = jax.jit(
        lambda p, x, key: model.apply({"params": p}, x, key, method=helpers))(params, x_nhwc, key)
    np.testing.assert_allclose(latents, posterior.mean * 0.18215, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sampled, posterior.sample(key) * 0.18215, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(images, decoded_mean, atol=1e-5)

    with torch.no_grad():
        want_latents = ref.encode(torch.from_numpy(x)).latent_dist.mean * sf
        want_images = ref.decode(want_latents / sf).sample.numpy()
    _compare("scaled latents", np.asarray(latents).transpose(0, 3, 1, 2), want_latents.numpy())
    _compare("images_from_latents", np.asarray(images).transpose(0, 3, 1, 2), want_images)


@pytest.mark.parity
def test_old_attention_names_and_1x1_conv_weights_load_the_same(small):
    """Old diffusers checkpoints: query/key/value/proj_attn; ldm-style: q/k/v/out as (C, C, 1, 1) convs."""
    ref, model, params = small
    old = {}
    for k, w in _state_dict(ref).items():
        for new, was in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")):
            if ".attentions." in k and new in k:
                k = k.replace(new, was)
                w = w[:, :, None, None] if w.ndim == 2 else w
        old[k] = w
    assert "encoder.mid_block.attentions.0.query.weight" in old and old["encoder.mid_block.attentions.0.query.weight"].ndim == 4
    loaded = vae_from_torch(old, jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params))
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


@pytest.mark.parity
def test_loading_reports_missing_misshapen_and_doubled_tensors(small):
    ref, _, params = small
    template = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    sd = _state_dict(ref)
    sd.pop("encoder.conv_in.weight")
    sd["decoder.up_blocks.0.resnets.0.conv1.bias"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as e:
        vae_from_torch(sd, template)
    msg = str(e.value)
    assert "VAE" in msg and "encoder/conv_in/kernel" in msg and "decoder.up_blocks.0.resnets.0.conv1.bias (3,)" in msg

    sd = _state_dict(ref)
    sd["encoder.mid_block.attentions.0.query.weight"] = sd["encoder.mid_block.attentions.0.to_q.weight"]
    with pytest.raises(ValueError, match="attentions.0.to_q.weight and encoder.mid_block.attentions.0.query.weight"):
        vae_from_torch(sd, template)
    # without the old-name mapping, an old checkpoint is reported tensor by tensor
    sd = {k.replace(".to_q.", ".query."): v for k, v in _state_dict(ref).items()}
    with pytest.raises(ValueError, match="query.weight"):
        torch_to_flax(sd, template, "VAE")


@pytest.mark.parity
@pytest.mark.slow
def test_sd_vae_matches_diffusers_at_64x64():
    cfg = AutoencoderKLConfig.sd()
    ref = _diffusers_vae(block_out_channels=cfg.block_out_channels, layers_per_block=2, latent_channels=4,
                         norm_num_groups=32, sample_size=512)
    assert sum(p.numel() for p in ref.parameters()) == 83_653_863
    params = vae_from_torch(_state_dict(ref), _template(cfg, 64))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    z = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    _check_parity(ref, AutoencoderKL(cfg), params, x, z, "SD 64x64")
