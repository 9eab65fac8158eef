"""The CLIP text transformer: SD parameter counts, causality, key renaming, bad input, and parity with
transformers' CLIPTextModel (SD 1.x quick_gelu and SD 2.x gelu + penultimate layer)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minidiff.nn.clip import CLIPTextConfig, CLIPTextModel, quick_gelu
from minidiff.weights import clip_text_state_dict, torch_to_flax

START, END = 49406, 49407


def count(cfg):
    shapes = jax.eval_shape(lambda: CLIPTextModel(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32)))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))


def test_sd15_parameter_count():
    assert count(CLIPTextConfig.sd15()) == 123_060_480  # OpenAI CLIP ViT-L/14 text tower (SD 1.x)


def test_sd2_parameter_count():
    assert count(CLIPTextConfig.sd2()) == 340_387_840  # OpenCLIP ViT-H/14 text tower, 23 layers (SD 2.x)


def test_parameter_names_mirror_transformers():
    shapes = jax.eval_shape(lambda: CLIPTextModel(CLIPTextConfig.toy()).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), int)))
    p = shapes["params"]
    assert p["embeddings"]["token_embedding"]["embedding"].shape == (49408, 64)
    assert p["embeddings"]["position_embedding"]["embedding"].shape == (77, 64)
    layer = p["encoder"]["layers_1"]
    assert set(layer) == {"self_attn", "layer_norm1", "mlp", "layer_norm2"}
    assert set(layer["self_attn"]) == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert layer["mlp"]["fc1"]["kernel"].shape == (64, 256) and set(p["final_layer_norm"]) == {"scale", "bias"}


def test_quick_gelu_formula():
    x = np.linspace(-4, 4, 9, dtype=np.float32)
    np.testing.assert_allclose(quick_gelu(x), x / (1 + np.exp(-1.702 * x)), rtol=1e-6)


def _ids(batch=2, pad=END, seed=0):
    """Start token, random words, end token, then padding (SD 1.x pads with the end token)."""
    rng = np.random.default_rng(seed)
    ids = np.full((batch, 77), pad, np.int64)
    for b, n in enumerate(rng.integers(3, 60, batch)):
        ids[b, 0], ids[b, 1:n + 1], ids[b, n + 1] = START, rng.integers(0, START, n), END
    return ids


def _random_params(model, seed=0):
    """N(0, 0.1^2) everywhere, from the shapes alone (an eager Flax init compiles op by op: slow)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32)))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def test_causal_mask_and_clip_skip():
    """A token's state depends only on the tokens before it; clip_skip=k equals final_layer_norm of
    hidden_states[-(k + 1)]; init does not depend on clip_skip."""
    cfg = CLIPTextConfig.toy(num_hidden_layers=3)
    m = CLIPTextModel(cfg)
    ids = _ids(1)
    params = _random_params(m)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), ids, clip_skip=2))["params"])
    apply = jax.jit(m.apply, static_argnames=("clip_skip", "output_hidden_states"))
    out = apply({"params": params}, ids, output_hidden_states=True)
    changed = ids.copy()
    changed[0, 40:] = 7
    out2 = apply({"params": params}, changed, output_hidden_states=True)
    np.testing.assert_allclose(out2.last_hidden_state[:, :40], out.last_hidden_state[:, :40], atol=1e-6)
    assert np.abs(out2.last_hidden_state[:, 40:] - out.last_hidden_state[:, 40:]).max() > 1e-3
    assert len(out.hidden_states) == 4
    skip1 = apply({"params": params}, ids, clip_skip=1)
    final_ln = nn.LayerNorm(epsilon=cfg.layer_norm_eps)
    want = final_ln.apply({"params": params["final_layer_norm"]}, out.hidden_states[-2])
    np.testing.assert_allclose(skip1.last_hidden_state, want, atol=1e-5)


def test_bad_input_is_a_clear_error():
    m = CLIPTextModel(CLIPTextConfig.toy())
    params = _random_params(m)
    run = lambda ids, **kw: m.apply({"params": params}, ids, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="78 tokens exceed the 77 positions"):
        run(np.zeros((1, 78), np.int32))
    with pytest.raises(ValueError, match="must be integers"):
        run(np.zeros((1, 77), np.float32))
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        run(np.zeros(77, np.int32))
    with pytest.raises(ValueError, match="token ids must lie in"):
        run(np.full((1, 77), 49408))
    with pytest.raises(ValueError, match="clip_skip must lie in"):
        run(_ids(1), clip_skip=2)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        run(_ids(1), attention_mask=np.ones((1, 76)))
    with pytest.raises(ValueError, match="unknown hidden_act"):
        CLIPTextConfig.toy(hidden_act="relu")
    with pytest.raises(ValueError, match="heads"):
        CLIPTextConfig.toy(num_attention_heads=5)


def test_state_dict_keys_are_normalised():
    w = np.zeros(1, np.float32)
    plain = {"embeddings.token_embedding.weight": w, "encoder.layers.0.mlp.fc1.bias": w}
    assert clip_text_state_dict(plain) == plain  # transformers 5
    old = {"text_model." + k: v for k, v in plain.items()} | {"text_model.embeddings.position_ids": w}
    assert clip_text_state_dict(old) == plain  # transformers 4 / diffusers text_encoder/, old buffer dropped
    ldm = {"cond_stage_model.transformer." + k: v for k, v in old.items()} | {"model.diffusion_model.conv_in.weight": w}
    assert clip_text_state_dict(ldm) == plain  # SD 1.x single file: only the text encoder is kept
    with pytest.raises(ValueError, match="twice"):
        clip_text_state_dict(plain | old)


# --- parity with transformers ----------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _reference(**kw):
    """A random-weight transformers CLIPTextModel; LayerNorm weights and every bias (which
    transformers initialises to ones / zeros) are perturbed so that nothing hides behind them."""
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return ref


def _convert(ref, cfg, prefix=""):
    sd = {prefix + k: v.numpy() for k, v in ref.state_dict().items()}
    if prefix:  # the layout of diffusers' SD text_encoder/ folders, with the buffer older versions saved
        sd[prefix + "embeddings.position_ids"] = np.arange(77)[None]
    template = jax.eval_shape(lambda: CLIPTextModel(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32)))
    return torch_to_flax(clip_text_state_dict(sd), template["params"], "CLIP text encoder")


def _compare(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    err = np.abs(got - want).max()
    rel = err / np.abs(want).max()
    print(f"{what}: max abs error {err:.2e}, relative to max |output| {rel:.2e}")
    assert err <= 1e-4 and rel <= 1e-4, what


TOY = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
           max_position_embeddings=77)


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["sd1", "sd1_legacy_eos", "sd1_attention_mask", "sd2"])
def test_clip_text_matches_transformers(variant):
    act = "gelu" if variant == "sd2" else "quick_gelu"
    # SD's own text_encoder configs carry eos_token_id=2: transformers then pools at argmax(ids)
    ref = _reference(**TOY, hidden_act=act, **({"eos_token_id": 2} if variant == "sd1_legacy_eos" else {}))
    cfg = CLIPTextConfig.toy(num_hidden_layers=3, hidden_act=act)
    params = _convert(ref, cfg, prefix="text_model." if variant == "sd1" else "")
    ids = _ids(3, pad=0 if variant == "sd2" else END)  # OpenCLIP (SD 2.x) pads with 0
    mask = (np.arange(77)[None] <= np.argmax(ids == END, axis=1)[:, None]).astype(np.int64)
    mask = mask if variant == "sd1_attention_mask" else None
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask),
                   output_hidden_states=True)
        penultimate = ref.final_layer_norm(want.hidden_states[-2]).numpy()

    model = CLIPTextModel(cfg)
    apply = jax.jit(model.apply, static_argnames=("clip_skip", "output_hidden_states"))
    got = apply({"params": params}, ids, mask, output_hidden_states=True)
    _compare(got.last_hidden_state, want.last_hidden_state, f"{variant} last_hidden_state")
    _compare(got.pooler_output, want.pooler_output, f"{variant} pooled")
    assert len(got.hidden_states) == len(want.hidden_states) == 4
    for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
        _compare(g, w, f"{variant} hidden_states[{i}]")
    if variant == "sd2":  # SD 2.x conditions on the penultimate layer, then the final LayerNorm
        _compare(apply({"params": params}, ids, clip_skip=1).last_hidden_state, penultimate, "sd2 penultimate")


@pytest.mark.parity
def test_transformers_sd15_text_encoder_has_the_same_parameter_count():
    with torch.device("meta"):  # shapes only, no memory, no random init
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu"))
    assert sum(p.numel() for p in ref.parameters()) == count(CLIPTextConfig.sd15()) == 123_060_480


@pytest.mark.parity
def test_loading_reports_missing_and_misshapen_tensors():
    ref = _reference(**TOY)
    cfg = CLIPTextConfig.toy(num_hidden_layers=3)
    template = jax.eval_shape(lambda: CLIPTextModel(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32)))
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    sd.pop("encoder.layers.1.self_attn.k_proj.weight")
    sd["encoder.layers.2.mlp.fc2.bias"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as e:
        torch_to_flax(clip_text_state_dict(sd), template["params"], "CLIP text encoder")
    msg = str(e.value)
    assert "CLIP text encoder" in msg and "encoder/layers_1/self_attn/k_proj/kernel" in msg
    assert "encoder.layers.2.mlp.fc2.bias (3,)" in msg
    # a text encoder of the wrong size (SD 2.x width into the SD 1.x model) names the culprits
    with pytest.raises(ValueError, match="embeddings.token_embedding.weight"):
        _convert(_reference(**(TOY | dict(hidden_size=32, intermediate_size=128))), cfg)


@pytest.mark.parity
@pytest.mark.slow
def test_full_size_sd15_text_encoder_matches_transformers():
    """ViT-L/14 text tower (123M parameters), random weights, one prompt, float32."""
    ref = _reference(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    assert sum(p.numel() for p in ref.parameters()) == 123_060_480
    cfg = CLIPTextConfig.sd15()
    params = _convert(ref, cfg, prefix="text_model.")
    ids = _ids(1, seed=1)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids))
    del ref
    got = jax.jit(CLIPTextModel(cfg).apply)({"params": params}, ids)
    _compare(got.last_hidden_state, want.last_hidden_state, "sd15 full size last_hidden_state")
    _compare(got.pooler_output, want.pooler_output, "sd15 full size pooled")
