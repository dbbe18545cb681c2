"""Dask arrays chunked along the sample axis, computed on a ``distributed`` cluster of 2 workers."""

import numpy as np
import pytest

import kronsum as ks
from conftest import random_inputs

pytestmark = pytest.mark.slow  # subprocesses, a cluster or a site build: `-m "not slow"` skips them

da = pytest.importorskip("dask.array", reason="dask is not installed")
distributed = pytest.importorskip("distributed", reason="distributed is not installed")


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None, silence_logs=50) as cluster:
        with distributed.Client(cluster) as c:
            yield c


@pytest.mark.parametrize("form", ["outer", "conv"])
def test_same_answer_as_numpy(client, form, caplog):
    arrays = random_inputs(form, 400, 5, 4, T=3, seed=3, kind="heavy")
    w = np.random.default_rng(1).uniform(0.5, 1.5, 400)
    Fnp = getattr(ks.KronSum, f"from_{form}")(*arrays, w)
    chunks = 100  # chunked along K only, as statistics arrive
    Fd = getattr(ks.KronSum, f"from_{form}")(
        *(da.from_array(a, chunks=(chunks,) + a.shape[1:]) for a in arrays), da.from_array(w, chunks=chunks))
    for name, kw in [("kfac", {}), ("tkfac", {}), ("kfoc", {"tol": 1e-13})]:
        got = getattr(ks, name)(Fd, **kw)
        ref = getattr(ks, name)(Fnp, **kw)
        assert isinstance(got.left, da.Array)
        dense = got.to_dense().compute()
        assert np.allclose(dense, ref.to_dense(), rtol=1e-10, atol=1e-10 * np.abs(ref.to_dense()).max()), name
    assert ks.kfoc(Fd).info.method == "kfoc/lanczos"  # no K x K Gram matrix on chunked K
    # the work ran on the cluster's workers
    assert sum(len(v) for v in client.processing().values()) == 0
    assert len(client.scheduler_info()["workers"]) == 2
    # no task key was submitted twice with different definitions (dask's "run_spec" warning)
    assert not [r for r in caplog.records if "run_spec" in r.getMessage()]
