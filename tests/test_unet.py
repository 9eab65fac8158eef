"""The Flax UNet: SD parameter counts, parity with diffusers' UNet2DConditionModel, bad input; its
convolutions over inputs smaller than the kernel."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minidiff.nn.layers import Conv
from minidiff.nn.unet import UNet2DCondition, UNetConfig
from minidiff.weights import flax_path, torch_to_flax


def count(cfg, ctx_len=77):
    x = jnp.zeros((1, 64, 64, cfg.in_channels))
    ctx = None if cfg.cross_attention_dim is None else jnp.zeros((1, ctx_len, cfg.cross_attention_dim))
    shapes = jax.eval_shape(lambda: UNet2DCondition(cfg).init(jax.random.PRNGKey(0), x, jnp.zeros(1, jnp.int32), ctx))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))


def test_sd15_parameter_count():
    assert count(UNetConfig.sd15()) == 859_520_964  # the public SD 1.5 UNet


def test_sd2_parameter_count():
    assert count(UNetConfig.sd2()) == 865_910_724  # the public SD 2.x UNet


def test_flax_path_renaming():
    assert flax_path("down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight") == (
        "down_blocks_0", "attentions_1", "transformer_blocks_0", "ff", "net_0", "proj", "weight")
    assert flax_path("mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.bias")[-2:] == ("to_out_0", "bias")


def test_toy_unet_runs_unconditional_and_class_conditional():
    for cfg, labels in ((UNetConfig.toy(), None), (UNetConfig.toy(num_class_embeds=5), jnp.array([0, 4]))):
        m = UNet2DCondition(cfg)
        x = jnp.ones((2, 32, 32, 3))
        params = m.init(jax.random.PRNGKey(0), x, jnp.array([3, 900]), class_labels=labels)["params"]
        y = m.apply({"params": params}, x, jnp.array([3, 900]), class_labels=labels)
        assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))


def test_gradient_checkpointing_changes_neither_the_parameters_nor_the_gradients():
    """remat=True recomputes each block in the backward pass: same tree, same outputs, same gradients
    (up to float32 summation order)."""
    cfg = UNetConfig.toy(cross_attention_dim=16, sample_size=8, block_out_channels=(16, 16), attention=(False, True),
                         mid_block_attention=False)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    ctx, t = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 16)), jnp.array([3, 500])
    p = UNet2DCondition(cfg).init(jax.random.PRNGKey(2), x, t, ctx)["params"]
    p_remat = UNet2DCondition(cfg, remat=True).init(jax.random.PRNGKey(2), x, t, ctx)["params"]
    assert jax.tree.structure(p) == jax.tree.structure(p_remat)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_remat)))

    def grads(remat):
        loss = lambda q: jnp.mean(UNet2DCondition(cfg, remat=remat).apply({"params": q}, x, t, ctx, train=True) ** 2)  # noqa: E731
        return jax.grad(loss)(p)

    g, g_remat = grads(False), grads(True)
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g))
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat))) <= 1e-5 * scale


def test_bad_input_is_a_clear_error():
    cfg = UNetConfig.toy()
    m = UNet2DCondition(cfg)
    with pytest.raises(ValueError, match="NHWC with 3 channels"):
        m.init(jax.random.PRNGKey(0), jnp.ones((1, 3, 32, 32)), jnp.zeros(1))
    with pytest.raises(ValueError, match="multiples of 4"):
        m.init(jax.random.PRNGKey(0), jnp.ones((1, 30, 30, 3)), jnp.zeros(1))
    with pytest.raises(ValueError, match="no cross-attention"):
        m.init(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)), jnp.zeros(1), jnp.ones((1, 4, 8)))
    with pytest.raises(ValueError, match="class_labels must be given"):
        m.init(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)), jnp.zeros(1), class_labels=jnp.zeros(1, jnp.int32))
    with pytest.raises(ValueError, match="GroupNorm groups"):
        UNetConfig.toy(block_out_channels=(30, 60, 60))


# --- parity with diffusers -------------------------------------------------------------------

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def _diffusers_unet(**kw):
    """A small UNet with SD's block structure: 3 cross-attention down blocks + 1 plain, mirrored up."""
    torch.manual_seed(0)
    m = diffusers.UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        **kw,
    ).eval()
    # random weights everywhere (diffusers zero-inits nothing here, but make norms non-trivial too)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["sd1", "sd2", "sd1_class", "sd1_16x16"])
def test_unet_matches_diffusers(variant):
    size = 16 if variant == "sd1_16x16" else 32  # 16: the deepest 3x3 convolutions see 2x2 (patches @ kernel)
    kw = {
        "sd1": dict(cross_attention_dim=48, attention_head_dim=8),
        "sd1_16x16": dict(cross_attention_dim=48, attention_head_dim=8),
        "sd2": dict(cross_attention_dim=40, attention_head_dim=(2, 4, 4, 4), use_linear_projection=True),
        "sd1_class": dict(cross_attention_dim=48, attention_head_dim=8, num_class_embeds=10),
    }[variant]
    ref = _diffusers_unet(**kw)
    heads = kw["attention_head_dim"]
    cfg = UNetConfig(sample_size=32, block_out_channels=(32, 64, 64, 64), num_attention_heads=heads,
                     cross_attention_dim=kw["cross_attention_dim"], use_linear_projection=kw.get("use_linear_projection", False),
                     num_class_embeds=kw.get("num_class_embeds"), attention_chunk_size=256)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, size, size)).astype(np.float32)
    t = np.array([10, 981])
    ctx = rng.standard_normal((2, 7, kw["cross_attention_dim"])).astype(np.float32)
    labels = np.array([3, 7]) if "num_class_embeds" in kw else None
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                   class_labels=None if labels is None else torch.from_numpy(labels)).sample.numpy()

    model = UNet2DCondition(cfg)
    x_nhwc = x.transpose(0, 2, 3, 1)
    template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x_nhwc, t, ctx, labels))["params"]
    params = torch_to_flax({k: v.numpy() for k, v in ref.state_dict().items()}, template, "UNet")
    got = np.asarray(jax.jit(model.apply)({"params": params}, x_nhwc, t, ctx, labels)).transpose(0, 3, 1, 2)

    err = np.abs(got - want).max()
    rel = err / np.abs(want).max()
    print(f"{variant}: max abs error {err:.2e}, relative to max |output| {rel:.2e}")
    assert err <= 1e-4 and rel <= 1e-4


@pytest.mark.parity
def test_loading_reports_missing_and_misshapen_tensors():
    ref = _diffusers_unet(cross_attention_dim=48, attention_head_dim=8)
    cfg = UNetConfig(sample_size=32, block_out_channels=(32, 64, 64, 64), cross_attention_dim=48)
    model = UNet2DCondition(cfg)
    template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 4)), jnp.zeros(1),
                                                 jnp.zeros((1, 7, 48))))["params"]
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    sd.pop("conv_in.weight")
    sd["up_blocks.1.resnets.0.conv1.bias"] = np.zeros(3, np.float32)
    sd["foo.bar.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as e:
        torch_to_flax(sd, template, "UNet")
    msg = str(e.value)
    assert "conv_in/kernel" in msg and "up_blocks.1.resnets.0.conv1.bias (3,)" in msg and "foo.bar.weight" in msg


@pytest.mark.parametrize("hw, kernel, stride, padding", [
    ((2, 2), 3, 1, ((1, 1), (1, 1))),   # SD's deepest 3x3 convolutions at 16x16 latents (128x128 images)
    ((1, 1), 3, 1, ((1, 1), (1, 1))),
    ((2, 3), 3, 1, ((1, 1), (1, 1))),
    ((2, 2), 3, 2, ((1, 1), (1, 1))),   # Downsample
    ((2, 2), 3, 1, "SAME"),
    ((3, 3), 4, 2, ((1, 2), (0, 1))),   # asymmetric padding, a 4x4 kernel (the discriminator's)
    ((8, 8), 3, 1, ((1, 1), (1, 1))),   # not smaller than the kernel: XLA's convolution
])
def test_a_convolution_over_an_input_smaller_than_its_kernel_is_a_product_of_patches(hw, kernel, stride, padding):
    """Same numbers as nn.Conv (XLA's convolution at full precision), computed without a convolution op
    when the input is smaller than the kernel (XLA would swap the operands and run ~30x slower on CPU)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, *hw, 5)), jnp.float32)
    args = dict(features=7, kernel_size=(kernel, kernel), strides=(stride, stride), padding=padding)
    params = nn.Conv(**args).init(jax.random.PRNGKey(0), x)
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # a bias that is not zero
    want = nn.Conv(**args, precision="highest").apply(params, x)
    f = jax.jit(Conv(**args).apply)
    got = f(params, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6)  # float32 sums of 45 terms
    small = hw[0] < kernel or hw[1] < kernel
    assert ("convolution(" in f.lower(params, x).compile().as_text()) is not small
