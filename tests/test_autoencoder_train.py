"""Training the small VAE (minidiff.train.autoencoder): crops, the NumPy initialiser, the loss, and
a few optimisation steps that lower the reconstruction error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minidiff.nn.autoencoder import AutoencoderKL, AutoencoderKLConfig
from minidiff.train.autoencoder import init_params, random_crops, train_vae, vae_loss

# two blocks of 8 channels, f = 2, no attention: compiles in seconds
TINY = AutoencoderKLConfig.toy(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, mid_block_attention=False)


def smooth_photo(h=24, w=32):
    """A uint8 RGB picture of smooth gradients (easy to reconstruct)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    return (255 * np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx + 3 * yy)], -1)).astype(np.uint8)


def test_random_crops_are_crops_of_the_images():
    img = smooth_photo()
    crops = random_crops([img], 20, 8, np.random.default_rng(0), flip=False)
    assert crops.shape == (20, 8, 8, 3) and crops.dtype == np.float32
    full = img.astype(np.float32) / 127.5 - 1
    for c in crops[:5]:  # every crop occurs somewhere in the image
        assert any(np.array_equal(c, full[y : y + 8, x : x + 8]) for y in range(17) for x in range(25))
    again = random_crops([img], 20, 8, np.random.default_rng(0), flip=False)
    np.testing.assert_array_equal(crops, again)
    with pytest.raises(ValueError, match="larger than an image"):
        random_crops([img], 1, 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="RGB"):
        random_crops([img[..., 0]], 1, 8, np.random.default_rng(0))


def test_init_params_has_the_model_shapes_and_flax_default_laws():
    params = init_params(AutoencoderKLConfig.toy(block_out_channels=(32, 64)), seed=0)
    shapes = jax.eval_shape(lambda: AutoencoderKL(AutoencoderKLConfig.toy(block_out_channels=(32, 64))).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 3))))["params"]
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(shapes)))
    k = np.asarray(params["decoder"]["up_blocks_0"]["resnets_0"]["conv1"]["kernel"])  # 3x3x64x64
    assert abs(k.std() - (1 / (9 * 64)) ** 0.5) < 0.05 * (1 / (9 * 64)) ** 0.5  # LeCun: std sqrt(1 / fan_in)
    assert np.abs(k).max() <= 2 * (1 / (9 * 64)) ** 0.5 / 0.87962566 + 1e-6  # truncated at 2 std
    np.testing.assert_array_equal(params["encoder"]["conv_norm_out"]["scale"], 1.0)
    np.testing.assert_array_equal(params["encoder"]["conv_norm_out"]["bias"], 0.0)


def test_vae_loss_is_reconstruction_plus_weighted_kl_per_pixel_value():
    model, params = AutoencoderKL(TINY), init_params(TINY, seed=1)
    x = random_crops([smooth_photo()], 4, 8, np.random.default_rng(0))
    losses = jax.jit(lambda p, x, key: (vae_loss(model, p, x, key, kl_weight=0.0),  # one compile for all three
                                        vae_loss(model, p, x, key, kl_weight=10.0),
                                        vae_loss(model, p, x, key, kl_weight=0.0, reconstruction="l2")))
    (l0, aux), (l1, _), (l2, aux2) = losses(params, x, jax.random.PRNGKey(0))
    np.testing.assert_allclose(l0, aux["l1"], rtol=1e-6)
    np.testing.assert_allclose(l1, aux["l1"] + 10.0 * aux["kl"] / (8 * 8 * 3), rtol=1e-5)
    np.testing.assert_allclose(l2, aux2["mse"], rtol=1e-6)
    assert float(aux["kl"]) > 0 and 0 < float(aux["sigma"])


def test_foreground_weight_counts_non_black_pixels_1_plus_w_times():
    model, params = AutoencoderKL(TINY), init_params(TINY, seed=1)
    x = np.full((2, 8, 8, 3), -1.0, np.float32)
    x[0, 2:5, 3:6] = [1.0, -1.0, -1.0]                            # a red square on black
    x[1, 0:2, 0:8, 2] = 0.5                                        # a blue stripe
    key = jax.random.PRNGKey(3)
    loss, _ = jax.jit(lambda p, x, k: vae_loss(model, p, x, k, kl_weight=0.0, foreground_weight=4.0))(params, x, key)
    z = model.apply({"params": params}, x, method=AutoencoderKL.encode).sample(key)
    x_hat = np.asarray(model.apply({"params": params}, z, method=AutoencoderKL.decode))
    w = np.where((x > -0.9).any(axis=-1, keepdims=True), 5.0, 1.0)
    expected = (w * np.abs(x - x_hat)).sum() / (w.sum() * 3)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_init_logvar_starts_the_posterior_at_that_sigma():
    photos = [smooth_photo()]
    params, _ = train_vae(photos, TINY, steps=0, crop=8, init_logvar=-6.0)
    posterior = AutoencoderKL(TINY).apply({"params": params}, random_crops(photos, 2, 8, np.random.default_rng(0)),
                                          method=AutoencoderKL.encode)
    np.testing.assert_allclose(np.asarray(posterior.std).mean(), np.exp(-3.0), rtol=0.5)


@pytest.mark.slow
def test_a_few_steps_lower_the_reconstruction_error():
    photos = [smooth_photo(), smooth_photo(32, 24)]
    params, history = train_vae(photos, TINY, steps=30, batch=4, crop=8, lr=3e-3, reconstruction="l2", log_every=1)
    assert history["step"] == list(range(1, 31)) and len(history["mse"]) == 30
    assert np.mean(history["mse"][-5:]) < 0.5 * np.mean(history["mse"][:5])
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(params))
    with pytest.raises(ValueError, match="multiple of the downsampling factor"):
        train_vae(photos, TINY, steps=1, crop=7)
    with pytest.raises(ValueError, match="reconstruction"):
        train_vae(photos, TINY, steps=1, crop=8, reconstruction="l3")
