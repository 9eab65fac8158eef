"""The checkpoint converter (minidiff.convert: convert / read_checkpoint / load_converted) and the
ldm key maps of minidiff.weights.

The checkpoints are made here (tests/sd_fixtures.py): diffusers and transformers build SD's UNet,
VAE and text encoder with random weights at reduced widths (SD's block structure), save them as a
diffusers folder (safetensors and legacy .bin) and, renamed by a diffusers -> ldm map written in
the fixture module, as single files in the original ldm layout (.safetensors and .ckpt).  That
the single files really are the ldm layout is checked with diffusers' own single-file loader.
minidiff converts every layout to the same tree, and the converted models reproduce the reference
outputs (fp32, max abs error <= 1e-4 and relative to the largest output <= 1e-4).
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import sd_fixtures as fx
from minidiff.diffusion.schedule import NoiseSchedule
from minidiff.convert import convert, ldm_schedule_buffers, load_converted, read_checkpoint
from minidiff.tensorfiles import read_torch_pickle
from minidiff.weights import ldm_unet_key, ldm_vae_key, openclip_text_state_dict

ROOT = Path(__file__).resolve().parents[1]


# --- the key maps and the schedule buffers, by hand ------------------------------------------------

def test_ldm_unet_names():
    L = 2  # SD: 2 layers per block, so input_blocks 1, 2 | 3 = downsampler | 4, 5 | 6 | 7, 8 | 9 | 10, 11
    assert ldm_unet_key("input_blocks.0.0.weight", L) == "conv_in.weight"
    assert ldm_unet_key("time_embed.2.bias", L) == "time_embedding.linear_2.bias"
    assert ldm_unet_key("input_blocks.2.0.in_layers.2.weight", L) == "down_blocks.0.resnets.1.conv1.weight"
    assert ldm_unet_key("input_blocks.3.0.op.weight", L) == "down_blocks.0.downsamplers.0.conv.weight"
    assert ldm_unet_key("input_blocks.4.1.proj_in.weight", L) == "down_blocks.1.attentions.0.proj_in.weight"
    assert ldm_unet_key("input_blocks.4.0.skip_connection.bias", L) == "down_blocks.1.resnets.0.conv_shortcut.bias"
    assert ldm_unet_key("input_blocks.11.0.emb_layers.1.weight", L) == "down_blocks.3.resnets.1.time_emb_proj.weight"
    assert ldm_unet_key("middle_block.1.transformer_blocks.0.attn2.to_k.weight", L) == \
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert ldm_unet_key("middle_block.2.out_layers.3.bias", L) == "mid_block.resnets.1.conv2.bias"
    assert ldm_unet_key("output_blocks.2.1.conv.weight", L) == "up_blocks.0.upsamplers.0.conv.weight"  # no attention
    assert ldm_unet_key("output_blocks.5.2.conv.bias", L) == "up_blocks.1.upsamplers.0.conv.bias"  # after attention
    assert ldm_unet_key("output_blocks.5.1.norm.weight", L) == "up_blocks.1.attentions.2.norm.weight"
    assert ldm_unet_key("output_blocks.9.0.out_layers.0.weight", L) == "up_blocks.3.resnets.0.norm2.weight"
    assert ldm_unet_key("out.0.bias", L) == "conv_norm_out.bias"
    assert ldm_unet_key("nonsense.weight", L) == "nonsense.weight"  # left for the caller to report


def test_ldm_vae_names():
    n = 4
    assert ldm_vae_key("encoder.down.1.block.0.nin_shortcut.weight", n) == \
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
    assert ldm_vae_key("encoder.down.2.downsample.conv.bias", n) == "encoder.down_blocks.2.downsamplers.0.conv.bias"
    assert ldm_vae_key("decoder.up.3.upsample.conv.weight", n) == "decoder.up_blocks.0.upsamplers.0.conv.weight"
    assert ldm_vae_key("decoder.up.0.block.2.norm1.bias", n) == "decoder.up_blocks.3.resnets.2.norm1.bias"
    assert ldm_vae_key("decoder.mid.attn_1.proj_out.bias", n) == "decoder.mid_block.attentions.0.to_out.0.bias"
    assert ldm_vae_key("encoder.mid.attn_1.norm.weight", n) == "encoder.mid_block.attentions.0.group_norm.weight"
    assert ldm_vae_key("encoder.mid.block_2.conv1.weight", n) == "encoder.mid_block.resnets.1.conv1.weight"
    assert ldm_vae_key("encoder.norm_out.weight", n) == "encoder.conv_norm_out.weight"
    assert ldm_vae_key("post_quant_conv.bias", n) == "post_quant_conv.bias"


def test_openclip_fused_attention_is_split_and_the_last_block_left_out():
    d = 4
    fused = np.arange(3 * d * d, dtype=np.float32).reshape(3 * d, d)
    sd = {"transformer.resblocks.0.attn.in_proj_weight": fused, "transformer.resblocks.0.attn.in_proj_bias": np.arange(12.0),
          "transformer.resblocks.0.mlp.c_fc.weight": np.zeros((8, d)), "transformer.resblocks.1.ln_1.weight": np.ones(d),
          "positional_embedding": np.zeros((77, d)), "text_projection": np.zeros((d, d)), "logit_scale": np.zeros(())}
    out, origin, left_out = openclip_text_state_dict(sd, keep_layers=1)
    np.testing.assert_array_equal(out["encoder.layers.0.self_attn.k_proj.weight"], fused[d:2 * d])
    np.testing.assert_array_equal(out["encoder.layers.0.self_attn.v_proj.bias"], np.arange(8.0, 12.0))
    assert "encoder.layers.0.mlp.fc1.weight" in out and "embeddings.position_embedding.weight" in out
    assert sorted(left_out) == ["logit_scale", "text_projection", "transformer.resblocks.1.ln_1.weight"]
    assert origin["encoder.layers.0.self_attn.q_proj.weight"] == "transformer.resblocks.0.attn.in_proj_weight[q]"


def test_ldm_schedule_buffers_are_ldms_formulas():
    ours = ldm_schedule_buffers(NoiseSchedule.from_name("scaled_linear"))
    ldm = fx.ldm_schedule(fx.sd_betas())  # written from ldm's register_schedule, stored as float32
    assert set(ours) == set(ldm)
    for k in ours:
        np.testing.assert_allclose(ours[k], ldm[k], rtol=1e-6, atol=1e-12, err_msg=k)


def test_missing_and_foreign_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.safetensors"):
        read_checkpoint(tmp_path / "nope.safetensors")
    text = tmp_path / "notes.safetensors"
    text.write_text("these are my notes, not tensors\n" * 20)
    with pytest.raises(ValueError, match="notes.safetensors is not a readable .safetensors file"):
        read_checkpoint(text)
    (tmp_path / "model.onnx").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="unknown checkpoint type '.onnx'"):
        read_checkpoint(tmp_path / "model.onnx")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a diffusers Stable Diffusion folder: unet/ is missing"):
        read_checkpoint(tmp_path / "folder")
    with pytest.raises(ValueError, match="must be a .safetensors path"):
        convert(tmp_path / "folder", tmp_path / "out.npz")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        read_checkpoint(tmp_path / "folder", dtype="float8")


# --- checkpoints made by the reference libraries ---------------------------------------------------

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


class Made:
    """The reference models and the files they were saved to."""


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd1")
    m = Made()
    m.unet, m.vae, m.text = fx.build_models(fx.SD1_SMALL)
    m.folder = fx.save_diffusers_folder(root / "folder", m.unet, m.vae, m.text, "sd1")
    m.folder_bin = fx.save_diffusers_folder(root / "folder_bin", m.unet, m.vae, m.text, "sd1", safe_serialization=False)
    m.ldm = fx.ldm_state_dict(m.unet, m.vae, m.text, "sd1")
    m.single = fx.save_ldm(m.ldm, root / "sd1.safetensors")
    m.ckpt = fx.save_ldm(m.ldm, root / "sd1.ckpt")
    m.root = root
    return m


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2")
    m = Made()
    m.unet, m.vae, m.text = fx.build_models(fx.SD2_SMALL, seed=1)
    m.folder = fx.save_diffusers_folder(root / "folder", m.unet, m.vae, m.text, "sd2")
    m.ldm = fx.ldm_state_dict(m.unet, m.vae, m.text, "sd2")
    m.single = fx.save_ldm(m.ldm, root / "sd2.safetensors")
    m.root = root
    return m


@pytest.fixture(scope="module")
def sd1_converted(sd1):
    return read_checkpoint(sd1.folder)


def _flat(params):
    return flatten_dict(params, sep="/")


def _assert_same_tree(a, b, what):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys(), f"{what}: {sorted(set(fa) ^ set(fb))[:5]}"
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), f"{what}: {k}"


def _compare(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max()
    rel = err / np.abs(want).max()
    print(f"{what}: max abs error {err:.2e}, relative to max |output| {rel:.2e}")
    assert err <= 1e-4 and rel <= 1e-4, (what, err, rel)


def _check_outputs(made, params, config, family, seed=0):
    """UNet forward (2 latents 16x16, t = 10 and 981), VAE encode (posterior mean, logvar) and decode,
    text encoder (SD's context: last layer for SD 1.x, final LayerNorm of the penultimate for SD 2.x)."""
    import jax

    from minidiff.nn.autoencoder import AutoencoderKL
    from minidiff.nn.clip import CLIPTextModel
    from minidiff.nn.unet import UNet2DCondition

    rng = np.random.default_rng(seed)
    ctx_dim = config.unet.cross_attention_dim
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([10, 981])
    ctx = rng.standard_normal((2, 77, ctx_dim)).astype(np.float32)
    img = rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    z = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    ids = rng.integers(0, config.text_encoder.vocab_size, (2, 77))
    with torch.no_grad():
        want_eps = made.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
        dist = made.vae.encode(torch.from_numpy(img)).latent_dist
        want_mean, want_logvar = dist.mean.numpy(), dist.logvar.numpy()
        want_img = made.vae.decode(torch.from_numpy(z)).sample.numpy()
        out = made.text(torch.from_numpy(ids), output_hidden_states=True)
        if family == "sd2":
            want_ctx = made.text.final_layer_norm(out.hidden_states[-2]).numpy()
        else:
            want_ctx = out.last_hidden_state.numpy()

    nhwc, nchw = (lambda a: a.transpose(0, 2, 3, 1)), (lambda a: np.asarray(a).transpose(0, 3, 1, 2))
    unet = UNet2DCondition(config.unet)
    got_eps = jax.jit(unet.apply)({"params": params["unet"]}, nhwc(x), t, ctx)
    _compare(nchw(got_eps), want_eps, f"{family} UNet")
    vae = AutoencoderKL(config.vae)
    posterior = jax.jit(lambda p, a: vae.apply({"params": p}, a, method=AutoencoderKL.encode))(params["vae"], nhwc(img))
    _compare(nchw(posterior.mean), want_mean, f"{family} VAE posterior mean")
    _compare(nchw(posterior.logvar), want_logvar, f"{family} VAE posterior logvar")
    decoded = jax.jit(lambda p, a: vae.apply({"params": p}, a, method=AutoencoderKL.decode))(params["vae"], nhwc(z))
    _compare(nchw(decoded), want_img, f"{family} VAE decoder")
    got_ctx = jax.jit(CLIPTextModel(config.text_encoder).apply)({"params": params["text_encoder"]}, ids)
    _compare(got_ctx.last_hidden_state, want_ctx, f"{family} text encoder")


@pytest.mark.parity
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_architectures_are_read_off_the_shapes(family):
    """SD 1.5 and SD 2.x at full size, on torch's meta device (shapes only, no memory): the configs
    inferred from an ldm file's shapes are minidiff's SD configs."""
    from minidiff.nn.autoencoder import AutoencoderKLConfig
    from minidiff.nn.clip import CLIPTextConfig
    from minidiff.nn.unet import UNetConfig
    from minidiff.weights import (LDM_OPENCLIP, LDM_UNET, LDM_VAE, clip_text_config_from_weights,
                                  clip_text_state_dict, unet_config_from_ldm, vae_config_from_ldm)

    spec = dict(fx.SD15)
    if family == "sd2":  # SD 2.1: heads 5/10/20/20 of 64, linear proj_in, OpenCLIP ViT-H/14 (24 blocks)
        spec["unet"] = dict(spec["unet"], attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                            use_linear_projection=True)
        spec["text"] = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, hidden_act="gelu")
    with torch.device("meta"):
        unet, vae, text = fx.build_models(spec, perturb=False)
    sd = fx.ldm_state_dict(unet, vae, text, family)
    part = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}  # noqa: E731
    heads_per_channel = 64 if family == "sd2" else None
    assert unet_config_from_ldm(part(LDM_UNET), heads_per_channel) == (UNetConfig.sd2() if family == "sd2" else UNetConfig.sd15())
    assert vae_config_from_ldm(part(LDM_VAE)) == AutoencoderKLConfig.sd()
    if family == "sd2":
        text_sd = openclip_text_state_dict(part(LDM_OPENCLIP), keep_layers=23)[0]
        assert clip_text_config_from_weights(text_sd, "gelu") == CLIPTextConfig.sd2()
    else:
        text_sd = clip_text_state_dict(part("cond_stage_model.transformer."))
        assert clip_text_config_from_weights(text_sd, "quick_gelu") == CLIPTextConfig.sd15()


@pytest.mark.parity
def test_the_single_file_fixture_is_the_layout_diffusers_reads(sd1, sd2):
    """diffusers' own single-file loader reads the fixture's ldm files back into the same weights,
    so the fixture's diffusers -> ldm renaming is the real layout, not just minidiff's inverse."""
    def same(model, ref, what):
        a, b = model.state_dict(), ref.state_dict()
        assert a.keys() == b.keys(), what
        for k in a:
            assert torch.equal(a[k], b[k]), f"{what}: {k}"

    for made in (sd1, sd2):
        kw = dict(config=str(made.folder), local_files_only=True)
        same(diffusers.UNet2DConditionModel.from_single_file(str(made.single), subfolder="unet", **kw), made.unet, "UNet")
        same(diffusers.AutoencoderKL.from_single_file(str(made.single), subfolder="vae", **kw), made.vae, "VAE")
    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(sd1.single), config=str(sd1.folder),
                                                              local_files_only=True, safety_checker=None)
    same(pipe.text_encoder, sd1.text, "SD 1 text encoder")
    # SD 2's OpenCLIP text tower: diffusers' converter function (its loader hard-codes 24 blocks)
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    converted = convert_open_clip_checkpoint(sd2.text, sd2.ldm)
    want = {k.removeprefix("text_model."): v for k, v in sd2.text.state_dict().items()}
    for k, v in converted.items():
        k = k.removeprefix("text_model.")
        if k != "text_projection.weight":
            assert torch.equal(v, want[k]), k
    assert {k.removeprefix("text_model.") for k in converted} >= set(want)


@pytest.mark.parity
def test_sd1_every_layout_converts_to_the_same_tree(sd1, sd1_converted, tmp_path):
    params, config = sd1_converted
    assert (config.family, config.prediction_type, config.pad_token_id, config.ema) == ("sd1", "epsilon", 49407, None)
    # a single file whose SD 1 text keys lack the "text_model." level
    flat_text = {k.replace("transformer.text_model.", "transformer."): v for k, v in sd1.ldm.items()}
    no_level = fx.save_ldm(flat_text, tmp_path / "no_text_model_level.safetensors")
    for src in (sd1.folder_bin, sd1.single, sd1.ckpt, no_level):
        other, other_config = read_checkpoint(src)
        _assert_same_tree(params, other, src.name)
        for part in ("unet", "vae", "text_encoder", "family", "prediction_type", "scheduler", "pad_token_id"):
            assert getattr(other_config, part) == getattr(config, part), (src.name, part)
    assert read_checkpoint(sd1.ckpt)[1].source["global_step"] == 470000


@pytest.mark.parity
def test_sd1_converted_models_match_the_references(sd1, sd1_converted):
    _check_outputs(sd1, *sd1_converted, "sd1")


@pytest.mark.parity
def test_sd2_layouts_convert_to_the_same_tree_and_match_the_references(sd2):
    params, config = read_checkpoint(sd2.folder)
    single, single_config = read_checkpoint(sd2.single)
    _assert_same_tree(params, single, "SD 2 single file")
    for c in (config, single_config):
        assert c.family == "sd2" and c.prediction_type == "v_prediction" and c.pad_token_id == 0
        assert c.unet.use_linear_projection and c.unet.cross_attention_dim == 1024
        assert c.unet.heads_per_block == (1, 2, 2, 2) and c.text_encoder.num_hidden_layers == 2
        assert c.text_encoder.hidden_act == "gelu" and c.unet.sample_size == 96
    assert single_config.unet == config.unet and single_config.text_encoder == config.text_encoder
    notes = "\n".join(single_config.notes)
    assert "v_prediction ASSUMED" in notes and "resblocks.2) is left out" in notes
    assert "OpenCLIP's contrastive head" in notes and "prediction: v_prediction (scheduler_config.json)" in config.notes
    _check_outputs(sd2, params, config, "sd2", seed=1)
    # what the weights cannot say is given explicitly: a 512-px SD 2 base model predicts epsilon
    base = read_checkpoint(sd2.single, config="sd2", prediction="epsilon")[1]
    assert (base.family, base.prediction_type, base.unet.sample_size) == ("sd2", "epsilon", 64)


@pytest.mark.parity
def test_ema_weights_are_used_and_reported(sd1, sd1_converted, tmp_path):
    """The ldm file stores the EMA UNet as model_ema.<name without dots>; with it present, the EMA
    weights are converted (and the report says so), unless ema=False."""
    params, _ = sd1_converted
    raw_unet = fx.build_models(fx.SD1_SMALL, seed=5)[0]  # different weights for model.diffusion_model.*
    sd = fx.ldm_state_dict(raw_unet, sd1.vae, sd1.text, "sd1", ema=sd1.unet)
    assert "model_ema.diffusion_modelinput_blocks00weight" in sd
    path = fx.save_ldm(sd, tmp_path / "with_ema.safetensors")
    got, config = read_checkpoint(path)
    _assert_same_tree(got, params, "EMA")
    assert config.ema is True and any("USING THE EMA WEIGHTS" in n for n in config.notes)
    raw, raw_config = read_checkpoint(path, ema=False)
    _assert_same_tree(raw["vae"], params["vae"], "VAE")
    assert not np.array_equal(raw["unet"]["conv_in"]["kernel"], params["unet"]["conv_in"]["kernel"])
    assert raw_config.ema is False and any("NOT used" in n for n in raw_config.notes)
    with pytest.raises(ValueError, match="no EMA copy"):
        read_checkpoint(sd1.single, ema=True)
    del sd["model_ema.diffusion_modelout2bias"]
    broken = fx.save_ldm(sd, tmp_path / "broken_ema.safetensors")
    with pytest.raises(ValueError, match=r"EMA copy .* does not match .*1 UNet tensors have no EMA copy "
                                         r"\(model.diffusion_model.out.2.bias\).*--no-ema"):
        read_checkpoint(broken)


@pytest.mark.parity
@pytest.mark.parametrize("source_dtype", ["float16", "bfloat16"])
def test_half_precision_sources(sd1, sd1_converted, tmp_path, source_dtype):
    """fp16 / bf16 files (every float, the schedule buffers too, as in the public half files) convert
    to exactly the float32 values of the half-precision tensors; output dtypes float16 / bfloat16."""
    import ml_dtypes

    params, _ = sd1_converted
    path = fx.save_ldm(sd1.ldm, tmp_path / f"{source_dtype}.safetensors", dtype=getattr(torch, source_dtype))
    got, config = read_checkpoint(path)
    half = np.float16 if source_dtype == "float16" else ml_dtypes.bfloat16
    want = {k: v.astype(half).astype(np.float32) for k, v in _flat(params).items()}
    got = _flat(got)
    assert all(got[k].dtype == np.float32 and np.array_equal(got[k], want[k]) for k in want)
    assert config.source["dtypes"].get(source_dtype, 0) > 900
    assert any("max relative difference" in n for n in config.notes)  # the half schedule still passes
    out, out_config = read_checkpoint(path, dtype=source_dtype)
    assert out_config.dtype == source_dtype
    assert all(v.dtype == np.dtype(half) and np.array_equal(v.astype(np.float32), want[k]) for k, v in _flat(out).items())


@pytest.mark.parity
def test_a_different_training_schedule_fails_loudly(sd1, tmp_path):
    sd = fx.ldm_state_dict(sd1.unet, sd1.vae, sd1.text, "sd1", schedule="linear")
    path = fx.save_ldm(sd, tmp_path / "linear.safetensors")
    with pytest.raises(ValueError, match="noise schedule differs from scaled_linear .*matches the linear schedule"):
        read_checkpoint(path)


@pytest.mark.parity
def test_convert_writes_one_file_and_load_converted_reads_it(sd2, tmp_path):
    dst = tmp_path / "sd2.safetensors"
    report = convert(sd2.single, dst, prediction="v_prediction", dtype="bfloat16")
    assert report.weights == dst and report.config_file == tmp_path / "sd2.json" and dst.is_file()
    text = str(report)
    assert "wrote" in text and "EMA:" in text and "schedule:" in text and "prediction: v_prediction as requested" in text
    saved = json.loads((tmp_path / "sd2.json").read_text())
    assert saved["prediction_type"] == "v_prediction" and saved["dtype"] == "bfloat16" and saved["family"] == "sd2"
    assert saved["vae"]["scaling_factor"] == 0.18215 and saved["scheduler"]["beta_schedule"] == "scaled_linear"
    assert saved["source"]["layout"] == "ldm" and saved["ema"] is None and saved["unet"]["block_out_channels"] == [64, 128, 128, 128]
    from safetensors import safe_open

    with safe_open(str(dst), framework="np") as f:  # a plain safetensors file, flattened Flax names
        keys = set(f.keys())
    assert "unet/down_blocks_0/resnets_0/conv1/kernel" in keys and "text_encoder/embeddings/token_embedding/embedding" in keys
    assert "vae/encoder/mid_block/attentions_0/to_q/kernel" in keys
    params, config = load_converted(dst)  # views of the memory-mapped file
    want, want_config = read_checkpoint(sd2.single, prediction="v_prediction", dtype="bfloat16")
    _assert_same_tree(params, want, "load_converted")
    copied, _ = load_converted(dst, mmap=False)  # each tensor read into its own array
    _assert_same_tree(copied, want, "load_converted(mmap=False)")
    kernel = params["unet"]["conv_in"]["kernel"]
    assert not kernel.flags.writeable and copied["unet"]["conv_in"]["kernel"].flags.writeable
    assert config.unet == want_config.unet and config.vae == want_config.vae
    assert config.text_encoder == want_config.text_encoder and config.notes == want_config.notes
    with pytest.raises(ValueError, match="already exists"):
        convert(sd2.single, dst)
    # the config inside the weights counts; the JSON next to them is a copy, and an edited one is named
    (tmp_path / "sd2.json").write_text(json.dumps(saved | {"prediction_type": "epsilon"}))
    with pytest.warns(UserWarning, match="sd2.json differs from the config stored in sd2.safetensors"):
        assert load_converted(tmp_path / "sd2.json")[1].prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="not a minidiff converted model"):
        load_converted(sd2.single)


@pytest.mark.parity
def test_bad_checkpoints_name_the_problem(sd1, sd2, tmp_path):
    data = sd1.single.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.safetensors is not a readable .safetensors file"):
        read_checkpoint(tmp_path / "truncated.safetensors")
    data = sd1.ckpt.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.ckpt is not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "truncated.ckpt")

    removed = dict(sd1.ldm)
    del removed["model.diffusion_model.input_blocks.4.0.in_layers.2.weight"]
    with pytest.raises(ValueError, match=r"UNet weights: 1 parameters have no tensor .*down_blocks_1/resnets_0/conv1/kernel"):
        read_checkpoint(fx.save_ldm(removed, tmp_path / "removed.safetensors"))

    wrong = dict(sd1.ldm)
    wrong["first_stage_model.decoder.up.1.block.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(ValueError, match=r"VAE weights: 1 tensors have the wrong shape: "
                                         r"first_stage_model.decoder.up.1.block.0.conv1.weight \(3, 3, 3, 3\)"):
        read_checkpoint(fx.save_ldm(wrong, tmp_path / "wrong.safetensors"))

    # problems in all three models and outside them: ONE error lists them all
    several = dict(sd1.ldm)
    del several["first_stage_model.encoder.conv_in.bias"]
    several["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias"] = torch.zeros(5)
    several["model.diffusion_model.extra.weight"] = torch.zeros(2)
    several["some_other_model.weight"] = torch.zeros(2)
    with pytest.raises(ValueError) as e:
        read_checkpoint(fx.save_ldm(several, tmp_path / "several.safetensors"))
    msg = str(e.value)
    assert "\n" not in msg and "encoder/conv_in/bias" in msg and "fc2.bias (5,)" in msg
    assert "UNet weights: 1 tensors match no parameter: model.diffusion_model.extra.weight" in msg
    assert "1 tensors belong to no part of an SD checkpoint" in msg and "some_other_model.weight" in msg
    assert msg.count("fc2/bias") == 1  # a mis-shaped tensor is not also reported missing

    # an SD 2 checkpoint read as SD 1 (and the other way round)
    with pytest.raises(ValueError, match=r"--config sd1 does not fit these weights: attn2.to_k has 1024 input features: "
                                         r"an SD 2.x checkpoint; --config sd1 expects 768; the text encoder is OpenCLIP"):
        read_checkpoint(sd2.single, config="sd1")
    with pytest.raises(ValueError, match="--config sd1 does not fit"):
        read_checkpoint(sd2.folder, config="sd1")
    with pytest.raises(ValueError, match="attn2.to_k has 768 input features: an SD 1.x checkpoint; --config sd2 expects 1024"):
        read_checkpoint(sd1.single, config="sd2")

    # a diffusers folder whose UNet is not SD's (Kandinsky's added image embedding; SDXL's without its second encoder)
    folder = tmp_path / "sdxl_like"
    (folder / "unet").mkdir(parents=True)
    for part in ("vae", "text_encoder"):
        os.symlink(sd1.folder / part, folder / part, target_is_directory=True)
    unet_config = json.loads((sd1.folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config | {"addition_embed_type": "image"}))
    with pytest.raises(ValueError, match="addition_embed_type='image' is not supported"):
        read_checkpoint(folder)
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config | {
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}))
    with pytest.raises(ValueError, match="SDXL's added embedding .* but there is no text_encoder_2/"):
        read_checkpoint(folder)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parity
def test_a_pickle_that_runs_code_is_refused_not_run(sd1, tmp_path):
    marker = tmp_path / "pwned"
    sd = {k: v for k, v in list(sd1.ldm.items())[:5]}
    torch.save({"state_dict": sd, "payload": _RunsCode(marker)}, tmp_path / "evil.ckpt")  # zip format
    for protocol in (2, 4):  # bare pickles, the legacy format
        with open(tmp_path / f"evil_plain{protocol}.ckpt", "wb") as f:
            pickle.dump({"state_dict": {}, "payload": _RunsCode(marker)}, f, protocol=protocol)
    for name in ("evil.ckpt", "evil_plain2.ckpt"):
        with pytest.raises(ValueError, match=r"refused to load: its pickle asks for the object posix.system, "
                                             r"and a pickle can run code"):
            read_checkpoint(tmp_path / name)
    with pytest.raises(ValueError, match=r"refused to load: its pickle asks for something other than tensors"):
        read_checkpoint(tmp_path / "evil_plain4.ckpt")
    assert not marker.exists()
    torch.save({"state_dict": sd}, tmp_path / "fine.ckpt")  # the same without the payload loads
    assert set(read_torch_pickle(tmp_path / "fine.ckpt")[0]) == set(sd)


@pytest.mark.parity
def test_a_ckpt_without_torch_says_so(sd1, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ImportError, match=r"reading a .ckpt / .bin checkpoint .* needs torch, which is not installed"):
        read_checkpoint(sd1.ckpt)


@pytest.mark.parity
def test_command_lines(sd1, tmp_path):
    from minidiff.cli import main

    sys.path.insert(0, str(ROOT))
    try:
        import weights_convert
    finally:
        sys.path.remove(str(ROOT))
    assert weights_convert.main([str(sd1.single), str(tmp_path / "a.safetensors")]) == 0
    assert main(["convert", str(sd1.ckpt), str(tmp_path / "b.safetensors"), "--config", "sd1", "--dtype", "float16"]) == 0
    assert main(["convert", str(sd1.single), str(tmp_path / "c.safetensors"), "--config", "sd2"]) == 2
    a, _ = load_converted(tmp_path / "a.safetensors")
    b, cfg = load_converted(tmp_path / "b.safetensors")
    assert cfg.dtype == "float16" and all(np.array_equal(v.astype(np.float16), _flat(b)[k]) for k, v in _flat(a).items())
    r = subprocess.run([sys.executable, str(ROOT / "weights_convert.py"), str(tmp_path / "missing.ckpt"),
                        str(tmp_path / "d.safetensors")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "checkpoint not found" in r.stderr


# --- the full SD 1.5 size ----------------------------------------------------------------------------

@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.bigmem
def test_full_size_sd15_both_layouts(tmp_path):
    """SD 1.5's architecture (1.07 G parameters, random weights, fp32): the diffusers folder and the
    ldm single file convert to the same tree, and the converted UNet matches diffusers' at 8x8."""
    import gc

    import jax

    from minidiff.nn.unet import UNet2DCondition

    unet, vae, text = fx.build_models(fx.SD15, perturb=False)  # norms left at their init: saves a pass
    assert sum(p.numel() for m in (unet, vae, text) for p in m.parameters()) == 859_520_964 + 83_653_863 + 123_060_480
    folder = fx.save_diffusers_folder(tmp_path / "folder", unet, vae, text, "sd1")
    single = fx.save_ldm(fx.ldm_state_dict(unet, vae, text, "sd1"), tmp_path / "sd15.safetensors")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 768)).astype(np.float32)
    with torch.no_grad():
        want = unet(torch.from_numpy(x), torch.tensor([500]), torch.from_numpy(ctx)).sample.numpy()
    del unet, vae, text
    gc.collect()

    params, config = read_checkpoint(folder)
    other, other_config = read_checkpoint(single)
    _assert_same_tree(params, other, "SD 1.5 single file")
    assert other_config.unet == config.unet == config.unet.sd15(sample_size=64)
    del other
    gc.collect()
    got = jax.jit(UNet2DCondition(config.unet).apply)({"params": params["unet"]}, x.transpose(0, 2, 3, 1),
                                                       np.array([500]), ctx)
    _compare(np.asarray(got).transpose(0, 3, 1, 2), want, "SD 1.5 UNet")


def test_a_diffusers_scheduler_config_names_the_default_sampler():
    from minidiff.convert import _sampler_from_diffusers
    from minidiff.diffusion.solvers import resolve

    notes = []
    cases = {"PNDMScheduler": ({}, "plms"), "EulerAncestralDiscreteScheduler": ({}, "euler_a"),
             "DPMSolverMultistepScheduler": ({"use_karras_sigmas": True}, "dpmpp_2m_karras"),
             "UniPCMultistepScheduler": ({}, "unipc"), "LCMScheduler": ({}, "lcm"),
             "FlowMatchEulerDiscreteScheduler": ({}, "DPM++ 2M Karras")}
    for cls, (flags, want) in cases.items():
        assert _sampler_from_diffusers({"_class_name": cls, **flags}, notes) == want
        resolve(want)  # every answer is a name the pipeline takes
    sde = {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}
    assert resolve(_sampler_from_diffusers(sde, notes)) == ("dpmpp_2m_sde", "karras")
    assert any("not one minidiff has" in n for n in notes)


def test_written_safetensors_are_aligned_and_read_by_safetensors(tmp_path):
    """minidiff's writer: any reader takes the file; tensors whose size is a multiple of 64 bytes start
    at multiples of 64 (memory-mapped, a CPU device uses them in place); 0-d, empty and bf16 tensors."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from minidiff.tensorfiles import bfloat16, memmap_safetensors, write_safetensors

    rng = np.random.default_rng(0)
    tensors = {"a/kernel": rng.standard_normal((3, 3, 4, 16)).astype(np.float32), "b": np.float32(2.5).reshape(()),
               "c": rng.standard_normal(5).astype(np.float16), "d": np.zeros((0, 3), np.float32),
               "e": rng.standard_normal(64).astype(bfloat16()), "f": np.arange(7, dtype=np.int64),
               "g": rng.standard_normal((32, 8)).astype(np.float32).T}  # not contiguous
    path = tmp_path / "w.safetensors"
    write_safetensors(path, tensors, {"format": "test"})
    with safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "test"}
    back = load_file(str(path))
    mapped = memmap_safetensors(path)
    for name, want in tensors.items():
        for got in (back[name], mapped[name]):
            assert got.shape == want.shape and got.dtype == want.dtype, name
            np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(want, np.float64))
        if want.nbytes % 64 == 0:
            assert mapped[name].ctypes.data % 64 == 0, name
