"""Several processes (hosts) as one JAX runtime: call :func:`initialize` first, in every process.

After it, ``jax.devices()`` lists every process's devices and ``jax.local_devices()`` this one's;
the same program runs in every process (SPMD), and arrays sharded over a mesh of all devices
are computed together, XLA doing the collectives (NCCL on GPU, ICI on TPU, gloo over TCP on CPU).
Sampling (``minidiff.pipeline``: the batch split over all devices, the images gathered back to
every process) and training (``Engine(..., mesh=minidiff.train.sharding.make_mesh(...))``) work
unchanged.

    # two GPU hosts, each with its 8 GPUs: the same command on each, with its own process id
    host0$ python train.py --coordinator host0:1234 --num-processes 2 --process-id 0
    host1$ python train.py --coordinator host0:1234 --num-processes 2 --process-id 1
    #   where train.py calls minidiff.distributed.initialize(args.coordinator, args.num_processes,
    #   args.process_id) before anything else touches JAX

    # a Cloud TPU pod slice (or a Slurm / Open MPI job): everything is detected
    gcloud compute tpus tpu-vm ssh NAME --worker=all --command="python train.py"   # initialize()

    # two processes on one machine's CPU, 4 devices each (how the tests run it)
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python train.py ... --process-id 0 &
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python train.py ... --process-id 1
"""

from __future__ import annotations

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               **kwargs) -> None:
    """``jax.distributed.initialize`` (before any other JAX call): ``coordinator`` = "host:port" of
    process 0, which serves it; ``num_processes``; this ``process_id`` in 0..num_processes-1.  All
    None on TPU pods, Slurm and Open MPI (detected).  On CPU the processes exchange data through
    gloo over TCP (JAX's CPU collectives; without them every cross-process computation fails).
    Further keyword arguments go to ``jax.distributed.initialize`` (e.g. ``local_device_ids``,
    ``initialization_timeout``).  Calling it again in an initialized process does nothing."""
    if jax.distributed.is_initialized():
        return
    # "gloo" is JAX 0.10's default already ("mpi" needs an MPI library); set it so that an older
    # default (none) or an environment's override cannot leave the CPU without collectives
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)


def is_main_process() -> bool:
    """Process 0: the one that writes files and prints."""
    return jax.process_index() == 0
