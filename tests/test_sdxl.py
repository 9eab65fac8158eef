"""Stable Diffusion XL: the networks, the converter and the pipeline against diffusers / transformers.

The reference models are SDXL's block structure at reduced widths with random weights
(``sd_fixtures.SDXL_SMALL``: no attention in the first UNet block, transformer depth 1 / 2 / 3, linear
proj_in/out, the "text_time" added embedding, CLIP-L and bigG-style text encoders with the full CLIP
vocabulary), saved as a diffusers folder and, renamed by the fixture's own diffusers -> SGM map, as a
single file in the layout of sd_xl_base_1.0.safetensors.  Tolerances: fp32 activations within 1e-4
(absolute and relative to the largest output), images within 2/255.  Full-size parameter counts come
from ``jax.eval_shape`` (no memory).
"""

import numpy as np
import pytest

import sd_fixtures as fx
from minidiff.nn.clip import CLIPTextConfig, CLIPTextModel
from minidiff.nn.unet import UNet2DCondition, UNetConfig


def _count(tree) -> int:
    import jax

    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def test_full_size_parameter_counts_from_the_configs():
    """SDXL base 1.0's UNet and bigG text tower, by shape only (jax.eval_shape: nothing is allocated)."""
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    cfg = UNetConfig.sdxl()
    added = {"text_embeds": jnp.zeros((1, 1280)), "time_ids": jnp.zeros((1, 6))}
    unet = jax.eval_shape(lambda: UNet2DCondition(cfg).init(key, jnp.zeros((1, 8, 8, 4)), jnp.zeros(1),
                                                            jnp.zeros((1, 1, 2048)), added_cond=added))
    assert _count(unet) == 2_567_463_684
    ids = jnp.zeros((1, 1), jnp.int32)
    assert _count(jax.eval_shape(lambda: CLIPTextModel(CLIPTextConfig.sdxl_g()).init(key, ids))) == 694_659_840
    assert _count(jax.eval_shape(lambda: CLIPTextModel(CLIPTextConfig.sdxl_l()).init(key, ids))) == 123_060_480


def test_unet_config_checks_its_fields():
    with pytest.raises(ValueError, match="transformer_layers_per_block has 2 entries, block_out_channels 3"):
        UNetConfig.sdxl(transformer_layers_per_block=(1, 2))
    with pytest.raises(ValueError, match="addition_embed_type='image' is not supported"):
        UNetConfig.sdxl(addition_embed_type="image")
    assert UNetConfig.sd15().transformer_depths == (1, 1, 1, 1) and UNetConfig.sdxl().pooled_text_dim == 1280


torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _compare(got, want, what, tol=1e-4):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.abs(got - want).max()
    rel = err / np.abs(want).max()
    print(f"{what}: max abs error {err:.2e}, relative to max |output| {rel:.2e}")
    assert err <= tol and rel <= tol, (what, err, rel)


class Made:
    """The reference models and the files they were saved to."""


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    m = Made()
    m.unet, m.vae, m.text, m.text_2 = fx.build_sdxl_models(fx.SDXL_SMALL)
    m.root = root
    return m


def _ids(rng, n):
    """Token ids as a tokenizer makes them: start, words, end, then padding (the end token or "!" = 0)."""
    ids = np.zeros((n, 77), np.int64)
    for i in range(n):
        k = int(rng.integers(3, 20))
        ids[i, 0], ids[i, 1:k], ids[i, k] = 49406, rng.integers(1, 49000, k - 1), 49407
        ids[i, k + 1:] = 49407 if i % 2 else 0
    return ids


def check_networks(made, params, config, seed=0):
    """UNet with the added conditioning, both text encoders (hidden states[-2] and bigG's projected
    pooled output), the VAE encoder and decoder: minidiff's against the reference models."""
    import jax

    from minidiff.nn.autoencoder import AutoencoderKL

    rng = np.random.default_rng(seed)
    ctx_dim, pooled_dim = config.unet.cross_attention_dim, config.unet.pooled_text_dim
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([10, 981])
    ctx = rng.standard_normal((2, 77, ctx_dim)).astype(np.float32)
    pooled = rng.standard_normal((2, pooled_dim)).astype(np.float32)
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 512, 32, 16, 1024, 960]], np.float32)
    img = rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    z = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    ids = _ids(rng, 2)
    T = torch.from_numpy
    with torch.no_grad():
        want_eps = made.unet(T(x), T(t), T(ctx), added_cond_kwargs={"text_embeds": T(pooled), "time_ids": T(time_ids)}
                             ).sample.numpy()
        dist = made.vae.encode(T(img)).latent_dist
        want_mean, want_logvar = dist.mean.numpy(), dist.logvar.numpy()
        want_img = made.vae.decode(T(z)).sample.numpy()
        out_l = made.text(T(ids), output_hidden_states=True)
        out_g = made.text_2(T(ids), output_hidden_states=True)

    nhwc, nchw = (lambda a: a.transpose(0, 2, 3, 1)), (lambda a: np.asarray(a).transpose(0, 3, 1, 2))
    unet = UNet2DCondition(config.unet)
    got_eps = jax.jit(unet.apply)({"params": params["unet"]}, nhwc(x), t, ctx,
                                  added_cond={"text_embeds": pooled, "time_ids": time_ids})
    _compare(nchw(got_eps), want_eps, "SDXL UNet (with text_time)")
    vae = AutoencoderKL(config.vae)
    posterior = jax.jit(lambda p, a: vae.apply({"params": p}, a, method=AutoencoderKL.encode))(params["vae"], nhwc(img))
    _compare(nchw(posterior.mean), want_mean, "SDXL VAE posterior mean")
    _compare(nchw(posterior.logvar), want_logvar, "SDXL VAE posterior logvar")
    decoded = jax.jit(lambda p, a: vae.apply({"params": p}, a, method=AutoencoderKL.decode))(params["vae"], nhwc(z))
    _compare(nchw(decoded), want_img, "SDXL VAE decoder")
    for name, cfg, want in (("text_encoder", config.text_encoder, out_l), ("text_encoder_2", config.text_encoder_2, out_g)):
        got = jax.jit(lambda p, i, cfg=cfg: CLIPTextModel(cfg).apply({"params": p}, i, output_hidden_states=True))(
            params[name], ids)
        _compare(got.hidden_states[-2], want.hidden_states[-2].numpy(), f"SDXL {name} hidden_states[-2]")
        _compare(got.last_hidden_state, want.last_hidden_state.numpy(), f"SDXL {name} last_hidden_state")
    _compare(jax.jit(lambda p, i: CLIPTextModel(config.text_encoder_2).apply({"params": p}, i).text_embeds)(
        params["text_encoder_2"], ids), out_g.text_embeds.numpy(), "SDXL text_encoder_2 projected pooled output")


@pytest.fixture(scope="module")
def sdxl_files(sdxl):
    sdxl.folder = fx.save_sdxl_folder(sdxl.root / "folder", sdxl.unet, sdxl.vae, sdxl.text, sdxl.text_2)
    sdxl.sgm = fx.sgm_state_dict(sdxl.unet, sdxl.vae, sdxl.text, sdxl.text_2)
    sdxl.single = fx.save_ldm(sdxl.sgm, sdxl.root / "sd_xl_small.safetensors")
    return sdxl


@pytest.fixture(scope="module")
def sdxl_converted(sdxl_files):
    from minidiff.convert import read_checkpoint

    return read_checkpoint(sdxl_files.folder)


def _flat(params):
    from flax.traverse_util import flatten_dict

    return flatten_dict(params, sep="/")


def _assert_same_tree(a, b, what, rtol=0.0):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys(), f"{what}: {sorted(set(fa) ^ set(fb))[:5]}"
    for k in fa:
        if rtol:
            np.testing.assert_allclose(np.asarray(fa[k], np.float32), np.asarray(fb[k], np.float32), rtol=rtol,
                                       atol=rtol * float(np.abs(np.asarray(fb[k], np.float32)).max()), err_msg=k)
        else:
            assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), f"{what}: {k}"


@pytest.mark.parity
def test_the_sgm_fixture_is_the_layout_diffusers_reads(sdxl_files):
    """diffusers' own single-file loader reads the fixture's SGM file back into the same four models, so
    the fixture's renaming (label_emb.0.0/0.2, conditioner.embedders.*, text_projection stored (width,
    proj)) is the real layout, not just minidiff's inverse."""
    m = sdxl_files
    pipe = diffusers.StableDiffusionXLPipeline.from_single_file(str(m.single), config=str(m.folder),
                                                                local_files_only=True)
    for name, ref in (("unet", m.unet), ("vae", m.vae), ("text_encoder", m.text), ("text_encoder_2", m.text_2)):
        a, b = getattr(pipe, name).state_dict(), ref.state_dict()
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k}"


@pytest.mark.slow
@pytest.mark.parity
def test_sdxl_folder_converts_and_matches_the_references(sdxl_files, sdxl_converted):
    params, config = sdxl_converted
    assert (config.family, config.prediction_type, config.sampler, config.guidance_scale) == ("sdxl", "epsilon", "euler", 5.0)
    assert (config.pad_token_id, config.pad_token_id_2, config.force_zeros_for_empty_prompt) == (49407, 0, True)
    assert config.unet.transformer_depths == (1, 2, 3) and config.unet.attention == (False, True, True)
    assert config.unet.pooled_text_dim == 192 and config.text_encoder_2.projection_dim == 192
    assert config.vae.scaling_factor == 0.13025 and set(params) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    check_networks(sdxl_files, params, config)


@pytest.mark.parity
def test_sgm_single_file_converts_to_the_same_tree(sdxl_files, sdxl_converted):
    from dataclasses import replace

    from minidiff.convert import read_checkpoint

    params, config = sdxl_converted
    single, single_config = read_checkpoint(sdxl_files.single)
    _assert_same_tree(params, single, "SGM single file")
    assert single_config.family == "sdxl" and single_config.source["layout"] == "sgm"
    assert replace(single_config.unet, sample_size=config.unet.sample_size) == config.unet
    assert replace(single_config.vae, sample_size=config.vae.sample_size) == config.vae
    assert single_config.text_encoder == config.text_encoder and single_config.text_encoder_2 == config.text_encoder_2
    assert single_config.unet.sample_size == 128 and single_config.vae.sample_size == 1024  # SDXL's 1024 px
    for part in ("prediction_type", "scheduler", "pad_token_id", "pad_token_id_2", "guidance_scale", "sampler",
                 "force_zeros_for_empty_prompt"):
        assert getattr(single_config, part) == getattr(config, part), part
    notes = "\n".join(single_config.notes)
    assert "logit_scale" in notes and "position_ids" in notes and "SGM" in notes


@pytest.mark.parity
@pytest.mark.parametrize("source_dtype", ["float16", "bfloat16"])
def test_half_precision_sgm_files(sdxl_files, sdxl_converted, tmp_path, source_dtype):
    """A float16 / bfloat16 single file converts to the float32 tree rounded to that precision, and
    ``dtype=`` sets what the parameters are stored in."""
    from minidiff.convert import read_checkpoint

    path = fx.save_ldm(sdxl_files.sgm, tmp_path / f"xl_{source_dtype}.safetensors", dtype=getattr(torch, source_dtype))
    params, config = read_checkpoint(path)
    assert set(config.source["dtypes"]) == {source_dtype, "int64"}  # int64: CLIP-L's position_ids
    _assert_same_tree(params, sdxl_converted[0], source_dtype, rtol=1e-2 if source_dtype == "bfloat16" else 2e-3)
    half = read_checkpoint(path, dtype="bfloat16")[0]
    assert {str(a.dtype) for a in _flat(half).values()} == {"bfloat16"}


@pytest.mark.parity
def test_convert_and_load_converted_round_trip_sdxl(sdxl_files, sdxl_converted, tmp_path):
    from minidiff.convert import convert, load_converted

    report = convert(sdxl_files.single, tmp_path / "xl.safetensors")
    params, config = load_converted(report.weights)
    assert config == report.config and config.text_encoder_2 is not None
    single = __import__("minidiff.convert", fromlist=["read_checkpoint"]).read_checkpoint(sdxl_files.single)[0]
    _assert_same_tree(params, single, "converted file")
    # the command line: --config sdxl is accepted for SDXL weights, and --config sd1 refused
    from minidiff.cli import main

    assert main(["convert", str(sdxl_files.single), str(tmp_path / "cli.safetensors"), "--config", "sdxl"]) == 0
    assert load_converted(tmp_path / "cli.safetensors")[1].text_encoder_2 is not None
    assert main(["convert", str(sdxl_files.single), str(tmp_path / "bad.safetensors"), "--config", "sd1"]) == 2


def test_bad_sdxl_checkpoints_name_the_problem(sdxl_files, tmp_path):
    from minidiff.convert import read_checkpoint

    sgm = sdxl_files.sgm
    # the refiner: bigG alone, as conditioner.embedders.0.model.*
    refiner = {k.replace("conditioner.embedders.1.model.", "conditioner.embedders.0.model."): v for k, v in sgm.items()
               if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(ValueError, match="the SDXL refiner .* is not supported.*conditioner.embedders.0.model"):
        read_checkpoint(fx.save_ldm(refiner, tmp_path / "refiner.safetensors"))
    no_proj = {k: v for k, v in sgm.items() if k != "conditioner.embedders.1.model.text_projection"}
    with pytest.raises(ValueError, match="conditioner.embedders.1.model.text_projection is missing"):
        read_checkpoint(fx.save_ldm(no_proj, tmp_path / "no_projection.safetensors"))
    wrong = dict(sgm)
    wrong["model.diffusion_model.label_emb.0.2.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"label_emb.0.2.bias \(7,\) -> add_embedding/linear_2/bias"):
        read_checkpoint(fx.save_ldm(wrong, tmp_path / "wrong_shape.safetensors"))
    with pytest.raises(ValueError, match="--config sd1 does not fit these weights.*an SDXL checkpoint"):
        read_checkpoint(sdxl_files.single, config="sd1")
    # SGM's denoiser keeps sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) as a buffer: checked when present
    ab = np.cumprod(1 - fx.sd_betas())
    with_sigmas = dict(sgm, **{"denoiser.sigmas": torch.from_numpy(np.sqrt((1 - ab) / ab).astype(np.float32))})
    notes = "\n".join(read_checkpoint(fx.save_ldm(with_sigmas, tmp_path / "sigmas.safetensors"))[1].notes)
    assert "schedule: 1 buffers (denoiser.sigmas" in notes
    ab = np.cumprod(1 - fx.sd_betas("linear"))
    with_sigmas["denoiser.sigmas"] = torch.from_numpy(np.sqrt((1 - ab) / ab).astype(np.float32))
    with pytest.raises(ValueError, match="noise schedule differs .* denoiser.sigmas is off"):
        read_checkpoint(fx.save_ldm(with_sigmas, tmp_path / "linear_sigmas.safetensors"))


@pytest.mark.slow
@pytest.mark.parity
def test_whole_image_matches_stable_diffusion_xl_pipeline(sdxl_files, sdxl_converted):
    """StableDiffusionXLPipeline (Euler, SDXL base's scheduler config) and minidiff's pipeline loaded from
    the diffusers folder: the same prompts, initial latents, guidance 5, 4 steps, 64 x 64: (a) no
    negative prompt (zero negative embeddings), (b) two prompts with negative prompts and
    micro-conditioning (original size, crop, target size), (c) other negative micro-conditioning.
    Images within 2/255 (max).  (c) has one prompt: for a batch, diffusers 0.42 tiles the (negative,
    positive) time_ids pair as [neg, pos, neg, pos, ...] against embeddings ordered [neg, neg, ..., pos,
    pos, ...], so distinct negative time_ids meet the wrong rows there; minidiff pairs them by row.)"""
    import jax

    from minidiff.pipeline import StableDiffusion

    m = sdxl_files
    ours = StableDiffusion.from_config(*sdxl_converted)
    assert ours.default_sampler == "euler" and ours.guidance_scale == 5.0
    ref = fx.sdxl_pipeline(m.unet, m.vae, m.text, m.text_2, m.root / "ref_tokenizers")
    ref.set_progress_bar_config(disable=True)
    cases = [
        (["a lighthouse at dusk"], {}, {}),
        (["a red bicycle", "an owl on a branch, oil painting"],
         dict(negative_prompt=["blurry", "low quality"]),
         dict(original_size=(128, 96), crops_coords_top_left=(8, 4), target_size=(64, 64))),
        (["an owl on a branch"], dict(negative_prompt=""),
         dict(negative_original_size=(32, 32), negative_crops_coords_top_left=(16, 0), negative_target_size=(64, 64))),
    ]
    for i, (prompts, negative, micro) in enumerate(cases):
        x_T = np.asarray(jax.random.normal(jax.random.key(i), (len(prompts), 8, 8, 4)), np.float32)
        got = ours(prompts, steps=4, height=64, width=64, latents=x_T, sampler="euler", **negative, **micro)
        with torch.no_grad():
            want = ref(prompts, num_inference_steps=4, guidance_scale=5.0, height=64, width=64, output_type="np",
                       latents=torch.from_numpy(np.array(x_T.transpose(0, 3, 1, 2))), **negative, **micro).images
        diff = np.abs(got.astype(float) - np.round(want * 255))
        print(f"SDXL pipeline case {i}: max |diff| {diff.max():.0f} / 255, mean {diff.mean():.3f}")
        assert got.shape == (len(prompts), 64, 64, 3) and diff.max() <= 2, (i, diff.max())
    # the micro-conditioning changes the picture (the added embedding is wired in)
    x_T = np.asarray(jax.random.normal(jax.random.key(0), (1, 8, 8, 4)), np.float32)
    plain = ours.sample_latents(["a lighthouse at dusk"], steps=2, height=64, width=64, latents=x_T, sampler="euler")
    cropped = ours.sample_latents(["a lighthouse at dusk"], steps=2, height=64, width=64, latents=x_T,
                                  sampler="euler", crops_coords_top_left=(256, 0))
    assert np.abs(plain - cropped).max() > 1e-3


@pytest.mark.parity
def test_full_size_sdxl_configs_are_read_off_the_layouts():
    """SDXL base 1.0 at full size on torch's meta device (shapes only, no memory): the diffusers
    config and the SGM single file's shapes give minidiff's SDXL configs."""
    from dataclasses import replace

    from minidiff.weights import (clip_text_config_from_transformers, clip_text_config_from_weights,
                                  clip_text_state_dict, openclip_text_state_dict, unet_config_from_diffusers,
                                  unet_config_from_ldm)

    with torch.device("meta"):
        unet, vae, text, text_2 = fx.build_sdxl_models(fx.SDXL, perturb=False)
    assert unet_config_from_diffusers(dict(unet.config)) == UNetConfig.sdxl()
    assert clip_text_config_from_transformers(text_2.config.to_dict() | {"architectures": ["CLIPTextModelWithProjection"]}
                                              ) == CLIPTextConfig.sdxl_g()
    sd = fx.sgm_state_dict(unet, vae, text, text_2)
    part = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}  # noqa: E731
    assert replace(unet_config_from_ldm(part("model.diffusion_model."), 64), sample_size=128) == UNetConfig.sdxl()
    assert clip_text_config_from_weights(clip_text_state_dict(part("conditioner.embedders.0.transformer.")),
                                         "quick_gelu") == CLIPTextConfig.sdxl_l()
    g = openclip_text_state_dict(part("conditioner.embedders.1.model."), keep_layers=32, projection=True)[0]
    assert g["text_projection.weight"].shape == (1280, 1280)
    assert replace(clip_text_config_from_weights(g, "gelu"), projection_dim=1280) == CLIPTextConfig.sdxl_g()


def test_micro_conditioning_is_checked():
    from minidiff.pipeline import load_pipeline, sdxl_time_ids

    np.testing.assert_array_equal(sdxl_time_ids(1024, 768), [1024, 768, 0, 0, 1024, 768])
    np.testing.assert_array_equal(sdxl_time_ids(64, 64, (512, 256), (8, 4), (32, 16)), [512, 256, 8, 4, 32, 16])
    with pytest.raises(ValueError, match="crops_coords_top_left must be two numbers"):
        sdxl_time_ids(64, 64, crops_coords_top_left=(1, 2, 3))
    with pytest.raises(ValueError, match="micro-conditioning is SDXL's"):
        load_pipeline().sample_latents("a red circle", original_size=(64, 64))
    with pytest.raises(ValueError, match="unexpected argument.* crop_size"):
        load_pipeline().sample_latents("a red circle", crop_size=(64, 64))


SDXL_SHARDING_SCRIPT = """
import json, sys
import jax, numpy as np
from minidiff.pipeline import load_pipeline
pipe = load_pipeline(sys.argv[1])
kw = dict(steps=2, seed=3, num_images_per_prompt=4, height=64, width=64, sampler="euler_a",  # noise in every step
          negative_prompt=["blurry", "dark"], original_size=(96, 96), crops_coords_top_left=(4, 0))
prompts = ["a lighthouse at dusk", "an owl on a branch"]
many = pipe.sample_latents(prompts, **kw)
pipe.devices = jax.devices()[:1]
one = pipe.sample_latents(prompts, **kw)
print(json.dumps(dict(devices=len(jax.devices()), err=float(np.abs(many - one).max() / np.abs(one).max()))))
"""


@pytest.mark.slow
@pytest.mark.parity
def test_sdxl_img2img_batches_bfloat16_and_eight_devices(sdxl_files, tmp_path):
    """SDXL through the same pipeline paths as SD 1.x / 2.x: img2img (strength -> the last
    round(strength x steps) rows; a strength that rounds to 0 steps returns the VAE's reconstruction),
    prompts x images per prompt with their negatives and micro-conditioning, bfloat16 close to float32,
    and a batch of 8 sharded over 8 forced CPU devices equal to one device's (latents within 1e-4)."""
    import json
    import os
    import subprocess
    import sys

    import jax

    from minidiff.cli import main
    from minidiff.convert import load_converted
    from minidiff.images import to_uint8
    from minidiff.nn.autoencoder import AutoencoderKL
    from minidiff.pipeline import load_pipeline

    model = tmp_path / "xl.safetensors"
    assert main(["convert", str(sdxl_files.folder), str(model)]) == 0
    pipe = load_pipeline(model)
    assert pipe.is_sdxl and load_converted(model)[1].text_encoder_2 is not None
    photo = (np.random.default_rng(0).uniform(0, 255, (64, 64, 3))).astype(np.uint8)
    kw = dict(steps=4, height=64, width=64, sampler="euler", seed=0)
    out = pipe(["a lighthouse at dusk"], init_image=photo, strength=0.5, original_size=(64, 64), **kw)
    assert out.shape == (1, 64, 64, 3) and len(pipe.last_timesteps) == 2  # round(0.5 x 4)
    with pytest.warns(UserWarning, match="rounds to 0 steps"):
        zero = pipe(["a lighthouse at dusk"], init_image=photo, strength=0.1, **kw)
    vae_cfg = pipe.vae_config
    x = jax.numpy.asarray(photo[None] / 127.5 - 1, jax.numpy.float32)
    recon = to_uint8(jax.jit(AutoencoderKL(vae_cfg).apply)({"params": pipe.params["vae"]}, x)[0])[0]
    assert np.abs(zero[0].astype(int) - recon).max() <= 1
    # batches: 2 prompts x 2 images, prompt-major, each with its negative
    x_T = np.asarray(jax.random.normal(jax.random.key(7), (4, 8, 8, 4)), np.float32)
    many = pipe(["a lighthouse at dusk", "an owl"], negative_prompt=["blurry", "dark"], num_images_per_prompt=2,
                latents=x_T, **kw)
    assert many.shape == (4, 64, 64, 3)
    single = pipe(["an owl"], negative_prompt=["dark"], num_images_per_prompt=2, latents=x_T[2:], **kw)
    assert np.abs(many[2:].astype(int) - single).max() <= 2
    # bfloat16 weights and compute (the VAE in float32): close to float32
    f32 = pipe.sample_latents(["a lighthouse at dusk"], **kw)
    bf16 = pipe.sample_latents(["a lighthouse at dusk"], dtype="bfloat16", **kw)
    rel = float(np.abs(bf16 - f32).max() / np.abs(f32).max())
    print(f"SDXL bfloat16 vs float32 latents: max difference {rel:.3f} of max |x0|")
    assert 0 < rel < 0.1
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SDXL_SHARDING_SCRIPT, str(model)], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"SDXL on 8 devices vs 1: {result}")
    assert result["devices"] == 8 and result["err"] < 1e-4, result
