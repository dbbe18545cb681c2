"""Dask with the local scheduler: the inputs stay where they are computed, whatever their size;
only small iterates (factors, scalars) come back to the client."""

import numpy as np
import pytest

import kronsum as ks

da = pytest.importorskip("dask.array", reason="dask is not installed")
dask = pytest.importorskip("dask")


@pytest.fixture
def computed(monkeypatch):
    """The bytes of every result computed to the client (``dask.compute`` and ``.compute()``)."""
    import dask.base

    sizes = []
    compute = dask.base.compute

    def recording(*args, **kwargs):
        out = compute(*args, **kwargs)
        sizes.append(sum(np.asarray(o).nbytes for o in out))
        return out

    monkeypatch.setattr(dask, "compute", recording)
    monkeypatch.setattr(dask.base, "compute", recording)
    return sizes


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_kfoc_keeps_the_inputs_off_the_client(computed, method):
    rng = np.random.default_rng(0)
    K, m, n = 20_000, 8, 8  # 1.3 MB per input, well below the size of a "large" iterate
    Gn, An = rng.standard_normal((K, m)), rng.standard_normal((K, n))
    G, A = da.from_array(Gn, chunks=(5_000, m)), da.from_array(An, chunks=(5_000, n))
    F = ks.KronSum.from_outer(G, A, check_finite=False)
    P = F.persisted()
    assert P.G.chunks == G.chunks and P.A.chunks == A.chunks  # persisted in place, not gathered
    est = ks.kfoc(F, method=method, tol=1e-10)
    inputs = Gn.nbytes + An.nbytes
    assert computed and max(computed) <= 8 * (m * m + n * n) * 2, max(computed)  # iterates only
    assert sum(computed) < inputs / 20, (sum(computed), inputs)
    ref = ks.kfoc(ks.KronSum.from_outer(Gn, An), method=method, tol=1e-10)
    np.testing.assert_allclose(est.to_dense().compute(), ref.to_dense(), rtol=1e-8, atol=1e-8 * float(ref.scale))
