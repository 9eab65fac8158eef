"""Training a LoRA (minidiff lora) on the built-in model.

- the adapters start at the model (B = 0), only they are trained, and the file they are saved to fuses
  (minidiff.lora, the loading code) into exactly the weights the training step used;
- the command writes a file that ``txt2img --lora`` loads, with its identifier known to the model;
- diffusers' ``load_lora_weights`` loads the same file into the diffusers form of the built-in model
  (its weights put into diffusers' UNet2DConditionModel and transformers' CLIPTextModel by inverting
  minidiff's own converter), and its UNet and text encoder then agree with minidiff's;
- (slow) rank 4 learns the ring at places it never saw, as DreamBooth does (lesson 10, the README).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from minidiff import pipeline as P
from minidiff.cli import main
from minidiff.lora import fuse_loras, read_lora, save_lora
from minidiff.train import finetune as F
from minidiff.train.configs import LoRAConfig
from minidiff.train.lora import init_adapters, lora_layers, lora_targets, train_lora, with_adapters

pytestmark = pytest.mark.skipif(not P.MINI_MODEL.is_file(), reason="no built-in model in this checkout")


@pytest.fixture(scope="module")
def mini():
    return P.load_pipeline()


def _flat(tree):
    return {k: np.asarray(v) for k, v in flatten_dict(tree).items()}


def test_targets_are_the_attention_projections_and_b_zero_is_the_model(mini):
    unet = P.float32_params(mini.params["unet"])
    targets = lora_targets(unet, LoRAConfig.targets)
    # the mini UNet: 7 transformer blocks (2 down, 1 mid, 3 up... as its config has) x 2 attentions x 4
    assert len(targets) % 8 == 0 and len(targets) >= 8
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in targets
    text = lora_targets(mini.params["text_encoder"], ("q_proj",), "text_encoder")
    assert sorted(text) == [f"text_model.encoder.layers.{i}.self_attn.q_proj" for i in range(2)]
    adapters = init_adapters(unet, targets, 3, jax.random.PRNGKey(0))
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # cross-attention: d_in = context width
    d_in, d_out = unet["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"].shape
    assert adapters[name]["down"].shape == (3, d_in) and adapters[name]["up"].shape == (d_out, 3)
    assert np.abs(adapters[name]["down"]).max() <= 1 / np.sqrt(d_in) and not np.any(adapters[name]["up"])
    same = _flat(with_adapters(unet, adapters, targets, 2.0))
    assert all(np.array_equal(v, same[k]) for k, v in _flat(unet).items())  # W + 2 A^T 0 = W


def test_only_the_adapters_train_and_the_file_fuses_to_the_trained_weights(mini, tmp_path):
    before = {k: v.copy() for k, v in _flat(mini.params).items()}
    subject = F.draw_subject("ring")
    cfg = LoRAConfig(rank=2, alpha=8.0, text_encoder=True, steps=3, batch=2, prior_weight=0.0, lr=1e-2)
    adapters, history = train_lora(mini, subject, cfg, progress=False)
    assert np.all(np.isfinite(history["loss"]))
    assert all(np.array_equal(v, _flat(mini.params)[k]) for k, v in before.items())  # pipe unchanged
    unet, text = P.float32_params(mini.params["unet"]), P.float32_params(mini.params["text_encoder"])
    targets = lora_targets(unet, cfg.targets)
    text_targets = lora_targets(text, ("q_proj", "k_proj", "v_proj", "out_proj"), "text_encoder")
    assert set(adapters["unet"]) == set(targets) and set(adapters["text_encoder"]) == set(text_targets)
    n = sum(a.size for part in adapters.values() for f in part.values() for a in f.values())
    assert history["parameters"] == n
    assert all(np.any(f["up"]) for part in adapters.values() for f in part.values())  # B moved off zero

    # the file: alpha / r = 4 multiplied into up; read back by the loading code, fused = the training's W'
    path = save_lora(tmp_path / "l.safetensors", lora_layers(adapters, 4.0))
    lora = read_lora(path)
    assert lora.format == "peft" and len(lora.layers) == len(targets) + len(text_targets)
    fused, _ = fuse_loras({"unet": unet, "text_encoder": text}, [(lora, 1.0)], mini.unet_config.layers_per_block)
    trained = {"unet": with_adapters(unet, adapters["unet"], targets, 4.0),
               "text_encoder": with_adapters(text, adapters["text_encoder"], text_targets, 4.0)}
    want, got, base = _flat(trained), _flat(fused), _flat({"unet": unet, "text_encoder": text})
    changed = [k for k in want if not np.array_equal(want[k], base[k])]
    assert len(changed) == len(targets) + len(text_targets)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=str(k))


def test_cli_lora_then_txt2img_and_evaluate_with_it(tmp_path, capsys, recwarn):
    from minidiff.images import read_metadata

    assert main(["draw-subject", "ring", "--out", str(tmp_path / "s")]) == 0
    assert main(["lora", str(tmp_path / "s"), "--out", str(tmp_path / "lo"), "--steps", "2", "--rank", "2",
                 "--class-images", "1", "--save-every", "1", "--no-progress", "--no-samples"]) == 0
    path = tmp_path / "lo" / "lora.safetensors"
    history = json.loads((tmp_path / "lo" / "history.json").read_text())
    assert history["config"]["rank"] == 2 and (tmp_path / "lo" / "lora-1.safetensors").is_file()
    assert 4 * history["parameters"] < path.stat().st_size < 4 * history["parameters"] + 32_000  # float32 + names
    assert json.loads(read_lora(path).metadata["minidiff"])["identifier"] == "sks"
    out = tmp_path / "o.png"
    recwarn.clear()
    assert main(["txt2img", "a red sks circle in the center", "--lora", f"{path}:0.5", "--steps", "2",
                 "--no-progress", "-o", str(out)]) == 0
    assert not [w for w in recwarn if "unknown words" in str(w.message)]  # the LoRA's identifier is known
    assert json.loads(read_metadata(out)["loras"])[0]["scale"] == 0.5
    assert main(["lora", str(tmp_path / "s"), "--out", str(tmp_path / "x"), "--no-prior", "--prior-weight", "2"]) == 2
    assert "contradict" in capsys.readouterr().err
    assert main(["lora", str(tmp_path / "s"), "--out", str(tmp_path / "x"), "--rank", "0"]) == 2


# --- the file in diffusers --------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


def _into_torch(model, flax_tree, to_flax):
    """Fill a torch model with a Flax tree by inverting minidiff's converter: each torch tensor is
    filled with its elements' global indices, converted (``to_flax``: renames, transposes), and the
    Flax tree's values are written back to the indices that landed on them."""
    state = model.state_dict()
    ids, offset = {}, 0
    for k, v in state.items():
        ids[k] = np.arange(offset, offset + v.numel(), dtype=np.float64).reshape(tuple(v.shape))
        offset += v.numel()
    where = flatten_dict(to_flax(ids))
    values = np.full(offset, np.nan)
    for path, leaf in flatten_dict(flax_tree).items():
        values[where[path].astype(np.int64).ravel()] = np.asarray(leaf, np.float64).ravel()
    missing = [k for k in ids if np.isnan(values[ids[k].astype(np.int64)]).any()]
    assert not missing or missing == ["text_model.embeddings.position_ids"], missing
    with torch.no_grad():
        for k, v in state.items():
            if k not in missing:
                v.copy_(torch.from_numpy(values[ids[k].astype(np.int64)].astype(np.float32)))


def _diffusers_mini(mini, folder):
    """The built-in model as diffusers' StableDiffusionPipeline (UNet and text encoder: its weights)."""
    from minidiff.weights import clip_text_state_dict, torch_to_flax

    import sd_fixtures as fx

    u, t = mini.unet_config, mini.text_config
    n = len(u.block_out_channels)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=u.layers_per_block,
        block_out_channels=tuple(u.block_out_channels), down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n, attention_head_dim=u.num_attention_heads,
        cross_attention_dim=u.cross_attention_dim, norm_num_groups=u.norm_num_groups).eval()
    assert all(u.attention) and u.mid_block_attention and not u.use_linear_projection  # as built above
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        max_position_embeddings=t.max_position_embeddings, hidden_act=t.hidden_act, eos_token_id=t.eos_token_id)).eval()
    params = mini.params
    _into_torch(unet, params["unet"], lambda sd: torch_to_flax(sd, params["unet"], "UNet", np.float64))
    _into_torch(text, params["text_encoder"],
                lambda sd: torch_to_flax(clip_text_state_dict(sd), params["text_encoder"], "CLIP", np.float64))
    fx.write_tokenizer(folder / "tok", "<|endoftext|>")
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)  # LoRAs skip it
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tok"), unet=unet,
        scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _relative(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


@pytest.mark.parity
@pytest.mark.slow
def test_a_trained_lora_loads_in_diffusers_and_gives_the_same_outputs(mini, tmp_path):
    import copy

    from minidiff.nn.clip import CLIPTextModel
    from minidiff.nn.unet import UNet2DCondition

    reference = _diffusers_mini(mini, tmp_path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([10, 900])
    ctx = rng.standard_normal((2, 77, mini.unet_config.cross_attention_dim)).astype(np.float32)
    ids = mini.tokenize(["a red sks circle in the top left", "a blue square"])

    def theirs(pipe):
        with torch.no_grad():
            eps = pipe.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
            states = pipe.text_encoder(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
        return eps, states

    def ours(params):
        eps = UNet2DCondition(mini.unet_config).apply({"params": params["unet"]}, x.transpose(0, 2, 3, 1), t, ctx)
        states = CLIPTextModel(mini.text_config).apply({"params": params["text_encoder"]}, ids).last_hidden_state
        return np.asarray(eps).transpose(0, 3, 1, 2), np.asarray(states)

    for a, b in zip(theirs(reference), ours(mini.params)):  # the export itself
        assert _relative(b, a) <= 1e-5
    adapters, _ = train_lora(mini, F.draw_subject("ring"), LoRAConfig(
        rank=4, alpha=2.0, text_encoder=True, steps=4, batch=2, prior_weight=0.0, lr=2e-2), progress=False)
    path = save_lora(tmp_path / "ring.safetensors", lora_layers(adapters, 0.5))
    tuned = copy.deepcopy(reference)
    tuned.load_lora_weights(str(path))  # the PEFT keys: unet.<module>.lora_A.weight, text_encoder.text_model...
    tuned.fuse_lora()
    # fused into float32 weights, as diffusers' copy is (the built-in model's file is float16, and
    # fusing into float16 leaves rounds each weight to 1e-4)
    base = {part: P.float32_params(mini.params[part]) for part in ("unet", "text_encoder")}
    fused, _ = fuse_loras(base, [(read_lora(path), 1.0)], mini.unet_config.layers_per_block)
    plain = theirs(reference)
    for name, a, b, p in zip(("UNet", "text encoder"), theirs(tuned), ours(fused), plain):
        err, moved = _relative(b, a), _relative(p, a)
        print(f"{name}: minidiff vs diffusers with the LoRA {err:.1e} (the LoRA moved the output by {moved:.1e})")
        assert moved > 1e-3 and err <= 1e-5, (name, err, moved)


@pytest.mark.slow
def test_rank_4_learns_the_ring_where_it_never_saw_it(mini, tmp_path):
    """300 steps, prior preservation on (the defaults): "a red sks circle <place>" gives the ring at
    places the subject's pictures never showed (measured in the README's table)."""
    adapters, _ = train_lora(mini, F.draw_subject("ring"), LoRAConfig(), progress=False)
    tuned = mini.with_params()
    tuned.load_lora(save_lora(tmp_path / "l.safetensors", lora_layers(adapters, 1.0)))
    fidelity, _ = F.evaluate_subject(tuned, "ring", "sks", samples=1, steps=20)
    assert fidelity["ring"] >= 0.5, fidelity
