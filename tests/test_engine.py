"""The training engine: its step (optimizer, EMA, model state), checkpoints, exact resume after a
stop at any step, Ctrl-C, and every trainer built on it stopped and resumed equal to a whole run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from minidiff.train import checkpoint
from minidiff.train.engine import Engine, ema_update, make_optimizer


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and len(la) > 0
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- a small problem with every feature: noise, EMA, model state, a frozen argument, a constraint ------

TARGET = np.array([1.0, -2.0, 0.5], np.float32)


def batches(step):
    x = np.random.default_rng([7, step]).standard_normal((16, 3)).astype(np.float32)
    return x, x @ TARGET


def loss(params, batch, key, frozen, state):
    x, y = batch
    noise = 0.01 * jax.random.normal(key, y.shape)            # uses the step's key
    pred = x @ params["w"] + frozen                            # frozen: an argument of the compiled step
    value = jnp.mean((pred - y - noise) ** 2)
    return value, {"mse": value, "model_state": {"seen": state["seen"] + len(y)}}


def engine(run_dir=None, steps=12, **kw):
    return Engine(loss, batches, {"w": jnp.zeros(3)}, make_optimizer(0.1, steps, warmup=2), steps=steps,
                  key=jax.random.PRNGKey(3), frozen=jnp.float32(0.0), model_state={"seen": jnp.int32(0)},
                  ema_decay=0.9, constrain=lambda p: {"w": jnp.clip(p["w"], -1.5, 1.5)}, run_dir=run_dir,
                  config={"lr": 0.1}, kind="toy", log_every=2, **kw)


def test_one_step_is_the_optimizer_update_then_the_ema():
    e = engine()
    state0 = jax.device_get(e.state)
    e.train(until=1, progress=False)
    x, y = batches(0)
    key = jax.random.fold_in(jax.random.PRNGKey(3), 0)
    grads = jax.grad(lambda p: loss(p, (x, y), key, 0.0, {"seen": 0})[0])({"w": jnp.zeros(3)})
    tx = make_optimizer(0.1, 12, warmup=2)
    updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(3)}), {"w": jnp.zeros(3)})
    w = np.clip(np.asarray(optax.apply_updates({"w": jnp.zeros(3)}, updates)["w"]), -1.5, 1.5)
    np.testing.assert_allclose(np.asarray(e.params["w"]), w, rtol=1e-6)
    d = min(0.9, 1 / 10)  # the EMA's warmup at step 0: d = (1 + 0) / (10 + 0)
    np.testing.assert_allclose(np.asarray(e.state["ema_params"]["w"]), d * state0["ema_params"]["w"] + (1 - d) * w,
                               rtol=1e-6)
    assert int(e.state["model_state"]["seen"]) == 16 and e.step == 1


def test_ema_warmup_formula():
    ema = ema_update({"a": jnp.float32(0.0)}, {"a": jnp.float32(1.0)}, 90, 0.999)
    np.testing.assert_allclose(float(ema["a"]), 1 - 91 / 100, rtol=1e-6)  # d = (1 + 90) / (10 + 90) < 0.999


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    """With a constant gradient Adam's step is the learning rate itself (m_hat / sqrt(v_hat) = 1)."""
    for decay, expect in ((True, {0: 0.0, 5: 0.5, 10: 1.0, 100: 0.1}), (False, {0: 0.0, 5: 0.5, 10: 1.0, 100: 1.0})):
        tx = make_optimizer(1.0, 100, warmup=10, decay=decay)
        params, state = {"w": jnp.zeros(())}, None
        state = tx.init(params)
        for s in range(101):
            updates, state = tx.update({"w": jnp.ones(())}, state, params)
            if s in expect:
                assert -float(updates["w"]) == pytest.approx(expect[s], rel=1e-4, abs=1e-6), (decay, s)
    with pytest.raises(ValueError, match="learning rate"):
        make_optimizer(0.0, 10)
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer(1.0, 10, kind="sgd")


@pytest.mark.parametrize("stop", [1, 5, 11])
def test_stopped_at_any_step_and_restored_equals_a_whole_run(tmp_path, stop):
    whole = engine()
    whole.train(progress=False)
    first = engine(tmp_path)
    first.train(until=stop, progress=False)
    resumed = engine(tmp_path).resume_or_start()
    assert resumed.step == stop
    resumed.train(progress=False)
    assert_trees_equal(resumed.state, whole.state)
    assert resumed.history["step"] == whole.history["step"]
    np.testing.assert_allclose(resumed.history["loss"], whole.history["loss"], rtol=1e-6)


def test_ctrl_c_writes_a_checkpoint_then_the_run_continues_exactly(tmp_path):
    whole = engine()
    whole.train(progress=False)

    def interrupting(step):
        if step == 7:
            raise KeyboardInterrupt
        return batches(step)

    stopped = engine(tmp_path)
    stopped.batches = interrupting
    with pytest.raises(KeyboardInterrupt):
        stopped.train(progress=False)
    assert int(checkpoint.load_checkpoint(tmp_path)[0]["step"]) == 7
    resumed = engine(tmp_path).resume_or_start()
    resumed.train(progress=False)
    assert_trees_equal(resumed.state, whole.state)


def test_checkpoints_every_n_steps_and_other_settings_are_refused(tmp_path):
    e = engine(tmp_path, checkpoint_every=4)
    saved = []
    e.callbacks.append((1, lambda e: saved.append(int(checkpoint.load_checkpoint(tmp_path)[0]["step"])
                                                  if (tmp_path / checkpoint.CHECKPOINT).exists() else 0)))
    e.train(until=9, progress=False)
    assert saved == [0, 0, 0, 0, 4, 4, 4, 4, 8]  # callbacks run before the step's checkpoint is written
    other = Engine(loss, batches, {"w": jnp.zeros(3)}, make_optimizer(0.1, 12), steps=12, model_state={"seen": 0},
                   run_dir=tmp_path, config={"lr": 0.2}, kind="toy")
    with pytest.raises(ValueError, match="other settings \\(lr\\)"):
        other.resume_or_start()


def test_checkpoints_by_wall_clock_time_too_and_dead_runs_temp_files_go(tmp_path, monkeypatch):
    """With checkpoint_every=0 only the clock triggers a save: every 5 (fake) minutes."""
    import time as real_time

    from minidiff.train import engine as E

    now = [1000.0]
    monkeypatch.setattr(E.time, "monotonic", lambda: now[0])
    stale = tmp_path / f".{checkpoint.CHECKPOINT}.999999999.tmp"  # a SIGKILLed writer's (pid not running)
    stale.write_bytes(b"half a checkpoint")
    e = engine(tmp_path, checkpoint_every=0, checkpoint_seconds=300.0)
    saved = []

    def tick(e):
        now[0] += 100.0  # each step takes 100 s
        saved.append(int(checkpoint.load_checkpoint(tmp_path)[0]["step"])
                     if (tmp_path / checkpoint.CHECKPOINT).exists() else 0)
    e.callbacks.append((1, tick))
    e.train(until=8, progress=False)
    assert saved == [0, 0, 0, 0, 4, 4, 4, 4]  # saved once more than 300 s passed: after steps 4 and 8
    assert not stale.exists() and not list(tmp_path.glob(".*.tmp"))
    assert real_time.monotonic is not None


def test_a_diverging_loss_is_a_clear_error():
    e = Engine(lambda p, b, k, f: (p["w"] * jnp.inf, {}), lambda s: (), {"w": jnp.float32(1.0)},
               make_optimizer(0.1, 4), steps=4, log_every=1)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        e.train(progress=False)


# --- every trainer: stopped (as by Ctrl-C) and continued equals an uninterrupted run ------------------------


@pytest.fixture
def interrupt_at(monkeypatch):
    """Make the next ``Engine.train`` stop after step k as Ctrl-C does (checkpoint written, KeyboardInterrupt)."""

    def arm(k):
        original = Engine.train

        def train(self, until=None, progress=True):
            monkeypatch.setattr(Engine, "train", original)
            original(self, until=k, progress=progress)
            raise KeyboardInterrupt

        monkeypatch.setattr(Engine, "train", train)

    return arm


def test_vqvae_trainer_resumes_exactly_across_dead_code_restarts(tmp_path):
    from minidiff.train.vqvae import VQVAETrainConfig, VQVAETrainer

    cfg = VQVAETrainConfig(steps=6, batch=4, restart_every=2, warmup=1,
                           model={"channels": [8, 8], "groups": 4, "num_codes": 16, "latent_dim": 4})
    whole = VQVAETrainer(cfg)
    whole.train(progress=False)
    first = VQVAETrainer(cfg, tmp_path)
    first.train(until=3, progress=False)
    resumed = VQVAETrainer.resume(tmp_path)
    resumed.train(progress=False)
    assert_trees_equal(resumed.engine.state, whole.engine.state)
    assert resumed.history["restarted"] == whole.history["restarted"] and len(whole.history["restarted"]) == 3


def test_a_slim_copy_samples_like_the_run_and_refuses_to_resume(tmp_path):
    """The lessons ship slim copies: float16 weights, no optimizer state (a sixth of the file)."""
    from minidiff.train.checkpoint import CHECKPOINT, slim_checkpoint
    from minidiff.train.vqvae import VQVAETrainConfig, VQVAETrainer, load_vqvae

    cfg = VQVAETrainConfig(steps=2, batch=4, restart_every=0, warmup=1,
                           model={"channels": [8, 8], "groups": 4, "num_codes": 16, "latent_dim": 4})
    VQVAETrainer(cfg, tmp_path / "run").train(progress=False)
    slim_checkpoint(tmp_path / "run", tmp_path / "slim")
    assert (tmp_path / "slim" / CHECKPOINT).stat().st_size < (tmp_path / "run" / CHECKPOINT).stat().st_size / 3
    (model, full, _), (_, small, _) = load_vqvae(tmp_path / "run"), load_vqvae(tmp_path / "slim")
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(small)):
        assert b.dtype == a.dtype
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)  # float16's 11 bits
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(model.apply(small, x)[0], model.apply(full, x)[0], atol=0.02)
    with pytest.raises(ValueError, match="slim copy"):
        VQVAETrainer.resume(tmp_path / "slim")


@pytest.mark.slow
def test_dalle_trainer_resumes_exactly(tmp_path):
    from minidiff.train.dalle import DalleTrainConfig, DalleTrainer
    from minidiff.train.vqvae import VQVAETrainConfig, VQVAETrainer

    VQVAETrainer(VQVAETrainConfig(steps=2, batch=4, model={"channels": [8, 8], "groups": 4, "num_codes": 16,
                                                           "latent_dim": 4}), tmp_path / "vq").train(progress=False)
    cfg = DalleTrainConfig(vqvae=str(tmp_path / "vq"), steps=4, batch=4, model={"width": 16, "layers": 1, "heads": 2})
    whole = DalleTrainer(cfg)
    whole.train(progress=False)
    DalleTrainer(cfg, tmp_path / "dalle").train(until=2, progress=False)
    resumed = DalleTrainer.resume(tmp_path / "dalle")
    resumed.train(progress=False)
    assert_trees_equal(resumed.engine.state, whole.engine.state)
    assert_trees_equal(resumed.vq_variables, whole.vq_variables)


def _resumes_exactly(run, tmp_path, interrupt_at, k):
    """``run(run_dir)`` -> params: whole, then stopped after step k and run again into the same folder."""
    whole = run(None)
    interrupt_at(k)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    assert int(checkpoint.load_checkpoint(tmp_path)[0]["step"]) == k
    assert_trees_equal(run(tmp_path), whole)


@pytest.mark.slow
def test_autoencoder_trainer_resumes_exactly(tmp_path, interrupt_at):
    from minidiff.nn.autoencoder import AutoencoderKLConfig
    from minidiff.train.autoencoder import train_vae

    photo = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    cfg = AutoencoderKLConfig.toy(sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)
    _resumes_exactly(lambda d: train_vae([photo], cfg, steps=4, batch=2, crop=8, run_dir=d)[0], tmp_path,
                     interrupt_at, 2)


@pytest.mark.slow
def test_clip_and_classifier_trainers_resume_exactly(tmp_path, interrupt_at):
    from minidiff.data import ShapesDataset
    from minidiff.nn.clip import CLIPTextConfig
    from minidiff.train.classifier import train_classifier
    from minidiff.train.clip import train_clip

    ds = ShapesDataset()
    text = CLIPTextConfig.toy(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    _resumes_exactly(lambda d: train_clip(ds, text, steps=4, batch=8, embed_dim=8, progress=False, run_dir=d)[0],
                     tmp_path / "clip", interrupt_at, 3)
    _resumes_exactly(lambda d: train_classifier(ds, steps=4, batch=8, pool=64, run_dir=d), tmp_path / "classifier",
                     interrupt_at, 1)


@pytest.mark.slow
def test_mini_sd_unet_trainer_resumes_exactly(tmp_path, interrupt_at):
    from minidiff.train.mini_sd import MiniSDConfig, train_mini_unet

    cfg = MiniSDConfig(unet_channels=(16, 16), unet_steps=4, unet_batch=4, text_width=16)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((10, 8, 8, 4)).astype(np.float32)
    contexts = rng.standard_normal((4, 77, 16)).astype(np.float32)
    captions = rng.integers(0, 3, 10).astype(np.int32)
    _resumes_exactly(lambda d: train_mini_unet(cfg, latents, captions, contexts, False, np.array([1, 1, 2, 3]),
                                               run_dir=d)[0], tmp_path, interrupt_at, 2)


@pytest.mark.slow
def test_fine_tuning_trainers_resume_exactly(tmp_path, interrupt_at):
    from minidiff.pipeline import load_pipeline
    from minidiff.train.dreambooth import DreamBoothConfig, train_dreambooth
    from minidiff.train.finetune import draw_subject
    from minidiff.train.textual_inversion import TextualInversionConfig, train_textual_inversion

    pipe, subject = load_pipeline(), draw_subject("ring")
    ti = TextualInversionConfig(steps=4, batch=2)
    _resumes_exactly(lambda d: train_textual_inversion(pipe, subject, ti, progress=False, run_dir=d)[0],
                     tmp_path / "ti", interrupt_at, 2)
    db = DreamBoothConfig(steps=3, batch=1)
    class_set = (subject.images[:2], ["a circle", "a circle"])
    _resumes_exactly(lambda d: train_dreambooth(pipe, subject, db, progress=False, class_set=class_set,
                                                run_dir=d)[0], tmp_path / "db", interrupt_at, 1)
