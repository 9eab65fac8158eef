"""The one timing rule of the benchmarks: the best of ``repeats`` calls after one warm-up call."""

import time


def best_seconds(call, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``call()`` (which must wait for its own result:
    ``.block_until_ready()`` for JAX), after one untimed warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return min(times)
