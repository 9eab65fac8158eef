"""A Gaussian mixture whose optimal noise predictor is known in closed form.

If x0 ~ sum_k w_k N(mu_k, Sigma_k), then x_t = sqrt(ab) x0 + sqrt(1-ab) eps is again a mixture,

    p_t(x) = sum_k w_k N(x; sqrt(ab) mu_k, ab Sigma_k + (1-ab) I),

and the best possible eps-predictor (the one a perfectly trained network converges to) is

    eps*(x_t) = E[eps | x_t] = -sqrt(1 - ab) * grad_x log p_t(x_t)           (Tweedie)
    grad log p_t(x) = sum_k r_k(x) * C_k^{-1} (m_k - x),   r_k = responsibility of component k.

Plugging eps* into a sampler isolates the sampler's own error from any learning error.
"""

from __future__ import annotations

import numpy as np


class GaussianMixture:
    """sum_k w_k N(mu_k, Sigma_k) in d dimensions; points are arrays of shape (n, d)."""

    def __init__(self, weights, means, covariances):
        self.weights = np.asarray(weights, dtype=np.float64)
        self.means = np.atleast_2d(np.asarray(means, dtype=np.float64))
        K, d = self.means.shape
        covs = np.asarray(covariances, dtype=np.float64)
        if covs.ndim == 1:  # one variance per component (isotropic, or 1-D)
            covs = covs[:, None, None] * np.eye(d)
        self.covariances = covs
        if self.weights.shape != (K,) or covs.shape != (K, d, d):
            raise ValueError(f"need K weights, (K, d) means and (K, d, d) covariances; got {self.weights.shape}, "
                             f"{self.means.shape}, {covs.shape}")
        if not np.isclose(self.weights.sum(), 1.0) or np.any(self.weights <= 0):
            raise ValueError("mixture weights must be positive and sum to 1")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, rng: np.random.Generator):
        """n points and the component each came from."""
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        L = np.linalg.cholesky(self.covariances)
        z = rng.standard_normal((n, self.dim))
        return self.means[k] + np.einsum("nij,nj->ni", L[k], z), k

    def noised(self, alpha_bar_t: float) -> "GaussianMixture":
        """The marginal p_t of x_t = sqrt(ab) x0 + sqrt(1-ab) eps."""
        ab = float(alpha_bar_t)
        return GaussianMixture(self.weights, ab**0.5 * self.means, ab * self.covariances + (1 - ab) * np.eye(self.dim))

    def _log_joint(self, x):
        """log(w_k N(x; mu_k, Sigma_k)) for every point and component, and the precisions C_k^{-1}."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.dim)
        prec = np.linalg.inv(self.covariances)  # (K, d, d)
        diff = x[:, None, :] - self.means[None]  # (n, K, d)
        maha = np.einsum("nki,kij,nkj->nk", diff, prec, diff)
        _, logdet = np.linalg.slogdet(self.covariances)
        log_joint = np.log(self.weights) - 0.5 * (maha + logdet + self.dim * np.log(2 * np.pi))
        return log_joint, prec, diff

    def log_prob(self, x):
        lj, _, _ = self._log_joint(x)
        m = lj.max(axis=1, keepdims=True)
        return (m + np.log(np.exp(lj - m).sum(axis=1, keepdims=True)))[:, 0]

    def responsibilities(self, x):
        """r_k(x) = p(component k | x), shape (n, K)."""
        lj, _, _ = self._log_joint(x)
        r = np.exp(lj - lj.max(axis=1, keepdims=True))
        return r / r.sum(axis=1, keepdims=True)

    def score(self, x):
        """grad_x log p(x) = sum_k r_k(x) Sigma_k^{-1} (mu_k - x)."""
        lj, prec, diff = self._log_joint(x)
        r = np.exp(lj - lj.max(axis=1, keepdims=True))
        r /= r.sum(axis=1, keepdims=True)
        return -np.einsum("nk,kij,nkj->ni", r, prec, diff).reshape(np.shape(x))

    def eps_oracle(self, x_t, alpha_bar_t):
        """The exact E[eps | x_t] = -sqrt(1 - ab) grad log p_t(x_t)."""
        return -((1 - alpha_bar_t) ** 0.5) * self.noised(alpha_bar_t).score(x_t)
