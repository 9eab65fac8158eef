"""Training on many devices: a 2-D mesh, FSDP for the state, the batch split over every device.

    mesh        devices as a (data, fsdp) grid;  D = data * fsdp devices in all
    state       each big array split along one axis into fsdp pieces (ZeRO-3 / FSDP: every device
                holds 1/fsdp of the weights and of the Adam moments), small ones replicated
    batch       (B, ...) split into D slices of B / D rows, one per device
    step        the same program as on one device; XLA (GSPMD) inserts the collectives:
                all-gather the weights before use, reduce-scatter the gradients after

The numbers are those of one device up to the order of floating-point sums.  The mesh may span
several processes (``minidiff.distributed.initialize``): every process computes the same whole
batch (a pure function of the step) and places only its own devices' slices.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# arrays with fewer elements than this (16 KiB in float32: biases, norm scales, the step, the key) are
# replicated: gathering them every step would cost more in latency than their memory is worth
MIN_SHARDED_SIZE = 2**12


def make_mesh(data: int | None = None, fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over ``devices`` (default: all of ``jax.devices()``, every process's);
    ``data`` defaults to len(devices) // fsdp.  Consecutive devices share an fsdp group, so with
    one process per host the weight gathers stay inside a host."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"fsdp={fsdp} must be a positive divisor of the number of devices ({n})")
    data = n // fsdp if data is None else data
    if data < 1 or data * fsdp != n:
        raise ValueError(f"data x fsdp = {data} x {fsdp} = {data * fsdp} must equal the number of devices ({n})")
    return Mesh(np.array(devices).reshape(data, fsdp), ("data", "fsdp"))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def leaf_sharding(shape, mesh: Mesh, min_size: int = MIN_SHARDED_SIZE) -> NamedSharding:
    """FSDP for one array: its largest axis divisible by the fsdp size is split along "fsdp"
    (the last such axis on a tie); small arrays and arrays with no such axis are replicated."""
    k = mesh.shape["fsdp"]
    axes = [i for i, d in enumerate(shape) if d % k == 0]
    if k == 1 or not axes or int(np.prod(shape)) < min_size:
        return replicated(mesh)
    axis = max(axes, key=lambda i: (shape[i], i))
    return NamedSharding(mesh, P(*[None] * axis, "fsdp"))


def param_shardings(tree, mesh: Mesh, min_size: int = MIN_SHARDED_SIZE):
    """A NamedSharding per leaf of any pytree (parameters, an optax state, a whole training state):
    :func:`leaf_sharding` of its shape; scalars are replicated."""
    return jax.tree.map(lambda a: leaf_sharding(np.shape(a), mesh, min_size), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over all devices, data and fsdp alike: each its own rows."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def _put(x, sharding: NamedSharding):
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    # a mesh over several processes: each places its own slices of the (identical) host value
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard(tree, shardings):
    """``tree`` placed with ``shardings`` (a matching tree, or one sharding for every leaf)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: _put(x, shardings), tree)
    return jax.tree.map(_put, tree, shardings)


def gather(tree):
    """Every leaf as a whole NumPy array on this host (an all-gather where other processes hold parts)."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def shard_batch(batch, mesh: Mesh) -> tuple:
    """A batch tuple placed on the mesh: arrays whose leading axis splits evenly over the devices are
    split (:func:`batch_sharding`), others (a shared table, a scalar) replicated; None stays None."""
    n = mesh.devices.size

    def put(x):
        if x is None:
            return None
        split = np.ndim(x) > 0 and np.shape(x)[0] % n == 0
        return _put(x, batch_sharding(mesh) if split else replicated(mesh))

    return tuple(put(x) for x in batch)
