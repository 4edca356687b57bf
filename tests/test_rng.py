"""jaxdfl.rng: the unrolled Threefry stream equals jax.random bit for bit, and falls back where it cannot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scipy import stats

from jaxdfl import rng

M32 = 0xFFFFFFFF


def threefry_numpy(k0: int, k1: int, x0: int, x1: int) -> tuple[int, int]:
    """Threefry-2x32, 20 rounds, from the published definition (Salmon et al. 2011), in Python integers."""
    rot = ((13, 15, 26, 6), (17, 29, 16, 24))
    ks = (k0, k1, k0 ^ k1 ^ 0x1BD11BDA)
    x0, x1 = (x0 + ks[0]) & M32, (x1 + ks[1]) & M32
    for b in range(5):
        for r in rot[b % 2]:
            x0 = (x0 + x1) & M32
            x1 = (((x1 << r) | (x1 >> (32 - r))) & M32) ^ x0
        x0 = (x0 + ks[(b + 1) % 3]) & M32
        x1 = (x1 + ks[(b + 2) % 3] + b + 1) & M32
    return x0, x1


# Known-answer tests of Threefry-2x32-20 from the Random123 distribution (kat_vectors).
KAT = [((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
       ((M32, M32), (M32, M32), (0x1CB996FC, 0xBB002BE7)),
       ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]


@pytest.mark.parametrize("key,counter,expected", KAT)
def test_threefry_known_answers(key, counter, expected):
    y = rng.threefry2x32(*(jnp.uint32(v) for v in key + counter))
    assert (int(y[0]), int(y[1])) == expected
    assert threefry_numpy(*key, *counter) == expected


def test_threefry_matches_numpy_reference_on_random_words():
    words = np.random.default_rng(0).integers(0, 2**32, size=(4, 50), dtype=np.uint64).astype(np.uint32)
    y0, y1 = jax.jit(rng.threefry2x32)(*(jnp.asarray(w) for w in words))
    for i in range(words.shape[1]):
        assert (int(y0[i]), int(y1[i])) == threefry_numpy(*(int(w[i]) for w in words))


SHAPES = [(), (1,), (7,), (3, 1000), (5, 7, 11)]


@pytest.mark.parametrize("name", ["normal", "laplace"])
@pytest.mark.parametrize("shape", SHAPES)
def test_draws_equal_jax_random_bit_for_bit(name, shape):
    for seed in (0, 1, 2**31 + 5):
        key = jax.random.fold_in(jax.random.key(seed), 3)
        want = np.asarray(getattr(jax.random, name)(key, shape))
        got = np.asarray(jax.jit(lambda k: getattr(rng, name)(k, shape))(key))
        assert got.dtype == want.dtype == np.float32 and got.shape == shape
        np.testing.assert_array_equal(got, want)


def test_shape_forms_as_jax_random_takes_them():
    key = jax.random.key(5)
    for shape in (5, (0, 3), [2, 3], np.array([4])):
        for name in ("normal", "laplace"):
            np.testing.assert_array_equal(np.asarray(getattr(rng, name)(key, shape)),
                                          np.asarray(getattr(jax.random, name)(key, shape)))


def test_vmapped_keys_equal_jax_random():
    keys = jax.random.split(jax.random.key(4), 6)
    want = jax.vmap(lambda k: jax.random.normal(k, (257,)))(keys)
    got = jax.jit(jax.vmap(lambda k: rng.normal(k, (257,))))(keys)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_fast_path_is_unrolled():
    """The point of the module: no while loop (jax's rolled CPU Threefry) in the compiled draw."""
    hlo = jax.jit(lambda k: rng.normal(k, (4, 8))).lower(jax.random.key(0)).as_text()
    assert "while" not in hlo


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_other_dtypes_fall_back_to_jax_random(dtype):
    key = jax.random.key(9)
    for name in ("normal", "laplace"):
        got = getattr(rng, name)(key, (5, 3), dtype)
        assert got.dtype == dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32),
                                      np.asarray(getattr(jax.random, name)(key, (5, 3), dtype), np.float32))


def test_other_key_implementations_fall_back_to_jax_random():
    key = jax.random.key(9, impl="rbg")
    np.testing.assert_array_equal(np.asarray(rng.normal(key, (4, 5))), np.asarray(jax.random.normal(key, (4, 5))))



@pytest.mark.parametrize("draw, dist", [(rng.dp_normal, "norm"), (rng.dp_laplace, "laplace")])
def test_dp_draws_follow_their_distribution(draw, dist):
    x = np.asarray(draw(jax.random.key(7), (200_000,)))
    assert x.dtype == np.float32
    assert stats.kstest(x, dist).pvalue > 1e-3
    np.testing.assert_array_equal(x, np.asarray(draw(jax.random.key(7), (200_000,))))  # same key, same draws
    assert not np.allclose(x, np.asarray(draw(jax.random.key(8), (200_000,))))


def test_dp_draws_reach_far_tails():
    """jax.random's float32 normal never leaves [-5.42, 5.22] (23 uniform bits): an output beyond that reach
    reveals the example that shifted the noise. The DP draws' rarest words (probability 2^-88) reach 9.2 sigma
    and 45 Laplace scales, both signs."""
    assert np.abs(np.asarray(jax.random.normal(jax.random.key(0), (1 << 20,)))).max() < 5.5
    normal, laplace = jax.jit(rng.normal_from_words), jax.jit(rng.laplace_from_words)  # one compile per shape
    zero = jnp.zeros(2, jnp.uint32)
    sign_mantissa = jnp.asarray([0, 1 << 31], jnp.uint32)
    np.testing.assert_allclose(normal(sign_mantissa, zero, zero), [9.2298, -9.2298], rtol=1e-4)
    np.testing.assert_allclose(laplace(sign_mantissa, zero, zero), [45.0546, -45.0546], rtol=1e-4)
    # the DP draws' fourth word and the 8 spare bits of the first extend the binade choice to 104 bits: tails to
    # 11.84 sigma and 72.8 scales (probability 2^-105), the draws unchanged unless the first 64 bits are all zero
    np.testing.assert_allclose(normal(sign_mantissa, zero, zero, zero), [11.8386, -11.8386],
                               rtol=1e-4)
    np.testing.assert_allclose(laplace(sign_mantissa, zero, zero, zero), [72.7805, -72.7805],
                               rtol=1e-4)
    x = normal(jnp.uint32(1 << 30), jnp.uint32(0), jnp.uint32(0), jnp.uint32(1 << 5))  # k = 64 + 26
    assert float(x) == pytest.approx(stats.norm.isf(2.0**-92), rel=1e-4)
    words = [jnp.asarray(w) for w in np.random.default_rng(0).integers(0, 2**32, (4, 10_000), dtype=np.uint32)]
    np.testing.assert_array_equal(normal(*words), normal(*words[:3]))
    # 40 leading zero bits (the high word 0, 8 in the low word): P(N > x) = 2^-(40 + 2)
    x = normal(jnp.uint32(0), jnp.uint32(0), jnp.uint32(1 << 23))
    assert float(x) == pytest.approx(stats.norm.isf(2.0**-42), rel=1e-4)
