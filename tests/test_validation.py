"""Bad input raises a clear error naming the argument and the shapes; inputs are never mutated."""

import numpy as np
import pytest

import kronsum as ks


def test_shape_errors_name_argument_and_shapes():
    with pytest.raises(ValueError, match=r"G must have shape \(K, m\).*\(3, 2, 2\)"):
        ks.KronSum.from_outer(np.ones((3, 2, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"same number of samples K.*\(3, 2\).*\(4, 2\)"):
        ks.KronSum.from_outer(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"same number of positions T"):
        ks.KronSum.from_conv(np.ones((3, 5, 2)), np.ones((3, 4, 2)))
    with pytest.raises(ValueError, match=r"L must have shape \(K, m, m\) with square terms"):
        ks.KronSum.from_terms(np.ones((3, 2, 3)), np.ones((3, 2, 2)))
    with pytest.raises(ValueError, match=r"same number of terms K"):
        ks.KronSum.from_terms(np.ones((3, 2, 2)), np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match=r"weights must have shape \(K,\) = \(3,\)"):
        ks.KronSum.from_outer(np.ones((3, 2)), np.ones((3, 2)), np.ones(4))


def test_empty_batch():
    with pytest.raises(ValueError, match=r"G must not be empty.*\(0, 3\)"):
        ks.KronSum.from_outer(np.ones((0, 3)), np.ones((0, 2)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(bad):
    G = np.ones((3, 2))
    G[1, 1] = bad
    with pytest.raises(ValueError, match=r"G of shape \(3, 2\) contains NaN or infinite"):
        ks.KronSum.from_outer(G, np.ones((3, 2)))
    F = ks.KronSum.from_outer(G, np.ones((3, 2)), check_finite=False)  # opt-out is honoured
    assert F.num_terms == 3
    with pytest.raises(ValueError, match="weights"):
        ks.KronSum.from_outer(np.ones((3, 2)), np.ones((3, 2)), np.array([1.0, bad, 1.0]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_non_finite_on_every_backend(backend, dtype):
    """The finiteness check (on PyTorch one sum as a screen) catches NaN, ±inf and inf − inf,
    and does not mistake finite entries whose sum overflows for non-finite ones."""
    big = float(np.finfo(dtype).max) / 2
    for bad in (np.nan, np.inf, -np.inf, "both"):
        G = np.ones((4, 3))
        if bad == "both":  # the sum is NaN, not inf
            G[0, 0], G[2, 1] = np.inf, -np.inf
        else:
            G[1, 2] = bad
        with pytest.raises(ValueError, match=r"G of shape \(4, 3\) contains NaN or infinite"):
            ks.KronSum.from_outer(backend.asarray(G, dtype), backend.asarray(np.ones((4, 2)), dtype))
    G = np.full((4, 3), big)  # every entry finite, their sum is not
    F = ks.KronSum.from_outer(backend.asarray(G, dtype), backend.asarray(np.ones((4, 2)), dtype))
    assert F.num_terms == 4
    w = np.ones(4)
    w[3] = np.nan
    with pytest.raises(ValueError, match="weights"):
        ks.KronSum.from_outer(backend.asarray(np.ones((4, 3)), dtype),
                              backend.asarray(np.ones((4, 2)), dtype), backend.asarray(w, dtype))


def test_dtypes():
    with pytest.raises(TypeError, match=r"G must have a real floating dtype.*integer"):
        ks.KronSum.from_outer(np.ones((3, 2), dtype=np.int64), np.ones((3, 2)))
    with pytest.raises(TypeError, match=r"A must have a real floating dtype.*complex"):
        ks.KronSum.from_outer(np.ones((3, 2)), np.ones((3, 2), dtype=np.complex128))
    with pytest.raises(TypeError, match="array-API"):
        ks.KronSum.from_outer([[1.0, 2.0]], np.ones((1, 2)))
    with pytest.raises(TypeError, match="KronSum"):
        ks.kfoc(np.ones((4, 4)))


def test_negative_weights_refused():
    with pytest.raises(ValueError, match="non-negative"):
        ks.KronSum.from_outer(np.ones((2, 2)), np.ones((2, 2)), np.array([1.0, -1.0]))
    # a NaN beside the negative weight (the NaN check skipped) does not hide it
    with pytest.raises(ValueError, match="non-negative"):
        ks.KronSum.from_outer(np.ones((3, 2)), np.ones((3, 2)), np.array([1.0, np.nan, -1.0]),
                              check_finite=False)


def test_mixed_precision_promotes():
    F = ks.KronSum.from_outer(np.ones((2, 2), np.float32), np.ones((2, 3), np.float64))
    assert F.dtype == np.float64


def test_estimator_argument_errors():
    F = ks.KronSum.from_conv(np.ones((2, 3, 2)), np.ones((2, 3, 2)))
    with pytest.raises(ValueError, match="method"):
        ks.kfoc(F, method="svd")
    with pytest.raises(ValueError, match="gram.*conv"):
        ks.kfoc(F + ks.KronSum.from_outer(np.ones((2, 2)), np.ones((2, 2))), method="gram")
    with pytest.raises(ValueError, match="tol"):
        ks.kfoc(F, tol=-1.0)
    with pytest.raises(ValueError, match="max_iter"):
        ks.kfoc(F, max_iter=0)
    with pytest.raises(ValueError, match="init"):
        ks.kfoc(F, init="zeros")
    with pytest.raises(ValueError, match="init has factors"):
        ks.kfoc(F, init=ks.Kron(np.eye(3), np.eye(2)))
    with pytest.raises(ValueError, match="variant"):
        ks.tkfac(F, variant="x")
    with pytest.raises(ValueError, match=r"\(m, n\) = \(2, 2\)"):
        ks.frobenius_error(F, ks.Kron(np.eye(3), np.eye(2)))
    with pytest.raises(ValueError, match=r"max_elements"):
        ks.nearest_kronecker(F, max_elements=10)


@pytest.mark.parametrize("form", ["terms", "outer", "conv"])
def test_inputs_never_mutated(form):
    from conftest import random_inputs

    arrays = random_inputs(form, 5, 3, 2, seed=0)
    w = np.linspace(0.5, 1.5, 5)
    copies = [a.copy() for a in arrays] + [w.copy()]
    F = getattr(ks.KronSum, f"from_{form}")(*arrays, w)
    for est in (ks.kfac(F), ks.tkfac(F), ks.kfoc(F), ks.kfoc(F, method="power"), ks.nearest_kronecker(F)):
        ks.frobenius_error(F, est)
        ks.frobenius_error(F, est, method="gram")
    for a, c in zip(list(arrays) + [w], copies):
        assert np.array_equal(a, c)


def test_dense_views_refuse_huge_sizes():
    F = ks.KronSum.from_outer(np.ones((2, 100)), np.ones((2, 100)))
    with pytest.raises(ValueError, match=r"dense F .* max_elements"):
        F.to_dense()
    with pytest.raises(ValueError, match=r"rearranged matrix .* max_elements"):
        F.rearranged()
    with pytest.raises(ValueError, match=r"dense Kron .* max_elements"):
        ks.kfac(F).to_dense()
    small = ks.KronSum.from_outer(np.ones((2, 3)), np.ones((2, 2)))
    assert small.to_dense(max_elements=36).shape == (6, 6)
    with pytest.raises(ValueError, match="max_elements=35"):
        small.to_dense(max_elements=35)


def test_mixed_libraries_named():
    torch = pytest.importorskip("torch")
    G = torch.ones((3, 2), dtype=torch.float64)
    with pytest.raises(TypeError, match=r"G is torch.Tensor, A is numpy.ndarray"):
        ks.KronSum.from_outer(G, np.ones((3, 2)))
    with pytest.raises(TypeError, match=r"weights must be an array of the same library"):
        ks.KronSum.from_outer(G, G, np.ones(3))


def test_half_precision_refused():
    with pytest.raises(TypeError, match="float32 or float64, got float16"):
        ks.KronSum.from_outer(np.ones((3, 2), np.float16), np.ones((3, 2)))


def test_non_finite_statistics_are_not_a_zero_sum():
    G = np.ones((3, 2))
    G[0, 0] = np.nan
    F = ks.KronSum.from_outer(G, np.ones((3, 2)), check_finite=False)
    for method in ("gram", "lanczos", "power"):
        with pytest.raises(ValueError, match="non-finite"):
            ks.kfoc(F, method=method)
