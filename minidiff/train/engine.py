"""The one training loop: every model in minidiff is a loss function and a batch source run by it.

    state       {"step", "params", "opt_state", "key", "ema_params" (with ema_decay), "model_state" (VQ-VAE)}
    (L, aux), g = value_and_grad(loss)(params, batches(s), fold_in(key, s), frozen)
    params      <- optax update with g                       (make_optimizer: warmup, schedule, clipping)
    theta_ema   <- d theta_ema + (1 - d) theta,   d = min(ema_decay, (1 + s) / (10 + s))

Everything random is a function of (seed, step), so a resumed run takes exactly the steps of an
uninterrupted one.  ``frozen`` networks enter the compiled step as an argument (a closed-over array
would be baked into the program as a constant).  The state is saved whole, atomically, every
``checkpoint_every`` steps, at the end and on Ctrl-C; the next batch is drawn on a second thread
while the step runs.  With a ``mesh`` (:mod:`minidiff.train.sharding`) the state is split FSDP-style
and each batch over all devices; the step keeps every array where it is.  Exports ``Engine``,
``EngineTrainer``, ``make_optimizer``, ``read_run``.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from .sharding import gather, param_shardings, replicated, shard, shard_batch


def make_optimizer(lr: float, steps: int, warmup: int = 0, decay: bool = True, weight_decay: float = 0.0,
                   grad_clip: float | None = None, kind: str = "adamw") -> optax.GradientTransformation:
    """AdamW (or Adafactor) after optional global-norm clipping, with the learning rate

        eta(s) = lr * s / warmup                     for s < warmup   (linear warmup from 0)
               = lr/10 + (lr - lr/10) * (1 + cos(pi * (s - warmup) / (steps - warmup))) / 2    (``decay``)
               = lr                                  otherwise (constant after the warmup)

    The warmup is capped at half the run with ``decay`` (a short run never fails on it)."""
    if not lr > 0:
        raise ValueError(f"the learning rate must be positive, got {lr}")
    if decay:
        warmup = max(1, min(warmup, steps // 2))
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr / 10)
    elif warmup > 0:
        schedule = optax.linear_schedule(0.0, lr, warmup)  # stays at lr after the warmup
    else:
        schedule = lr
    if kind == "adamw":  # two moments per weight
        step = optax.adamw(schedule, weight_decay=weight_decay)
    elif kind == "adafactor":  # factored second moments, no first: about half AdamW's memory
        step = optax.adafactor(schedule, multiply_by_parameter_scale=False)
    else:
        raise ValueError(f"unknown optimizer {kind!r}; choose 'adamw' or 'adafactor'")
    return optax.chain(optax.clip_by_global_norm(grad_clip), step) if grad_clip else step


def ema_update(ema, params, step, decay: float):
    """theta_ema <- d theta_ema + (1 - d) theta with d = min(decay, (1 + step) / (10 + step)):
    the average forgets its random start quickly, then settles to ``decay``."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)


def copy_tree(tree):
    """Our own device copy (each step donates, i.e. reuses, the buffers of the state it is given)."""
    return jax.tree.map(jnp.array, tree)


def _handle_signals(handler) -> dict:
    """Install ``handler`` for SIGINT and SIGTERM (a dict: the handlers to put back); returns the
    previous ones.  Only the main thread may: elsewhere nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    signums = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signums}
    for s in signums:
        signal.signal(s, handler[s] if isinstance(handler, dict) else handler)
    return previous


def _wait_for_the_device():
    """Let dispatched computations finish (an interrupted step's too): the runtime may crash if the
    interpreter exits while one still runs."""
    for a in jax.live_arrays():
        try:
            a.block_until_ready()
        except RuntimeError:  # donated or deleted
            pass


class Engine:
    """Runs ``loss`` on ``batches`` with ``optimizer`` for ``steps`` steps; see the module docstring.

    - ``loss(params, batch, key, frozen) -> (L, aux)``; with ``model_state`` it is called as
      ``loss(params, batch, key, frozen, model_state)`` and returns the new state as ``aux["model_state"]``.
      Scalar entries of aux are averaged into the history next to the loss.
    - ``batches(step) -> tuple`` of arrays, a pure function of the step.
    - ``checkpoint_every``: steps between checkpoints into ``run_dir`` (0: only at the end and on
      Ctrl-C; default: every tenth of the run); ``checkpoint_seconds``: also whenever this long has
      passed since the last one (a kill loses at most that much).
    - ``constrain(params) -> params``: applied after every update (e.g. CLIP's temperature clip).
    - ``callbacks``: ``[(every, fn)]``, ``fn(engine)`` after every ``every``-th step (sample grids,
      dead-code restarts); it may change ``engine.state``.
    - ``attachments``: arrays saved with every checkpoint but not trained (DALL-E's VQ-VAE);
      ``info``: JSON-able facts saved with them (its settings).
    - ``mesh``: a ("data", "fsdp") mesh (``sharding.make_mesh``): params, optimizer state, EMA and model
      state sharded by ``param_shardings``, ``frozen`` replicated, each batch split by ``shard_batch``.
      The checkpoint is gathered whole (written by process 0: several hosts need a shared run_dir).
    """

    def __init__(self, loss: Callable, batches: Callable, params, optimizer: optax.GradientTransformation, *,
                 steps: int, key=None, frozen=None, model_state=None, ema_decay: float | None = None,
                 constrain: Callable | None = None, run_dir=None, config: dict | None = None, kind: str = "",
                 checkpoint_every: int | None = None, checkpoint_seconds: float = 300.0, log_every: int = 50,
                 callbacks=(), attachments=None, info: dict | None = None, desc: str | None = None, mesh=None):
        if steps < 1:
            raise ValueError(f"steps must be positive, got {steps}")
        self.loss, self.batches, self.tx, self.steps = loss, batches, optimizer, int(steps)
        self.frozen, self.constrain, self.ema_decay = frozen, constrain, ema_decay
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.config, self.kind, self.attachments, self.info = config or {}, kind, attachments, info or {}
        if checkpoint_every is None:  # with a run folder: every tenth of the run
            checkpoint_every = max(1, steps // 10) if run_dir is not None else 0
        self.checkpoint_every, self.log_every, self.callbacks = checkpoint_every, log_every, list(callbacks)
        self.checkpoint_seconds, self._saved_at = checkpoint_seconds, time.monotonic()
        self.desc = desc or f"train {kind}".strip()
        params = copy_tree(params)
        state = {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params),
                 "key": jax.random.PRNGKey(0) if key is None else key}
        if ema_decay is not None:
            state["ema_params"] = copy_tree(params)
        if model_state is not None:
            state["model_state"] = copy_tree(model_state)
        self.state, self.mesh = state, mesh
        self.history: dict[str, list] = {"step": [], "loss": []}
        self._pending: list = []  # (loss, scalar aux) of the steps since the last history row
        if mesh is None:
            self._step = jax.jit(self._update, donate_argnums=0)
        else:  # placed once; the step returns each array sharded as it came, so donation reuses its buffers
            self._shardings = param_shardings(state, mesh)
            self.state, self.frozen = shard(state, self._shardings), shard(frozen, replicated(mesh))
            self._step = jax.jit(self._update, donate_argnums=0,
                                 out_shardings=(self._shardings, replicated(mesh), replicated(mesh)))

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def params(self):
        return self.state["params"]

    # --- one step ---

    def _update(self, state, frozen, batch):
        step = state["step"]
        key = jax.random.fold_in(state["key"], step)
        extra = (state["model_state"],) if "model_state" in state else ()
        (value, aux), grads = jax.value_and_grad(lambda p: self.loss(p, batch, key, frozen, *extra),
                                                 has_aux=True)(state["params"])
        aux = dict(aux)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        if self.constrain is not None:
            params = self.constrain(params)
        new = {**state, "step": step + 1, "params": params, "opt_state": opt_state}
        if "model_state" in state:
            new["model_state"] = aux.pop("model_state")
        if "ema_params" in state:
            new["ema_params"] = ema_update(state["ema_params"], params, step, self.ema_decay)
        return new, value, aux

    # --- the loop ---

    def _batch(self, step: int) -> tuple:
        batch = tuple(self.batches(step))
        return batch if self.mesh is None else shard_batch(batch, self.mesh)

    def train(self, until: int | None = None, progress: bool = True) -> dict:
        """Train up to step ``until`` (default: ``steps``).  Ctrl-C writes a checkpoint, then re-raises."""
        from tqdm.auto import tqdm

        until = self.steps if until is None else min(until, self.steps)
        bar = tqdm(total=self.steps, initial=self.step, disable=not progress, desc=self.desc, unit="step")
        prefetch = ThreadPoolExecutor(1)  # draws the next batch while this step runs
        step = self.step  # counted on the host: reading the state's step would wait for every step to finish
        self._saved_at = time.monotonic()
        upcoming = prefetch.submit(self._batch, step)
        stop = []  # Ctrl-C / SIGTERM: finish the step (never interrupt JAX mid-compile), save, then stop

        def request_stop(signum, frame):
            if stop:  # a second time: at once
                raise KeyboardInterrupt
            stop.append(signum)
            bar.write("stopping after this step (Ctrl-C again to stop at once)")

        handlers = _handle_signals(request_stop)
        try:
            while step < until:
                if stop:
                    raise KeyboardInterrupt
                batch = upcoming.result()
                if step + 1 < until:
                    upcoming = prefetch.submit(self._batch, step + 1)
                self.state, value, aux = self._step(self.state, self.frozen, batch)
                self._pending.append((value, {k: v for k, v in aux.items() if np.ndim(v) == 0}))
                bar.update()
                step += 1
                if step % self.log_every == 0 or step == self.steps:
                    self._log(bar)
                for every, fn in self.callbacks:
                    if every and step % every == 0:
                        fn(self)
                if self.run_dir is not None and (
                        (self.checkpoint_every and step % self.checkpoint_every == 0)
                        or (self.checkpoint_seconds and time.monotonic() - self._saved_at > self.checkpoint_seconds)):
                    self.save()
        except KeyboardInterrupt:
            _wait_for_the_device()
            if self.run_dir is not None:
                try:
                    bar.write(f"interrupted: saved step {self.step} to {self.save()}")
                except RuntimeError:  # stopped between a step and taking its result: its input was donated
                    bar.write("interrupted in the middle of a step: the last checkpoint stands")
            raise
        finally:
            _handle_signals(handlers)
            prefetch.shutdown(cancel_futures=True)
            bar.close()
        if self.run_dir is not None:
            self.save()
        return self.history

    def _log(self, bar):
        """One history row: the means over the steps since the last one."""
        values, auxes = zip(*jax.device_get(self._pending))
        self._pending = []
        self.history["step"].append(self.step)
        self.history["loss"].append(float(np.mean(values)))
        for name in auxes[0]:
            self.history.setdefault(name, []).append(float(np.mean([a[name] for a in auxes])))
        if not np.isfinite(self.history["loss"][-1]):
            raise FloatingPointError(f"{self.desc}: the loss became {self.history['loss'][-1]} at step {self.step} "
                                     "(lower the learning rate)")
        bar.set_postfix(loss=f"{self.history['loss'][-1]:.4f}")

    # --- checkpoints ---

    def save(self) -> Path:
        """Write the whole training state (and the attachments) to ``run_dir`` atomically."""
        if self.run_dir is None:
            raise ValueError("this run has no run_dir to save into")
        state = {**self.state, "attachments": self.attachments} if self.attachments is not None else self.state
        pending = [(float(v), {k: float(x) for k, x in a.items()}) for v, a in jax.device_get(self._pending)]
        meta = {**self.info, "history": self.history, "pending": pending, "kind": self.kind,
                "saved": time.strftime("%Y-%m-%d %H:%M:%S")}
        if self.mesh is None:
            path = save_checkpoint(self.run_dir, jax.device_get(state), self.config, meta)
        else:  # every process takes part in the gather; one writes
            state = gather(state)
            path = self.run_dir / CHECKPOINT
            if jax.process_index() == 0:
                save_checkpoint(self.run_dir, state, self.config, meta)
        self._saved_at = time.monotonic()
        return path

    def restore(self, run_dir=None) -> "Engine":
        """Continue from the checkpoint in ``run_dir`` (default: this run's): the state and history.
        The saved configuration must be this run's (the number of steps may differ)."""
        run_dir = run_dir or self.run_dir
        template = {**self.state, "attachments": self.attachments} if self.attachments is not None else self.state
        template = (jax.device_get(template) if self.mesh is None  # with a mesh: structure and shapes only
                    else jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), template))
        try:
            state, config, meta = load_checkpoint(run_dir, target=template)
        except ValueError:
            if load_checkpoint(run_dir)[2].get("slim"):
                raise ValueError(f"{run_dir} is a slim copy of a run (weights only, no optimizer state): it samples "
                                 "and evaluates but cannot continue training; train a new run instead") from None
            raise
        if meta.get("kind", self.kind) != self.kind:
            raise ValueError(f"{run_dir} holds a {meta.get('kind')!r} run, not {self.kind!r}")
        mine = json.loads(json.dumps(self.config))  # tuples as lists, as read back from the file
        changed = sorted(k for k in set(config) | set(mine) if k != "steps" and config.get(k) != mine.get(k))
        if changed:
            raise ValueError(f"{run_dir} was trained with other settings ({', '.join(changed)}): continue it with "
                             "the same settings, or start a new run elsewhere")
        state = jax.tree.map(jnp.asarray, state)
        if self.attachments is not None:
            self.attachments = state.pop("attachments")
        self.state = state if self.mesh is None else shard(state, self._shardings)
        self.history = meta.get("history", self.history)
        self._pending = [(np.float32(v), {k: np.float32(x) for k, x in a.items()}) for v, a in meta.get("pending", [])]
        return self

    def resume_or_start(self) -> "Engine":
        """Restore ``run_dir``'s checkpoint if it holds one (a stopped run continues), else start afresh."""
        if self.run_dir is not None and (self.run_dir / CHECKPOINT).is_file():
            self.restore()
        return self


class EngineTrainer:
    """What a trainer built around an engine shares: ``self.engine``, continuing a saved run, and the
    engine's state, step, params, history, train and save.  Subclasses set ``kind`` (the checkpoint's
    kind) and ``config_class``, and build ``self.engine`` from ``(config, run_dir)``."""

    kind: str = ""
    config_class: type = dict
    engine: Engine

    @classmethod
    def resume(cls, run_dir, steps: int | None = None, **kwargs):
        """Rebuild a run from ``run_dir/checkpoint.msgpack`` (its saved config; ``steps`` may change);
        keyword arguments go to the trainer (e.g. ``mesh``)."""
        _, config, _ = read_run(run_dir, cls.kind)
        trainer = cls(cls.config_class.from_dict({**config, **({} if steps is None else {"steps": steps})}), run_dir,
                      **kwargs)
        trainer.engine.restore()
        return trainer

    state = property(lambda self: self.engine.state)
    step = property(lambda self: self.engine.step)
    params = property(lambda self: self.engine.params)
    history = property(lambda self: self.engine.history)

    def train(self, until: int | None = None, progress: bool = True) -> dict:
        """Train up to step ``until`` (default: the config's steps).  Ctrl-C saves a checkpoint first."""
        return self.engine.train(until, progress)

    def save(self) -> Path:
        return self.engine.save()


def read_run(run_dir, kind: str | None = None) -> tuple[dict, dict, dict]:
    """(state, config, meta) of a saved run as plain dicts of NumPy arrays; ``kind`` checks what it is."""
    state, config, meta = load_checkpoint(run_dir)
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{run_dir} does not hold a {kind} run (it holds {meta.get('kind') or 'something else'!r})")
    return state, config, meta


