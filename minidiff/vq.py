"""Vector quantization (VQ-VAE, van den Oord et al. 2017), in NumPy.

Each encoder vector z (..., D) is replaced by its nearest code of a codebook e (K, D):

    k(z) = argmin_k ||z - e_k||^2 = argmin_k ||z||^2 - 2 z . e_k + ||e_k||^2,        z_q = e_{k(z)}

(one (N, D) @ (D, K) product, never an N x K x D array).  Exports ``squared_distances``,
``quantize``, ``ema_update`` (codes as running means of their assigned z: van den Oord et al.
2017, A.1), which use only array operators and so also run on traced JAX arrays
(``minidiff.nn.quantizer`` calls them); and, NumPy only, ``restart_dead_codes`` (unused codes moved
onto random encoder outputs, as in Jukebox) and the usage statistics ``codebook_usage``,
``fraction_used``, ``perplexity`` (the effective number of codes in use).

DALL-E's dVAE (Ramesh et al. 2021) replaces the nearest code by a distribution over the codes:
``gumbel_softmax`` (the relaxed sample the decoder is trained on) and ``kl_to_uniform`` (the ELBO's
prior term), NumPy references of ``minidiff.nn.quantizer.GumbelQuantizer``.  Lesson 5.
"""

from __future__ import annotations

import numpy as np


def _as_array(a):
    """Lists become NumPy arrays; NumPy and JAX arrays are passed through untouched."""
    return a if hasattr(a, "shape") else np.asarray(a)


def _check_codebook(z, codebook) -> None:
    """Raise ``ValueError`` unless codebook is (K, D) and z is (..., D).  Uses ``.shape`` only
    (static under ``jax.jit``)."""
    if len(codebook.shape) != 2:
        raise ValueError(f"the codebook must have shape (K, D), got shape {tuple(codebook.shape)}")
    if len(z.shape) < 1 or z.shape[-1] != codebook.shape[1]:
        raise ValueError(
            f"z has shape {tuple(z.shape)}: its last dimension must equal the codebook's D = {codebook.shape[1]} "
            f"(codebook shape {tuple(codebook.shape)})"
        )


# ---------------------------------------------------------------------------------------------
# Nearest code
# ---------------------------------------------------------------------------------------------


def squared_distances(z, codebook):
    """||z_n - e_k||^2 for z (..., D) and codebook (K, D): returns (..., K).

        ||z - e||^2 = ||z||^2 - 2 z . e + ||e||^2

    Cancellation can make an entry slightly negative (about eps * ||z||^2); clip before a sqrt.
    """
    z, codebook = _as_array(z), _as_array(codebook)
    _check_codebook(z, codebook)
    z_sq = (z * z).sum(-1, keepdims=True)  # ||z||^2        (..., 1)
    e_sq = (codebook * codebook).sum(-1)  # ||e_k||^2      (K,)
    return z_sq - 2 * (z @ codebook.T) + e_sq


def quantize(z, codebook):
    """Nearest-code quantization: k = argmin_k ||z - e_k||^2, z_q = e_k.

    z (..., D), codebook (K, D).  Returns ``(indices, z_q)``: indices (...,) integers, z_q (..., D).
    Ties go to the smallest index.
    """
    z, codebook = _as_array(z), _as_array(codebook)
    indices = squared_distances(z, codebook).argmin(-1)
    return indices, codebook[indices]


# ---------------------------------------------------------------------------------------------
# The dVAE's relaxed code (NumPy references)
# ---------------------------------------------------------------------------------------------


def log_softmax(logits):
    """log q_k = l_k - log sum_j exp l_j over the last axis (max subtracted first: no overflow)."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def gumbel_softmax(logits, gumbel, tau: float):
    """The Gumbel-softmax relaxation (Jang et al. 2017; Maddison et al. 2017) of a sample of q = softmax(l):

        y_k = exp((log q_k + g_k) / tau) / sum_j exp((log q_j + g_j) / tau),   g_k ~ Gumbel(0, 1) = -log(-log U)

    As tau -> 0, y becomes the one-hot of argmax_k (log q_k + g_k), which is distributed exactly as q
    (the Gumbel-max trick); for tau > 0 it is smooth in the logits.  logits, gumbel (..., K) -> (..., K).
    """
    if not tau > 0:
        raise ValueError(f"the temperature tau must be positive, got {tau}")
    return np.exp(log_softmax((log_softmax(logits) + np.asarray(gumbel, np.float64)) / tau))


def kl_to_uniform(logits):
    """KL(q || uniform over K codes) = sum_k q_k log(K q_k) in nats, per position (..., K) -> (...):
    0 when every code is equally likely, log K when q is one-hot."""
    log_q = log_softmax(logits)
    return (np.exp(log_q) * (log_q + np.log(log_q.shape[-1]))).sum(-1)


# ---------------------------------------------------------------------------------------------
# Codebook statistics (NumPy)
# ---------------------------------------------------------------------------------------------


def codebook_usage(indices, num_codes: int) -> np.ndarray:
    """count_k = #{n : k_n = k}: how often each of the K codes was chosen.  Returns (K,) int64."""
    idx = np.asarray(indices).reshape(-1)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= num_codes):
        raise ValueError(f"indices must lie in [0, {num_codes}) (num_codes={num_codes}), "
                         f"got values in [{idx.min()}, {idx.max()}]")
    return np.bincount(idx.astype(np.int64), minlength=num_codes)


def fraction_used(indices, num_codes: int) -> float:
    """The fraction of the K codes chosen at least once."""
    return float((codebook_usage(indices, num_codes) > 0).mean())


def perplexity(indices, num_codes: int) -> float:
    """exp(H(p)) = exp(-sum_k p_k log p_k), p_k = count_k / N: the effective number of codes in use
    (K when all codes are used equally often, 1 when a single code is used; 0 log 0 = 0)."""
    counts = codebook_usage(indices, num_codes)
    if counts.sum() == 0:
        raise ValueError("perplexity needs at least one index, got an empty array")
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


# ---------------------------------------------------------------------------------------------
# Keeping the codebook alive
# ---------------------------------------------------------------------------------------------


def ema_update(cluster_size, embed_sum, z, indices, decay: float = 0.99, eps: float = 1e-5):
    """One EMA codebook step (van den Oord et al. 2017, appendix A.1; Razavi et al. 2019).

    cluster_size n (K,), embed_sum m (K, D): the running statistics; z (..., D) the encoder outputs
    and indices (...,) their codes.  With gamma = ``decay``:

        n_k  <- gamma n_k + (1 - gamma) #{z : k(z) = k}
        m_k  <- gamma m_k + (1 - gamma) sum_{z : k(z) = k} z
        n_k' =  (n_k + eps) / (n + K eps) * n,        n = sum_k n_k     (Laplace smoothing: n_k' > 0)
        e_k  =  m_k / n_k'

    Returns ``(cluster_size, embed_sum, codebook)``, the new n, m and e.  The per-code counts and
    sums come from a one-hot matrix (N, K), so this runs under ``jax.jit`` unchanged.
    """
    cluster_size, embed_sum, z, indices = map(_as_array, (cluster_size, embed_sum, z, indices))
    _check_codebook(z, embed_sum)
    K, D = embed_sum.shape
    if tuple(cluster_size.shape) != (K,):
        raise ValueError(f"cluster_size must have shape ({K},) to match embed_sum {tuple(embed_sum.shape)}, "
                         f"got {tuple(cluster_size.shape)}")
    if tuple(indices.shape) != tuple(z.shape[:-1]):
        raise ValueError(f"indices must have shape z.shape[:-1] = {tuple(z.shape[:-1])}, got {tuple(indices.shape)}")
    if isinstance(decay, (int, float)) and not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    z_flat = z.reshape(-1, D)  # (N, D)
    onehot = (indices.reshape(-1)[:, None] == np.arange(K)).astype(z.dtype)  # (N, K): 1 where k(z_n) = k
    counts = onehot.sum(0)  # #{z : k(z) = k}            (K,)
    sums = onehot.T @ z_flat  # sum_{z : k(z) = k} z       (K, D)
    cluster_size = decay * cluster_size + (1 - decay) * counts
    embed_sum = decay * embed_sum + (1 - decay) * sums
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + K * eps) * n  # n_k'
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def restart_dead_codes(codebook, counts, z, rng: np.random.Generator, threshold: float = 1.0, noise: float = 0.0):
    """Move the dead codes onto encoder outputs (random restarts, Dhariwal et al. 2020).

    Every code k with counts[k] < ``threshold`` (counts: usage over recent batches, e.g.
    ``codebook_usage``, or the EMA cluster sizes) is replaced by a row of z (..., D) chosen at
    random, without replacement when z has enough rows, plus N(0, noise^2) jitter if ``noise`` > 0.
    Live codes are unchanged and the input is not modified.

    Returns ``(new_codebook, number_restarted)``.  NumPy only: call it between jitted steps.  With
    EMA, also reset the statistics of the restarted codes (e.g. cluster_size[k] = 1,
    embed_sum[k] = new_codebook[k]), or the next ``ema_update`` moves them back.
    """
    codebook = np.array(codebook, copy=True)  # a fresh, writable copy (also of a JAX array)
    counts, z = np.asarray(counts), np.asarray(z)
    _check_codebook(z, codebook)
    K, D = codebook.shape
    if counts.shape != (K,):
        raise ValueError(f"counts must have shape ({K},), one per code of the codebook {codebook.shape}, "
                         f"got {counts.shape}")
    dead = np.flatnonzero(counts < threshold)
    if dead.size == 0:
        return codebook, 0
    z_flat = z.reshape(-1, D)
    if len(z_flat) == 0:
        raise ValueError(f"{dead.size} dead codes to restart but z has no rows (shape {z.shape})")
    pick = rng.choice(len(z_flat), size=dead.size, replace=len(z_flat) < dead.size)
    new = z_flat[pick]
    if noise > 0:
        new = new + noise * rng.standard_normal(new.shape)
    codebook[dead] = new
    return codebook, int(dead.size)
