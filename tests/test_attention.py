"""minidiff.nn.layers.attention, the one attention kernel: against softmax(q k^T / sqrt(d) + mask) v in
NumPy float64, with and without masks, chunked and not, fully masked rows, bfloat16 inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minidiff.nn.layers import attention


def reference(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d) + mask) v in float64; mask: bool, True = may attend (-inf elsewhere)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])  # (B, heads, Lq, Lk)
    if mask is not None:
        s = s + np.where(mask, 0.0, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)  # (B, Lq, heads, d)


def inputs(lq=256, lk=256, heads=3, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, lq, heads, d)).astype(np.float32)
    k, v = (rng.standard_normal((2, lk, heads, d)).astype(np.float32) for _ in range(2))
    return q, k, v


def run(q, k, v, mask=None, chunk=None):
    return np.asarray(jax.jit(lambda q, k, v, m: attention(q, k, v, m, chunk))(q, k, v, mask))


@pytest.mark.parametrize("lk", [256, 77])
@pytest.mark.parametrize("chunk", [None, 64, 100])  # 100 does not divide 256: the last block is padded
def test_matches_the_formula_without_a_mask(lk, chunk):
    q, k, v = inputs(lk=lk)
    np.testing.assert_allclose(run(q, k, v, chunk=chunk), reference(q, k, v), atol=2e-6)


@pytest.mark.parametrize("chunk", [None, 64, 100])
def test_matches_the_formula_with_causal_and_random_masks(chunk):
    q, k, v = inputs()
    causal = np.tril(np.ones((256, 256), bool))  # (Lq, Lk): key j <= query i
    np.testing.assert_allclose(run(q, k, v, causal, chunk), reference(q, k, v, causal), atol=2e-6)

    rng = np.random.default_rng(1)
    mask = rng.random((2, 3, 256, 256)) < 0.3  # (B, heads, Lq, Lk), one per head
    mask[..., 0] = True  # every row keeps a key
    np.testing.assert_allclose(run(q, k, v, mask, chunk), reference(q, k, v, mask), atol=2e-6)

    padding = np.ones((2, 1, 1, 256), bool)  # (B, 1, 1, Lk): the last 50 keys of image 1 are padding
    padding[1, ..., -50:] = False
    np.testing.assert_allclose(run(q, k, v, padding, chunk), reference(q, k, v, padding), atol=2e-6)


def test_chunked_equals_unchunked_for_a_per_row_mask_and_for_one_query():
    q, k, v = inputs(lq=300)
    mask = np.tril(np.ones((300, 256), bool), k=-20)  # rows 0..19 see no key at all
    np.testing.assert_allclose(run(q, k, v, mask, 64), run(q, k, v, mask), atol=1e-6)
    # the DALL-E key-value cache: one query against the whole cache, its (1, Lk) row of the mask
    row = mask[200][None]
    np.testing.assert_allclose(run(q[:, 200:201], k, v, row, 64), run(q, k, v, mask)[:, 200:201], atol=1e-6)


def test_a_fully_masked_row_is_finite_and_leaves_the_others_alone():
    q, k, v = inputs(lq=16, lk=16)
    mask = np.tril(np.ones((16, 16), bool))
    mask[5] = False  # query 5 may attend to nothing
    for chunk in (None, 4):
        out = run(q, k, v, mask, chunk)
        assert np.isfinite(out).all()
        # every masked logit is the same number, so the row's weights are uniform: the mean of v
        np.testing.assert_allclose(out[:, 5], v.mean(axis=1), atol=1e-6)
        keep = np.arange(16) != 5
        np.testing.assert_allclose(out[:, keep], reference(q[:, keep], k, v, mask[keep]), atol=2e-6)


def test_large_logits_do_not_overflow():
    q, k, v = inputs(lq=8, lk=8)
    q = q * 300.0  # logits of order 1e3: exp would overflow without subtracting the row maximum
    out = run(q, k, v, np.tril(np.ones((8, 8), bool)))
    np.testing.assert_allclose(out, reference(q, k, v, np.tril(np.ones((8, 8), bool))), atol=1e-5)


def test_bfloat16_inputs_get_the_softmax_in_float32():
    """Logits near 707 differ by 0.7: bfloat16 (8 significant bits, steps of 4 there) would round them
    to one value and give uniform weights; float32 logits give exp(s_j - max s) exactly."""
    d = 2
    q = np.array([[[[1.0, 1.0]]]])  # (1, 1, 1, 2)
    k = np.array([[[1000.0, j]] for j in range(3)])[None]  # (1, 3, 1, 2): q.k_j = 1000 + j
    v = np.eye(3)[None, :, None, :]  # (1, 3, 1, 3): value j = one-hot j, so out = the weights
    to = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731  (all these numbers are exact in bfloat16)
    out = attention(to(q), to(k), to(v))
    assert out.dtype == jnp.bfloat16
    w = np.exp(np.arange(3) / np.sqrt(d))
    np.testing.assert_allclose(np.asarray(out, np.float32)[0, 0, 0], w / w.sum(), rtol=1e-2)


def test_output_dtype_and_shape():
    q, k, v = inputs(lq=10, lk=7, heads=2, d=4)
    out = attention(jnp.asarray(q, jnp.float16), jnp.asarray(k, jnp.float16), jnp.asarray(v, jnp.float16))
    assert out.shape == (2, 10, 2, 4) and out.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out, np.float32), reference(q, k, v), atol=3e-3)


def test_chunking_bounds_the_memory_of_the_weights():
    """XLA's buffer plan (compiled, not run): with a causal mask the (Lq x Lk) logits are materialised
    (64 MiB here); in blocks of 256 queries only an eighth of them is."""
    x = jax.ShapeDtypeStruct((1, 2048, 4, 16), jnp.float32)
    mask = jax.ShapeDtypeStruct((2048, 2048), jnp.bool_)

    def temp_bytes(chunk):
        f = jax.jit(lambda q, k, v, m: attention(q, k, v, m, chunk))
        analysis = f.lower(x, x, x, mask).compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend gives no memory analysis")
        return analysis.temp_size_in_bytes

    full, chunked = temp_bytes(None), temp_bytes(256)
    assert full > 64 * 2**20 and chunked < full / 4, (full, chunked)


@pytest.mark.parametrize("chunk", [None, 100])
@pytest.mark.parametrize("masked", [False, True])
def test_the_accelerator_kernel_agrees_with_the_reference(monkeypatch, chunk, masked):
    """jax.nn.dot_product_attention's XLA graph (what GPUs in float32 and TPUs run; cuDNN's needs a GPU)
    against the reference kernel that the CPU runs, through the same ``attention`` call."""
    import minidiff.nn.layers as layers

    q, k, v = inputs(lk=77)
    mask = np.tril(np.ones((256, 77), bool), 10)[None, None] if masked else None
    assert layers.attention_implementation(jnp.asarray(q)) == "reference"  # auto on this CPU
    want = run(q, k, v, mask, chunk)
    monkeypatch.setattr(layers, "ATTENTION", "xla")
    got = run(q, k, v, mask, chunk)
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(got, reference(q, k, v, mask), atol=2e-6)


def test_an_unknown_attention_kernel_is_named(monkeypatch):
    import minidiff.nn.layers as layers

    monkeypatch.setattr(layers, "ATTENTION", "flash")
    with pytest.raises(ValueError, match="MINIDIFF_ATTENTION='flash'"):
        attention(*(jnp.zeros((1, 4, 1, 8)),) * 3)


@pytest.mark.parametrize("chunk", [None, 300])
@pytest.mark.parametrize("lk", [1024, 1088])  # 4 blocks of 256; 17 blocks of 64 (gcd(1088, 256) = 64)
def test_the_online_softmax_over_key_blocks_is_the_softmax(chunk, lk):
    """Many keys, no mask: the reference kernel walks the keys in blocks with a running max and sum."""
    import minidiff.nn.layers as layers

    assert layers._key_block(lk) in (256, 64)
    q, k, v = inputs(lq=600, lk=lk)
    np.testing.assert_allclose(run(q, k, v, chunk=chunk), reference(q, k, v), atol=2e-6)
    bf = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    got = np.asarray(jax.jit(lambda q, k, v: attention(q, k, v, chunk_size=chunk))(*bf), np.float32)
    np.testing.assert_allclose(got, reference(*[np.asarray(a, np.float32) for a in bf]), atol=2e-2)


def test_the_row_max_tree_is_max_and_keeps_nans():
    """The online softmax's row maximum, log2(n) elementwise maxima of halves, is ``max`` exactly."""
    import minidiff.nn.layers as layers

    s = np.random.default_rng(0).standard_normal((3, 5, 256)).astype(np.float32)
    s[1, 2, 77] = np.nan
    got = np.asarray(jax.jit(layers._row_max)(s))
    np.testing.assert_array_equal(got, s.max(-1, keepdims=True))  # NaN where the row has one
    assert np.isnan(got[1, 2, 0]) and np.isfinite(np.delete(got.ravel(), 1 * 5 + 2)).all()
