"""The Stable Diffusion pipeline (minidiff.pipeline) and `minidiff txt2img`, on a tiny random model.

The tiny model: a 2-block UNet (16, 32 channels, cross-attention width 32), a 1-layer CLIP text
tower of width 32 (SD's vocabulary and 77 positions) and a 2-block VAE (f = 2: 16x16 images <->
8x8x4 latents), with random weights.  Every test uses the same architectures, batch sizes and
step counts where it can: the compiled programs are cached per architecture, so most tests reuse
programs an earlier test compiled (compiling is the slow part on a CPU).
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

jax = pytest.importorskip("jax")
jnp = jax.numpy
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402

from minidiff import pipeline as P  # noqa: E402
from minidiff.cli import main  # noqa: E402
from minidiff.convert import save_converted  # noqa: E402
from minidiff.diffusion import InferenceSchedule, ddim_step  # noqa: E402
from minidiff.images import to_uint8  # noqa: E402
from minidiff.nn.autoencoder import AutoencoderKL, AutoencoderKLConfig  # noqa: E402
from minidiff.nn.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from minidiff.nn.unet import UNet2DCondition, UNetConfig  # noqa: E402
from minidiff.pipeline import StableDiffusion  # noqa: E402
from minidiff.sampling import noise_keys  # noqa: E402
from minidiff.config import config_from_dict  # noqa: E402
from minidiff.sdconfig import StableDiffusionConfig  # noqa: E402

TEXT = CLIPTextConfig.toy(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
UNET = UNetConfig(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, attention=(True, True),
                  num_attention_heads=2, cross_attention_dim=32, norm_num_groups=8, attention_chunk_size=None)
# scaling_factor ~ 1 / std of this random VAE's latents (0.42), as SD's 0.18215 is for its VAE
VAE = AutoencoderKLConfig.toy(sample_size=16, block_out_channels=(16, 32), norm_num_groups=8, scaling_factor=2.5)
PROMPTS = ["a red circle above a blue square", "a green triangle"]
S = dict(steps=3)  # 16x16 images (the VAE's sample_size), 3 DDIM steps


def _templates():
    k = jax.random.key(0)
    shapes = lambda model, *a: jax.eval_shape(lambda: model.init(k, *a))["params"]  # noqa: E731
    return {"unet": shapes(UNet2DCondition(UNET), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32),
                           jnp.zeros((1, 77, 32))),
            "vae": shapes(AutoencoderKL(VAE), jnp.zeros((1, 16, 16, 3))),
            "text_encoder": shapes(CLIPTextModel(TEXT), jnp.zeros((1, 77), jnp.int32))}


def random_params(seed=0):
    """Random weights from the parameter shapes (fast: no flax init to compile)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in flatten_dict(_templates()).items():
        shape, name = leaf.shape, path[-1]
        if name == "kernel":
            w = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif name == "scale":
            w = 1 + 0.1 * rng.standard_normal(shape)
        elif name == "embedding":
            w = 0.5 * rng.standard_normal(shape)
        else:
            w = 0.05 * rng.standard_normal(shape)
        out[path] = w.astype(np.float32)
    return unflatten_dict(out)


def tiny_pipeline(**kw):
    return StableDiffusion(UNET, VAE, TEXT, random_params(), **kw)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


# --- basics ---------------------------------------------------------------------------------------


def test_images_shape_dtype_and_bit_identical_for_a_seed(pipe):
    a = pipe(PROMPTS, seed=0, **S)
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8
    assert a.std() > 10  # not a blank picture
    np.testing.assert_array_equal(pipe(PROMPTS, seed=0, **S), a)  # same seed and settings: the same bits
    assert (pipe(PROMPTS, seed=1, **S) != a).mean() > 0.5
    np.testing.assert_array_equal(pipe.last_timesteps, [667, 334, 1])  # SD's leading spacing, steps_offset 1


def test_new_prompt_seed_guidance_or_negative_prompt_reuse_the_compiled_loop(pipe):
    pipe(PROMPTS, seed=0, **S)  # compiled (here or by an earlier test)
    before = dict(P.TRACES)
    b = pipe(["a yellow star", "two blue circles"], seed=7, guidance_scale=3.0, negative_prompt="blurry", **S)
    c = pipe(PROMPTS, seed=8, guidance_scale=12.0, negative_prompt=["x", "y"], **S)
    assert dict(P.TRACES) == before, "a new prompt / seed / guidance scale must not trace (compile) again"
    assert (b != c).mean() > 0.5
    pipe(PROMPTS, seed=0, steps=2)  # one compiled step serves every number of steps
    assert dict(P.TRACES) == before
    pipe(PROMPTS, seed=0, steps=2, eta=0.123)  # another static choice (eta) is another program
    assert P.TRACES["denoise"] == before["denoise"] + 1


def test_the_progress_bar_counts_the_steps(pipe, capsys):
    pipe(PROMPTS, seed=0, progress=True, **S)
    err = capsys.readouterr().err
    assert "3/3" in err and "ddim txt2img" in err


def test_prompts_are_repeated_prompt_major(pipe):
    """num_images_per_prompt=2: rows (p0, p0, p1, p1); with the same x_T in every row, the two
    images of a prompt are the same (to float rounding) and the prompts differ."""
    x = np.repeat(np.asarray(jax.random.normal(jax.random.key(3), (1, 8, 8, 4))), 4, axis=0)
    lat = pipe.sample_latents(PROMPTS, num_images_per_prompt=2, latents=x, **S)
    tol = 1e-5 * np.abs(lat).max()  # rows of one batch may round differently (CPU vector lanes)
    assert np.abs(lat[0] - lat[1]).max() <= tol and np.abs(lat[2] - lat[3]).max() <= tol
    assert np.abs(lat[1] - lat[2]).max() > 1e-2
    images = pipe(PROMPTS, num_images_per_prompt=2, seed=0, **S)  # and from a seed: 4 different pictures
    assert images.shape == (4, 16, 16, 3) and (images[0] != images[1]).mean() > 0.5


def test_a_request_drawn_in_pieces_from_initial_noise_gives_the_pictures_of_one_call(pipe):
    """``initial_noise`` is the x_T a call draws from its seed, so pieces of a request with their rows of
    it as ``latents`` give the same pictures: what ``finetune.draw_in_pieces`` relies on."""
    from minidiff.train.finetune import draw_in_pieces

    prompts = ["a red circle", "a blue square", "a green star", "two circles", "a yellow moon"]
    whole = pipe.sample_latents(prompts, seed=5, **S)
    x_T = pipe.initial_noise(len(prompts), seed=5)
    assert x_T.shape == whole.shape
    pieces = np.concatenate([pipe.sample_latents(prompts[i:i + 2], seed=5, latents=x_T[i:i + 2], **S)
                             for i in range(0, 5, 2)])
    np.testing.assert_allclose(pieces, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    drawn = draw_in_pieces(pipe, prompts, S["steps"], 7.5, 5, batch=3).astype(int)
    assert np.abs(drawn - pipe(prompts, seed=5, guidance_scale=7.5, **S)).max() <= 1  # float rounding: one level


# --- classifier-free guidance ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def manual(pipe):
    """The chain computed by hand: NumPy float64 DDIM steps around separate (unbatched) UNet calls."""
    unet = jax.jit(UNet2DCondition(UNET).apply)
    params = {"params": pipe.params["unet"]}
    ctx = {p: np.asarray(pipe.encode_text([p] * 2)) for p in ("", "blurry", *PROMPTS)}

    def run(seed, guidance, negative=""):
        isc = InferenceSchedule.stable_diffusion(3)
        key_T, _ = noise_keys(jax.random.key(seed), 3)
        x = np.asarray(jax.random.normal(key_T, (2, 8, 8, 4)), np.float64)
        cond = np.stack([ctx[PROMPTS[0]][0], ctx[PROMPTS[1]][0]])
        for t, ab_t, ab_prev in zip(isc.timesteps, isc.alpha_bar_t, isc.alpha_bar_prev):
            ts = np.full((2,), t, np.int32)
            eps_c = np.asarray(unet(params, x.astype(np.float32), ts, cond), np.float64)
            eps_u = np.asarray(unet(params, x.astype(np.float32), ts, ctx[negative]), np.float64)
            eps = eps_u + guidance * (eps_c - eps_u)
            x, _ = ddim_step(x, eps, ab_t, ab_prev)
        return x

    return run


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_guided_chain_equals_the_hand_computed_one(pipe, manual, guidance):
    got = pipe.sample_latents(PROMPTS, guidance_scale=guidance, seed=4, **S)
    want = manual(4, guidance)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"guidance {guidance}: max error relative to max |x0| {err:.1e}")
    assert err < 1e-4


def test_guidance_one_is_conditional_only_sampling(pipe):
    """s = 1: eps_u + (eps_c - eps_u) = eps_c whatever the unconditional branch; exactly so when the
    negative prompt is the prompt itself (eps_u = eps_c)."""
    cond_only = pipe.sample_latents(PROMPTS, negative_prompt=PROMPTS, seed=2, guidance_scale=1.0, **S)
    np.testing.assert_array_equal(pipe.sample_latents(PROMPTS, negative_prompt=PROMPTS, seed=2, guidance_scale=9.0,
                                                      **S), cond_only)
    for negative in (None, "blurry"):
        got = pipe.sample_latents(PROMPTS, negative_prompt=negative, seed=2, guidance_scale=1.0, **S)
        np.testing.assert_allclose(got, cond_only, atol=1e-4 * np.abs(cond_only).max())


def test_negative_prompt_replaces_the_unconditional_branch(pipe, manual):
    plain = pipe.sample_latents(PROMPTS, seed=4, guidance_scale=7.5, **S)
    negative = pipe.sample_latents(PROMPTS, negative_prompt="blurry", seed=4, guidance_scale=7.5, **S)
    assert np.abs(plain - negative).max() > 1e-2
    want = manual(4, 7.5, negative="blurry")
    assert np.abs(negative - want).max() / np.abs(want).max() < 1e-4


# --- img2img ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo():
    """A smooth 16x16 test picture, uint8."""
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    return (np.stack([xx, yy, 1 - xx * yy], -1) * 255).round().astype(np.uint8)


def test_encode_text_and_encode_images(pipe, photo):
    """encode_text: CLIP's last states of the tokenized prompts; encode_images: the VAE posterior's
    mean times the scaling factor, of the pixels in [-1, 1]."""
    ids = pipe.tokenize(PROMPTS)
    want = CLIPTextModel(TEXT).apply({"params": pipe.params["text_encoder"]}, ids).last_hidden_state
    got = pipe.encode_text(PROMPTS)
    assert got.shape == (2, 77, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    vae = AutoencoderKL(VAE)
    pixels = photo[None].astype(np.float32) / 127.5 - 1
    mean = vae.apply({"params": pipe.params["vae"]}, pixels, method=AutoencoderKL.encode).mean
    got = pipe.encode_images(photo[None])
    assert got.shape == (1, 8, 8, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, mean * VAE.scaling_factor, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"H and W multiples of 2 for this model, got \(1, 15, 16, 3\)"):
        pipe.encode_images(photo[None, :15])


def test_img2img_runs_round_strength_times_steps(pipe, photo):
    out = pipe(PROMPTS, init_image=photo, strength=0.6, seed=0, **S)  # round(0.6 * 3) = 2 steps
    assert out.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(pipe.last_timesteps, [334, 1])
    pipe(PROMPTS, init_image=photo, strength=1.0, seed=0, **S)
    np.testing.assert_array_equal(pipe.last_timesteps, [667, 334, 1])


def test_img2img_with_small_strength_returns_about_the_vae_reconstruction(pipe, photo):
    x = jnp.asarray(photo[None] / 127.5 - 1, jnp.float32)
    recon = to_uint8(jax.jit(AutoencoderKL(VAE).apply)({"params": pipe.params["vae"]}, x)[0])[0]  # decode(mean)
    with pytest.warns(UserWarning, match="rounds to 0 steps"):
        zero = pipe(PROMPTS, init_image=photo, strength=0.1, seed=0, **S)  # round(0.3) = 0 steps
    assert np.abs(zero[0].astype(int) - recon).max() <= 1  # (x 0.18215 / 0.18215: a rounding apart)
    one = pipe(PROMPTS, init_image=photo, strength=0.34, seed=0, **S)  # 1 step, from t = 1
    np.testing.assert_array_equal(pipe.last_timesteps, [1])
    full = pipe(PROMPTS, init_image=photo, strength=1.0, seed=0, **S)  # all 3 steps, from t = 667
    d_one, d_full = (np.abs(x[0].astype(int) - recon).mean() for x in (one, full))
    print(f"mean |pixel - reconstruction|: 1 step {d_one:.1f}, 3 steps {d_full:.1f}")
    assert d_one < 8 and d_one < d_full / 4


# --- samplers, precision ---------------------------------------------------------------------------


def test_ddpm_sampler_is_reproducible_and_differs_from_ddim(pipe):
    a = pipe(PROMPTS, sampler="ddpm", seed=0, **S)
    np.testing.assert_array_equal(pipe(PROMPTS, sampler="ddpm", seed=0, **S), a)
    assert (a != pipe(PROMPTS, seed=0, **S)).mean() > 0.3


@pytest.mark.slow
def test_bfloat16_runs_and_is_close_to_float32(pipe):
    f32 = pipe(PROMPTS, seed=0, **S)
    b16 = pipe(PROMPTS, seed=0, dtype="bfloat16", **S)
    leaves = jax.tree.leaves(pipe._place("bfloat16"))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in leaves)
    diff = np.abs(b16.astype(int) - f32)
    print(f"bfloat16 vs float32 pixels: mean |diff| {diff.mean():.2f}, max {diff.max()}")
    assert diff.mean() < 6 and np.mean(diff > 32) < 0.02


# --- errors ----------------------------------------------------------------------------------------


def test_bad_arguments_are_clear_errors(pipe, photo):
    cases = [
        (dict(height=18), "multiple of 4"),
        (dict(steps=0), "steps must be an integer"),
        (dict(sampler="euler b"), "unknown sampler"),
        (dict(sampler="ddim", sigmas="karras"), "takes no 'karras' sigmas"),
        (dict(dtype="float16"), "unknown dtype"),
        (dict(init_image=photo, strength=0.0), r"strength must lie in \(0, 1\]"),
        (dict(init_image=photo, strength=1.5), r"strength must lie in \(0, 1\]"),
        (dict(init_image=photo, height=32, width=32), "init image is 16x16"),
        (dict(negative_prompt=["a", "b", "c"]), "one per prompt"),
        (dict(latents=np.zeros((1, 8, 8, 4))), "latents must have the shape"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe.sample_latents(PROMPTS, **kwargs)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        StableDiffusion(UNET, VAE, CLIPTextConfig.toy(), pipe.params)


# --- several devices -------------------------------------------------------------------------------

SHARDING_SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
import minidiff.pipeline as P
from test_pipeline import PROMPTS, tiny_pipeline

devices_used = []
compiled = P._denoise_fn
def spy(*args, **kwargs):
    out = compiled(*args, **kwargs)
    devices_used.append(len(out[0].sharding.device_set))
    return out
P._denoise_fn = spy

pipe = tiny_pipeline()
kw = dict(steps=3, seed=5, num_images_per_prompt=4, sampler={sampler!r})   # 8 images, noise in every step
many = pipe.sample_latents(PROMPTS, **kw)
images_many = pipe.decode(many)
pipe.devices = jax.devices()[:1]
one = pipe.sample_latents(PROMPTS, **kw)
images_one = pipe.decode(one)
print(json.dumps(dict(devices=len(jax.devices()), used=devices_used,
                      latent_err=float(np.abs(many - one).max() / np.abs(one).max()),
                      pixel_err=int(np.abs(images_many.astype(int) - images_one).max()))))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddpm", "DPM++ 2M SDE Karras"])
def test_eight_devices_give_the_images_of_one(sampler):
    """The batch of 8 sharded over 8 forced CPU devices (params replicated) against one device, DDPM
    and SDE-DPM-Solver++ (noise drawn inside every step; the latter with a multistep state).  Not bit-identical: a shard computes 1 row where one device
    computes 8, and XLA's CPU kernels may round a row differently with another batch size (as two
    rows of one batch can differ, see test_prompts_are_repeated_prompt_major).  Tolerance: latents
    within 1e-4 of max |x0| (measured ~1e-5), pixels within 1 / 255."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = SHARDING_SCRIPT.format(tests=str(Path(__file__).parent), sampler=sampler)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(result)
    assert result["devices"] == 8 and result["used"] == [8] * 3 + [1] * 3  # 3 steps on 8 devices, then on 1
    assert result["latent_err"] <= 1e-4 and result["pixel_err"] <= 1


# --- the command -----------------------------------------------------------------------------------


def _one_line_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    return err


def test_cli_bad_input_is_a_one_line_error(tmp_path, capsys, photo):
    Image.fromarray(photo).save(tmp_path / "in.png")
    (tmp_path / "bad.png").write_text("not a png")
    run = ["txt2img", "a red circle", "-o", str(tmp_path / "out.png"), "--no-progress"]
    _one_line_error(capsys, run + ["--model", str(tmp_path / "nope.safetensors")], "--model")
    _one_line_error(capsys, run + ["--height", "100"], "--height must be a multiple of 8")
    _one_line_error(capsys, run + ["--steps", "0"], "argument --steps: 0 must be at least 1")
    _one_line_error(capsys, run + ["--init-image", str(tmp_path / "bad.png")], "cannot read")
    _one_line_error(capsys, run + ["--init-image", str(tmp_path / "missing.png")], "no such file")
    _one_line_error(capsys, run + ["--init-image", str(tmp_path / "in.png"), "--strength", "1.5"], "(0, 1]")
    _one_line_error(capsys, run + ["--init-image", str(tmp_path / "in.png"), "--strength", "0"], "--strength must lie in (0, 1]")
    _one_line_error(capsys, run + ["--strength", "0.5"], "give an --init-image")
    assert not (tmp_path / "out.png").exists()


def test_cli_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minidiff.cli", "txt2img", "x", "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert "--model" in r.stderr and "no such file or folder" in r.stderr


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny model written as a converted minidiff file (convert.save_converted)."""
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_converted(random_params(), StableDiffusionConfig(family="sd1", unet=UNET, vae=VAE, text_encoder=TEXT), path)
    return path


def test_the_weights_exist_once_a_converted_file_is_used_in_place(converted):
    """A converted file is memory-mapped; its tensors start at multiples of 64 bytes, so the CPU
    device takes them without a copy, and the pipeline keeps no host tree beside the placed one."""
    import jax

    pipe = P.load_pipeline(converted)
    host = jax.tree.leaves(pipe.params)
    addresses = [a.ctypes.data for a in host]
    whole = [i for i, a in enumerate(host) if a.nbytes % 64 == 0]  # the writer aligns these
    assert len(whole) > len(host) / 2 and all(addresses[i] % 64 == 0 for i in whole)
    pipe(PROMPTS, seed=0, **S)
    placed = jax.tree.leaves(pipe.params)
    assert all(isinstance(a, jax.Array) for a in placed)  # the host arrays were replaced, not kept beside
    copied = [i for i in whole if placed[i].unsafe_buffer_pointer() != addresses[i]]
    assert not copied, f"{len(copied)} of {len(whole)} aligned tensors were copied"
    placed_tree = pipe._place("float32")
    assert all(a is b for a, b in zip(jax.tree.leaves(placed_tree), placed))  # one tree, not two


def test_bfloat16_keeps_the_float32_host_weights(pipe):
    """Placing in a less precise dtype must not replace the weights a later float32 call needs."""
    import jax

    a = pipe(PROMPTS, seed=0, **S)
    pipe(PROMPTS, seed=0, dtype="bfloat16", **S)
    assert {str(x.dtype) for x in jax.tree.leaves(pipe.params)} == {"float32"}
    np.testing.assert_array_equal(pipe(PROMPTS, seed=0, **S), a)


def test_config_from_dict_builds_nested_configs_and_names_unknown_fields(converted, tmp_path):
    config = StableDiffusionConfig(family="sd1", unet=UNET, vae=VAE, text_encoder=TEXT)
    d = json.loads(json.dumps(config.to_dict()))  # as read from a file: tuples are lists
    assert config_from_dict(StableDiffusionConfig, d) == config
    assert config_from_dict(StableDiffusionConfig, config) is config
    with pytest.raises(ValueError, match=r"the model unet config has unknown field\(s\) heads, width; "
                                         r"UNetConfig takes sample_size, in_channels, "):
        config_from_dict(StableDiffusionConfig, {**d, "unet": {**d["unet"], "width": 1, "heads": 2}}, "model")
    with pytest.raises(ValueError, match=r"StableDiffusionConfig lacks the field\(s\) family, text_encoder"):
        config_from_dict(StableDiffusionConfig, {"unet": d["unet"], "vae": d["vae"]})
    # a converted model whose config holds a field minidiff does not know is an error naming it
    from safetensors.numpy import load_file, save_file

    save_file(load_file(str(converted)), str(tmp_path / "m.safetensors"),
              metadata={"format": "minidiff-sd-v1", "config": json.dumps({**d, "vae": {**d["vae"], "colour": "red"}})})
    with pytest.raises(ValueError, match=r"vae config has unknown field\(s\) colour"):
        P.load_pipeline(tmp_path / "m.safetensors")


def test_cli_writes_a_png_with_its_settings(converted, tmp_path, capsys, pipe):
    out = tmp_path / "out.png"
    argv = ["txt2img", "a red circle above a blue square", "--model", str(converted), "--steps", "3",
            "--guidance", "5", "--seed", "3", "--negative", "blurry", "--n", "2", "-o", str(out)]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as im:
        meta = dict(im.text)
        pixels = np.asarray(im.convert("RGB"))
    assert meta["prompt"] == "a red circle above a blue square" and meta["negative_prompt"] == "blurry"
    # a Stable Diffusion checkpoint's default sampler: DPM++ 2M Karras
    assert (meta["seed"], meta["steps"], meta["guidance_scale"], meta["sampler"], meta["sigmas"]) == \
        ("3", "3", "5.0", "dpmpp_2m", "karras")
    assert (meta["height"], meta["width"], meta["n"]) == ("16", "16", "2") and meta["model"] == str(converted)
    # the same images as the pipeline (same weights: random_params()), tiled in a grid
    want = pipe(["a red circle above a blue square"], negative_prompt="blurry", steps=3, guidance_scale=5.0,
                seed=3, num_images_per_prompt=2, sampler="DPM++ 2M Karras")
    np.testing.assert_array_equal(pixels[1:17, 1:17], want[0])
    np.testing.assert_array_equal(pixels[1:17, 18:34], want[1])


def test_cli_img2img(converted, tmp_path, capsys, photo):
    Image.fromarray(photo).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    argv = ["txt2img", "a green triangle", "--model", str(converted), "--steps", "3", "--init-image",
            str(tmp_path / "in.png"), "--strength", "0.6", "--n", "2", "-o", str(out), "--no-progress"]
    assert main(argv) == 0
    with Image.open(out) as im:
        assert im.text["strength"] == "0.6" and im.text["init_image"] == str(tmp_path / "in.png")


# --- parity with diffusers -------------------------------------------------------------------------


def _reference_sd():
    """Tiny random SD models built by diffusers / transformers, and minidiff's pipeline on their weights."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from minidiff.weights import clip_text_state_dict, torch_to_flax, vae_from_torch

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4,
                                  sample_size=16, scaling_factor=VAE.scaling_factor).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=49407)).eval()
    with torch.no_grad():  # nothing constant: perturb norms and biases
        for model in (unet, vae, text):
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
    sd = lambda m: {k: v.numpy() for k, v in m.state_dict().items()}  # noqa: E731
    templates = _templates()
    params = {"unet": torch_to_flax(sd(unet), templates["unet"], "UNet"),
              "vae": vae_from_torch(sd(vae), templates["vae"]),
              "text_encoder": torch_to_flax(clip_text_state_dict(sd(text)), templates["text_encoder"], "CLIP")}
    ours = StableDiffusion(UNET, VAE, TEXT, params)

    return unet, vae, text, ours


@pytest.mark.parity
@pytest.mark.slow
def test_ddim_cfg_loop_matches_diffusers_stable_diffusion_pipeline(tmp_path):
    """diffusers' StableDiffusionPipeline (DDIMScheduler with SD's settings) and minidiff on the same
    tiny random models (weights copied with minidiff.weights), the same text ids and the same initial
    latents: latents within 2e-5 relative, pixels within 1 / 255."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    unet, vae, text, ours = _reference_sd()
    x_T = np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 8, 4)), np.float32)
    kw = dict(steps=3, guidance_scale=7.5)
    got = ours.sample_latents(PROMPTS, latents=x_T, **kw)
    got_pixels = ours.decode(got)

    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    ref = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=scheduler,
                                            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():  # the same token ids through transformers' text tower
        embeds = text(torch.from_numpy(ours.tokenize(PROMPTS)).long())[0]
        negative = text(torch.from_numpy(ours.tokenize(["", ""])).long())[0]
        common = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=3,
                      guidance_scale=7.5, height=16, width=16, latents=torch.from_numpy(np.array(x_T.transpose(0, 3, 1, 2))))
        want = ref(output_type="latent", **common).images.numpy().transpose(0, 2, 3, 1)
        want_pixels = ref(output_type="np", **common).images
    err = np.abs(got - want).max() / np.abs(want).max()
    pixel_err = np.abs(got_pixels.astype(int) - np.round(want_pixels * 255)).max()
    print(f"latents: max error relative to max |x0| {err:.1e}; pixels: max {pixel_err} / 255")
    assert err < 2e-5 and pixel_err <= 1  # measured: 1.6e-6 and 0

    # the same models saved as a diffusers folder load into the same pipeline (converted on the fly)
    for name, part in (("unet", unet), ("vae", vae), ("text_encoder", text), ("scheduler", scheduler)):
        part.save_pretrained(tmp_path / name)
    loaded = P.load_pipeline(tmp_path)
    assert loaded.scheduler == P.SchedulerConfig() and loaded.name == str(tmp_path)
    assert loaded.default_sampler == "ddim"  # the sampler the folder's scheduler config names
    assert loaded.text_config == TEXT  # (the converter picks its own attention chunk sizes: a memory setting)
    assert replace(loaded.unet_config, attention_chunk_size=None) == UNET
    assert replace(loaded.vae_config, attention_chunk_size=None) == VAE
    flat_ours, flat_loaded = flatten_dict(ours.params), flatten_dict(loaded.params)
    assert flat_ours.keys() == flat_loaded.keys()
    assert all(np.array_equal(flat_ours[k], flat_loaded[k]) for k in flat_ours)


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("name", ["DPM++ 2M Karras", "Euler a"])
def test_the_samplers_users_name_match_diffusers_stable_diffusion_pipeline(name, monkeypatch):
    """diffusers' StableDiffusionPipeline with DPMSolverMultistepScheduler (dpmsolver++, Karras) or
    EulerAncestralDiscreteScheduler and minidiff on the same tiny random models, the same initial
    latents and (Euler a) the same per-step noise: images within 2/255 mean absolute difference."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from minidiff.sampling import noise_keys

    unet, vae, text, ours = _reference_sd()
    x_T = np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 8, 4)), np.float32)
    steps = 6
    got_latents = ours.sample_latents(PROMPTS, latents=x_T, steps=steps, guidance_scale=7.5, sampler=name, seed=5)
    got = ours.decode(got_latents)
    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
              timestep_spacing="leading")
    if name == "Euler a":
        scheduler = diffusers.EulerAncestralDiscreteScheduler(**sd)
        _, keys = noise_keys(jax.random.key(5), steps)  # the noise minidiff drew at each step
        noises = [torch.from_numpy(np.array(jax.random.normal(k, x_T.shape, jnp.float32)).transpose(0, 3, 1, 2))
                  for k in keys]
        module = sys.modules[type(scheduler).__module__]
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: noises.pop(0))
    else:
        scheduler = diffusers.DPMSolverMultistepScheduler(**sd, algorithm_type="dpmsolver++", solver_order=2,
                                                          use_karras_sigmas=True)
    ref = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=scheduler,
                                            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        embeds = text(torch.from_numpy(ours.tokenize(PROMPTS)).long())[0]
        negative = text(torch.from_numpy(ours.tokenize(["", ""])).long())[0]
        want = ref(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=steps, guidance_scale=7.5,
                   height=16, width=16, latents=torch.from_numpy(np.array(x_T.transpose(0, 3, 1, 2))),
                   output_type="np").images
    if name == "Euler a":
        assert noises == [], "diffusers drew another number of noises than minidiff"
    diff = np.abs(got.astype(float) - np.round(want * 255))
    print(f"{name}: mean |diff| {diff.mean():.3f} / 255, max {diff.max():.0f}")
    assert diff.mean() <= 2
