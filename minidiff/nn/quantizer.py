"""The vector-quantization bottleneck of a VQ-VAE (van den Oord et al. 2017), in Flax linen.

    z (..., D) -> k = argmin_k ||z - e_k||^2 (...,),  z_q = e_k       (minidiff.vq.quantize, on JAX arrays)
    z_st = z + sg(z_q - z)                 straight-through: forward z_q, backward dL/dz := dL/dz_st
    codebook loss    mean (sg(z) - z_q)^2         commitment loss   beta mean (z - sg(z_q))^2    (eq. 3)

``VectorQuantizer(ema=False)`` learns ``params/codebook`` (K, D) by gradient on the codebook loss;
``ema=True`` keeps it in the collection ``"vq_ema"`` (``codebook``, ``cluster_size``, ``embed_sum``),
gives it no gradient (codebook loss 0) and moves it with ``minidiff.vq.ema_update`` when called as
``vq.apply(variables, z, update=True, mutable=["vq_ema"])``.  Tokens -> vectors:
``vq.apply(variables, indices, method=VectorQuantizer.lookup)``.

``GumbelQuantizer`` is DALL-E's alternative (the dVAE): logits over the codes instead of a vector,
trained through a Gumbel-softmax relaxation instead of straight-through.  Lesson 5.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..vq import ema_update, quantize

sg = jax.lax.stop_gradient


def uniform_codebook_init(key, shape, dtype=jnp.float32):
    """e_k ~ U(-1/K, 1/K), as in the VQ-VAE reference code (shape (K, D))."""
    K = shape[0]
    return jax.random.uniform(key, shape, dtype, -1.0 / K, 1.0 / K)


class VectorQuantizer(nn.Module):
    """Nearest-code quantization with a straight-through gradient.

    ``__call__(z, update=False)`` with z (..., dim) returns ``(z_st, indices, aux)``: z_st (..., dim),
    indices (...,) int32, aux a dict of scalars "codebook_loss", "commitment_loss" and "loss"
    (their sum; add it to the reconstruction loss).

    In EMA mode the statistics start as if every code had been seen once at its initial position:
    cluster_size n_k = 1 and embed_sum m_k = e_k, so e_k = m_k / n_k' is (up to the eps smoothing)
    the initial codebook and a code that the first batch does not use stays where it was.  (With
    m_k = 0 every unused code would jump to 0 on the first update.)  ``update`` is ignored when
    ``ema=False`` and during ``init``.
    """

    num_codes: int = 512  # K
    dim: int = 32  # D
    beta: float = 0.25  # commitment weight
    ema: bool = False
    decay: float = 0.99  # gamma of the EMA
    eps: float = 1e-5  # Laplace smoothing of the cluster sizes

    def setup(self):
        K, D = self.num_codes, self.dim
        if self.ema:
            self.ema_codebook = self.variable(
                "vq_ema", "codebook", lambda: uniform_codebook_init(self.make_rng("params"), (K, D)))
            self.cluster_size = self.variable("vq_ema", "cluster_size", lambda: jnp.ones((K,), jnp.float32))
            self.embed_sum = self.variable("vq_ema", "embed_sum", lambda: self.ema_codebook.value)
        else:
            self.codebook = self.param("codebook", uniform_codebook_init, (K, D))

    def get_codebook(self):
        """The codebook e (K, D); in EMA mode behind a stop_gradient (it is not learned by gradients)."""
        return sg(self.ema_codebook.value) if self.ema else self.codebook

    def lookup(self, indices):
        """e_k for integer indices k (...,): returns (..., D).  Out-of-range indices are clamped by JAX."""
        return self.get_codebook()[jnp.asarray(indices)]

    def __call__(self, z, update: bool = False):
        z = jnp.asarray(z)
        indices, z_q = quantize(z, self.get_codebook())  # k = argmin_k ||z - e_k||^2,  z_q = e_k
        if self.ema:
            if update and not self.is_initializing():
                if not self.is_mutable_collection("vq_ema"):
                    raise ValueError("update=True writes the EMA codebook: call apply(..., mutable=['vq_ema'])")
                n, m, e = ema_update(self.cluster_size.value, self.embed_sum.value, sg(z), indices,
                                     self.decay, self.eps)
                self.cluster_size.value, self.embed_sum.value, self.ema_codebook.value = n, m, e
            codebook_loss = jnp.zeros((), z_q.dtype)
        else:
            codebook_loss = jnp.mean((sg(z) - z_q) ** 2)  # ||sg(z) - e||^2
        commitment_loss = self.beta * jnp.mean((z - sg(z_q)) ** 2)  # beta ||z - sg(e)||^2
        z_st = z + sg(z_q - z)  # straight-through estimator
        aux = {"codebook_loss": codebook_loss, "commitment_loss": commitment_loss,
               "loss": codebook_loss + commitment_loss}
        return z_st, indices, aux


class GumbelQuantizer(nn.Module):
    """DALL-E's dVAE bottleneck (Ramesh et al. 2021, sec. 2.1): the encoder gives logits l (..., K) over
    the codes at each position, q = softmax(l).  Training feeds the decoder a relaxed sample

        y = softmax((log q + g) / tau),  g ~ Gumbel(0, 1)        z = sum_k y_k e_k = y @ e

    (``minidiff.vq.gumbel_softmax``; tau is annealed from 1 towards 1/16, where y is nearly one-hot) and
    adds the ELBO's prior term KL(q || uniform) (``minidiff.vq.kl_to_uniform``), weighted by
    ``kl_weight``.  No nearest-neighbour search, no straight-through: the gradient reaches the logits and
    the codebook through the softmax.  Without ``tau`` (evaluation, tokens for the transformer):
    k = argmax_k l_k and z = e_k.

    ``__call__(logits, tau=None, gumbel=None)`` -> ``(z, indices, aux)`` like ``VectorQuantizer``; with a
    tau it draws g from the ``"gumbel"`` rng (``apply(..., rngs={"gumbel": key})``) unless given.
    """

    num_codes: int = 512  # K
    dim: int = 32  # D
    kl_weight: float = 0.01

    def setup(self):
        self.codebook = self.param("codebook", nn.initializers.normal(1.0), (self.num_codes, self.dim))

    def get_codebook(self):
        return self.codebook

    def lookup(self, indices):
        return self.codebook[jnp.asarray(indices)]

    def __call__(self, logits, tau=None, gumbel=None):
        if logits.shape[-1] != self.num_codes:
            raise ValueError(f"logits have shape {tuple(logits.shape)}: the last dimension must be the "
                             f"{self.num_codes} codes")
        log_q = jax.nn.log_softmax(logits.astype(jnp.float32))
        indices = jnp.argmax(log_q, -1)
        if tau is None:
            y = jax.nn.one_hot(indices, self.num_codes, dtype=jnp.float32)
        else:
            g = jax.random.gumbel(self.make_rng("gumbel"), log_q.shape) if gumbel is None else gumbel
            y = jax.nn.softmax((log_q + g) / tau)  # the relaxed one-hot sample
        kl = jnp.mean(jnp.sum(jnp.exp(log_q) * (log_q + jnp.log(self.num_codes)), -1))  # KL(q || 1/K), nats
        return y @ self.codebook, indices, {"kl": kl, "loss": self.kl_weight * kl}
