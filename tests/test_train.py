"""Training: exact resume from a checkpoint, atomic checkpoints, the loss, and the train/sample commands."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
from minidiff.cli import main  # noqa: E402
from minidiff import files  # noqa: E402
from minidiff.train import checkpoint  # noqa: E402
from minidiff.train.diffusion import Batches, Trainer, TrainConfig, load_denoiser, read_history  # noqa: E402

TINY_MLP = {"hidden": 32, "num_blocks": 2, "time_embed_dim": 16}


def tiny(data="moons", **kw):
    return TrainConfig.create(data, batch=64, steps=8, warmup=2, log_every=2, model_kwargs=TINY_MLP, **kw)


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kw", [{}, {"data": "gmm", "cond": "class", "cond_drop": 0.2, "prediction": "v_prediction"}])
def test_stop_and_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, kw):
    cfg = tiny(**kw)
    whole = Trainer(cfg)
    whole.train(progress=False)

    first = Trainer(cfg, tmp_path)
    first.train(until=3, progress=False)  # saves at the end: as if killed right after step 3's checkpoint
    del first
    resumed = Trainer.resume(tmp_path)  # a new Trainer, rebuilt from the file alone
    assert resumed.step == 3
    resumed.train(progress=False)

    assert resumed.step == whole.step == 8
    for part in ("params", "ema_params", "opt_state", "step", "key"):
        assert_trees_equal(resumed.state[part], whole.state[part])
    assert resumed.history["loss"] == whole.history["loss"][:1] + resumed.history["loss"][1:]


def test_a_run_killed_at_any_moment_resumes_exactly(tmp_path):
    """`minidiff train` is killed (SIGKILL) right after its first checkpoints, then resumed with --resume
    in this process: the result equals an uninterrupted run."""
    import time

    args = ["train", "--data", "moons", "--batch", "64", "--steps", "600", "--warmup", "2", "--no-progress",
            "--model-kwargs", json.dumps(TINY_MLP)]
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "minidiff.cli", *args, "--out", str(run), "--checkpoint-every", "3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    deadline = time.monotonic() + 300
    while not (run / checkpoint.CHECKPOINT).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    killed_at = int(checkpoint.load_checkpoint(run)[0]["step"])
    assert 0 < killed_at < 600, proc.stderr.read()

    assert main([*args, "--out", str(run), "--resume"]) == 0
    whole = Trainer(TrainConfig.from_dict(checkpoint.load_checkpoint(run)[1]))
    whole.train(progress=False)
    resumed, _, _ = checkpoint.load_checkpoint(run, target=whole.state)
    assert int(resumed["step"]) == 600
    assert_trees_equal(resumed, whole.state)


def test_the_data_order_is_a_function_of_seed_and_step():
    b = Batches(tiny())
    np.testing.assert_array_equal(b(5)[0], Batches(tiny())(5)[0])
    assert not np.array_equal(b(5)[0], b(6)[0])
    assert not np.array_equal(b(5)[0], Batches(tiny(seed=1))(5)[0])


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    t = Trainer(tiny(), tmp_path)
    t.train(until=2, progress=False)
    before = (tmp_path / checkpoint.CHECKPOINT).read_bytes()
    t.train(until=4, progress=False)

    def crash(*a):
        raise KeyboardInterrupt  # the process dies between writing the temporary file and renaming it

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        t.save()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.msgpack", "config.json"]  # no temporary left
    assert (tmp_path / checkpoint.CHECKPOINT).read_bytes() != before  # the step-4 checkpoint, whole
    assert Trainer.resume(tmp_path).step == 4


def test_training_lowers_the_loss_and_the_samples_approach_the_data(tmp_path):
    cfg = TrainConfig.create("gmm", batch=256, steps=500, lr=3e-3, log_every=100,
                             model_kwargs={"hidden": 64, "num_blocks": 2})
    Trainer(cfg, tmp_path).train(progress=False)
    loss = read_history(tmp_path)["loss"]
    assert loss[-1] < 0.5 * loss[0], loss
    x = load_denoiser(tmp_path).sample(2000, seed=0, steps=50)
    assert x.shape == (2000, 2) and np.all(np.isfinite(x))
    # quantiles rather than moments: a briefly trained model throws a few far outliers
    q = [10, 25, 50, 75, 90]
    data = Batches(cfg)(123, 2000)[0]  # the mixture's std is ~1.4 per axis
    np.testing.assert_allclose(np.percentile(x, q, axis=0), np.percentile(data, q, axis=0), atol=0.4)


def test_bad_configs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data"):
        TrainConfig.create("cifar")
    with pytest.raises(ValueError, match="steps must be positive"):
        TrainConfig.create("moons", steps=0)
    with pytest.raises(ValueError, match="labelled data"):
        TrainConfig.create("moons", cond="class")
    with pytest.raises(ValueError, match="no checkpoint"):
        Trainer.resume(tmp_path)
    (tmp_path / "checkpoint.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a minidiff checkpoint"):
        load_denoiser(tmp_path)


def test_sample_command_writes_a_scatter_plot_with_its_settings(tmp_path, capsys):
    from PIL import Image

    Trainer(tiny(), tmp_path / "run").train(progress=False)
    out = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--sampler", "ddpm", "--steps", "20", "--seed", "3",
                 "--n", "500", "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size[0] > 200
        assert im.text["sampler"] == "ddpm" and im.text["steps"] == "20" and im.text["seed"] == "3"
        assert im.text["checkpoint"] == str(tmp_path / "run") and im.text["training_step"] == "8"
    # bad input: one line on stderr, exit status 2
    assert main(["sample", "--checkpoint", str(tmp_path / "nope"), "-o", str(out)]) == 2
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--steps", "0", "-o", str(out)]) == 2
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--class-label", "1", "-o", str(out)]) == 2
    assert main(["train", "--data", "moons", "--out", str(tmp_path / "run"), "--steps", "9"]) == 2  # exists: --resume?
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(e.startswith("minidiff ") for e in err), err
    assert "no checkpoint found" in err[0] and "steps must be a positive" in err[1] and "--resume" in err[3]


def test_patches_fold_into_channels_and_back():
    from minidiff.nn.denoisers import depth_to_space, space_to_depth

    x = np.random.default_rng(0).standard_normal((2, 8, 12, 3))
    y = space_to_depth(x, 2)
    assert y.shape == (2, 4, 6, 12)
    np.testing.assert_array_equal(y[1, 2, 3].reshape(2, 2, 3), x[1, 4:6, 6:8])  # one position = one 2x2 patch
    np.testing.assert_array_equal(depth_to_space(y, 2), x)


@pytest.mark.slow
def test_class_conditional_unet_on_shapes_trains_resumes_and_samples(tmp_path):
    from PIL import Image

    unet = {"block_out_channels": [8, 8], "attention": [False, True], "num_attention_heads": 2, "norm_num_groups": 4}
    cfg = TrainConfig.create("shapes", cond="class", batch=4, steps=2, warmup=1, model_kwargs=unet, prediction="v_prediction",
                             patch_size=2, cond_drop=0.5)
    t = Trainer(cfg, tmp_path / "run")
    t.train(until=1, progress=False)
    t2 = Trainer.resume(tmp_path / "run")
    t2.train(progress=False)
    assert np.isfinite(t2.history["loss"]).all()
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--steps", "2", "--class-label", "red circle",
                 "--n", "3", "--guidance", "2", "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (2 * 33 + 1, 2 * 33 + 1)  # 3 images in a ceil(sqrt(3)) = 2-column grid
        assert im.text["class_label"] == "0" and im.text["sampler"] == "ddim" and im.text["guidance_scale"] == "2.0"


def test_a_run_shorter_than_its_warmup_still_trains():
    """steps < warmup used to fail inside optax (negative decay_steps); the warmup is capped instead."""
    cfg = TrainConfig.create("moons", steps=3, warmup=200, batch=16)
    history = Trainer(cfg).train(progress=False)
    assert len(history["loss"]) == 1 and np.isfinite(history["loss"][0])


def test_latent_runs_diffuse_the_built_in_vae_latents_and_sample_pictures():
    from minidiff.pipeline import MINI_MODEL

    if not MINI_MODEL.is_file():
        pytest.skip("no built-in model in this checkout")
    cfg = TrainConfig.create("shapes", cond="class", latent=True, steps=2, batch=4,
                             model_kwargs={"block_out_channels": [16, 32], "attention": [False, True]})
    x0, y = Batches(cfg)(0)
    assert x0.shape == (4, 8, 8, 4) and abs(float(x0.std()) - 1) < 0.5  # whitened latents, not pixels
    trainer = Trainer(cfg)
    trainer.train(progress=False)
    images = trainer.denoiser.sample(3, steps=2, params=trainer.state["params"])
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    with pytest.raises(ValueError, match="latent=True"):
        TrainConfig.create("moons", latent=True)


def test_class_tokens_read_the_class_as_a_shape_word_and_a_colour_word():
    """class_conditioning="tokens": class c = shape * n_colours + colour gives the context
    [E_shape[shape], E_colour[colour]]; the "no class" label reads the extra row of both tables."""
    from minidiff.train.diffusion import build_model

    unet = {"block_out_channels": [8, 8], "attention": [False, True], "num_attention_heads": 2, "norm_num_groups": 4,
            "cross_attention_dim": 16}
    cfg = TrainConfig.create("shapes", cond="class", class_conditioning="tokens", batch=4, steps=2, model_kwargs=unet)
    model = build_model(cfg)
    ds = cfg.dataset()
    n_s, n_c = len(ds.shapes), len(ds.colors)
    labels = np.array([0, ds.class_index({"shape": 2, "color": 1}), cfg.num_classes], np.int32)
    x = np.zeros((3, 32, 32, 3), np.float32)
    params = model.init(jax.random.PRNGKey(0), x, np.zeros(3, np.int32), class_labels=labels)["params"]
    assert params["shape_tokens"]["embedding"].shape == (n_s + 1, 16)
    assert params["color_tokens"]["embedding"].shape == (n_c + 1, 16)
    assert "class_embedding" not in params["inner"] and "attn2" in str(jax.tree_util.tree_structure(params["inner"]))

    seen = {}
    def capture(module, x, t, context=None, train=False):  # noqa: E306
        seen["context"] = np.asarray(context)
        return x
    from minidiff.nn.unet import UNet2DCondition
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(UNet2DCondition, "__call__", capture)
        model.apply({"params": params}, x, np.zeros(3, np.int32), class_labels=labels)
    E_s, E_c = np.asarray(params["shape_tokens"]["embedding"]), np.asarray(params["color_tokens"]["embedding"])
    np.testing.assert_array_equal(seen["context"][:, 0], E_s[[0, 2, n_s]])
    np.testing.assert_array_equal(seen["context"][:, 1], E_c[[0, 1, n_c]])
    with pytest.raises(ValueError, match="class_conditioning"):
        TrainConfig.create("moons", cond="none", class_conditioning="tokens")


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_diffusion_loss_is_the_mean_squared_error_against_the_target(prediction):
    """With a network that outputs x_t itself, the loss is mean_i mean((x_t - target)^2), recomputed
    here from the same draws of t and eps (eps-, v- or x0-prediction; Min-SNR)."""
    import jax.numpy as jnp

    from minidiff.diffusion import NoiseSchedule
    from minidiff.train.diffusion import diffusion_loss

    ab_table = jnp.asarray(NoiseSchedule.from_name("linear", 1000).alpha_bar, jnp.float32)
    x0 = jnp.asarray(np.random.default_rng(0).standard_normal((6, 4, 4, 3)), jnp.float32)
    key = jax.random.PRNGKey(1)
    k_t, k_eps = jax.random.split(key)
    t = np.asarray(jax.random.randint(k_t, (6,), 0, 1000))
    eps = np.asarray(jax.random.normal(k_eps, x0.shape))
    ab = np.asarray(ab_table)[t][:, None, None, None]
    x_t = np.sqrt(ab) * np.asarray(x0) + np.sqrt(1 - ab) * eps
    target = {"epsilon": eps, "v_prediction": np.sqrt(ab) * eps - np.sqrt(1 - ab) * np.asarray(x0),
              "sample": np.asarray(x0)}[prediction]
    per = ((x_t - target) ** 2).reshape(6, -1).mean(1)
    got = diffusion_loss(lambda x, t: x, x0, ab_table, key, prediction)
    np.testing.assert_allclose(float(got), per.mean(), rtol=1e-5)
    snr = ab.ravel() / (1 - ab.ravel())
    norm = {"epsilon": snr, "v_prediction": snr + 1, "sample": 1.0}[prediction]
    got = diffusion_loss(lambda x, t: x, x0, ab_table, key, prediction, min_snr_gamma=5.0)
    np.testing.assert_allclose(float(got), (per * np.minimum(snr, 5.0) / norm).mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown prediction"):
        diffusion_loss(lambda x, t: x, x0, ab_table, key, "eps")
