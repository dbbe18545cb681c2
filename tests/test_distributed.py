"""kronsum.adapters.distributed on gloo process groups of 2 and 4 CPU processes: K-FAC, TKFAC,
K-FOC and EKFAC of a sum split over ranks equal the single-process estimates of the gathered sum
(outer, conv and terms forms, uneven splits), every rank returns the same estimate, only m×m /
n×n matrices are all-reduced (counted by ``info.allreduces``), the caller's arrays are not
written, and ranks whose blocks differ get a ValueError on every rank instead of a hang."""

from __future__ import annotations

import hashlib
import os
import tempfile

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - depends on the build
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import kronsum as ks  # noqa: E402
from kronsum.adapters import distributed as ksd  # noqa: E402

TOL = 1e-13  # K-FOC's residual on both sides, so that the answers agree to rounding


def _sums(world: int):
    """Global sums of every form and each rank's share of their terms (uneven splits)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    w = lambda k: torch.rand(k, generator=g, dtype=torch.float64) + 0.1  # noqa: E731
    K = 4 * world + 3  # not a multiple of the world size
    G, A, wo = r(K, 5), r(K, 7), w(K)
    Gc, Ac, wc = r(K, 3, 4), r(K, 3, 6), w(K)
    B = r(K, 3, 3)
    L = B @ B.transpose(1, 2)
    C = r(K, 4, 4)
    R = C @ C.transpose(1, 2)
    wt = w(K)
    return {
        "outer": (ks.KronSum.from_outer, (G, A, wo)),
        "conv": (ks.KronSum.from_conv, (Gc, Ac, wc)),
        "terms": (ks.KronSum.from_terms, (L, R, wt)),
    }


def _digest(est) -> str:
    h = hashlib.sha256()
    arrays = (est.U, est.V, est.S) if isinstance(est, ks.EigenKron) else (est.left, est.right, torch.as_tensor(est.scale))
    for t in arrays:
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _worker(rank: int, world: int, path: str, queue) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
        sizes = []
        reduce = dist.all_reduce

        def counting(t, *args, **kwargs):  # the communication volume, as the group sees it
            sizes.append(t.numel())
            return reduce(t, *args, **kwargs)

        dist.all_reduce = counting
        out = {}
        for form, (make, arrays) in _sums(world).items():
            full = make(*arrays)
            local_arrays = [a[rank::world] for a in arrays]
            before = [a.clone() for a in local_arrays]
            local = make(*local_arrays)
            refs = {"kfac": ks.kfac(full), "tkfac": ks.tkfac(full),
                    "kfoc": ks.kfoc(full, tol=TOL, accuracy=None, method="lanczos"),
                    "ekfac": ks.ekfac(full)}
            for name, ref in refs.items():
                sizes.clear()
                est = getattr(ksd, name)(local, tol=TOL) if name == "kfoc" else getattr(ksd, name)(local)
                D, Dr = est.to_dense(), ref.to_dense()
                tr = (lambda e: float(e.trace())) if name == "ekfac" else (lambda e: float(e.scale))  # noqa: E731
                out[form, name] = dict(
                    err=float((D - Dr).abs().max() / Dr.abs().max()),
                    scale_err=abs(tr(est) - tr(ref)) / abs(tr(ref)),
                    allreduces=est.info.allreduces, calls=len(sizes), largest=max(sizes),
                    mn=(full.m, full.n), digest=_digest(est),
                    unchanged=all(torch.equal(a, b) for a, b in zip(local_arrays, before)),
                    its=est.info.iterations, converged=est.info.converged)
        # opposite scales beyond float64's range in each factor (G·2⁶⁰⁰, A·2⁻⁶⁰⁰) and a
        # moderate F: every rank rescales by the group's powers of two, as one process does
        G, A, wo = _sums(world)["outer"][1]
        G, A = G * 2.0**600, A * 2.0**-600
        for r in range(world):  # the ranks' parts of different magnitudes
            G[r::world] *= 2.0 ** (-40 * r)
        full = ks.KronSum.from_outer(G, A, wo)
        local = ks.KronSum.from_outer(G[rank::world], A[rank::world], wo[rank::world])
        refs = {"tkfac": ks.tkfac(full), "kfoc": ks.kfoc(full, tol=TOL, accuracy=None, method="lanczos"),
                "ekfac": ks.ekfac(full, basis="tkfac")}
        for name, ref in refs.items():
            est = (ksd.kfoc(local, tol=TOL) if name == "kfoc" else
                   ksd.ekfac(local, basis="tkfac") if name == "ekfac" else ksd.tkfac(local))
            D, Dr = est.to_dense(), ref.to_dense()
            out["extreme", name] = float((D - Dr).abs().max() / Dr.abs().max())
        for name in ("kfac",):  # K-FAC's factors themselves are beyond the range: as one process
            try:
                ksd.kfac(local)
                out["extreme", name] = "no error"
            except OverflowError as exc:
                out["extreme", name] = str(exc)
        # a rank whose block has another shape: every rank raises instead of waiting
        G = torch.ones(3, 4 if rank else 5, dtype=torch.float64)
        try:
            ksd.kfoc(ks.KronSum.from_outer(G, torch.ones(3, 2, dtype=torch.float64)))
            out["mismatch"] = None
        except ValueError as exc:
            out["mismatch"] = str(exc)
        queue.put((rank, out))
    except Exception as exc:  # pragma: no cover - reported by the test
        queue.put((rank, repr(exc)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(world: int, target) -> dict:
    """Run ``target(rank, world, path, queue)`` in ``world`` spawned processes; their reports."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    fd, path = tempfile.mkstemp()
    os.close(fd)
    os.remove(path)  # the file store creates it
    procs = [ctx.Process(target=target, args=(r, world, path, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=300) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
    for rank, res in results.items():
        assert isinstance(res, dict), f"rank {rank}: {res}"
    return results


def _training_worker(rank: int, world: int, path: str, queue) -> None:
    """Streaming estimates of split batches, and the Preconditioner under DDP, each against
    one process that sees every sample."""
    try:
        from torch.nn.parallel import DistributedDataParallel

        from kronsum.adapters.torch import Preconditioner

        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
        out = {}
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(12, 5, generator=g, dtype=torch.float64),
                    torch.randn(12, 6, generator=g, dtype=torch.float64)) for _ in range(3)]
        for name in ("kfac", "tkfac", "kfoc_approx", "kfoc_running", "ekfac"):
            extra = {"basis_every": 2} if name == "ekfac" else {}  # a kept and a refreshed basis
            # EKFAC's basis decomposed on the last rank only, broadcast to the others
            split = ksd.RunningEstimate(name, 0.7, kfoc_options={"tol": TOL}, **extra,
                                        **({"basis_rank": world - 1} if name == "ekfac" else {}))
            one = ks.RunningEstimate(name, 0.7, kfoc_options={"tol": TOL, "accuracy": None,
                                                             "method": "lanczos"}, **extra)
            for G, A in batches:
                a = split.update(ks.KronSum.from_outer(G[rank::world], A[rank::world]))
                b = one.update(ks.KronSum.from_outer(G, A))
            out["running", name] = float((a.to_dense() - b.to_dense()).abs().max()
                                         / b.to_dense().abs().max())
        # the preconditioner under DDP against one process with the whole batch
        X = torch.randn(16, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=g)
        for est in ("kfac", "kfoc_running", "ekfac"):
            torch.manual_seed(0)
            make = lambda: torch.nn.Sequential(  # noqa: E731
                torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6), torch.nn.Tanh(),
                torch.nn.Linear(6, 3)).double()
            model, ref = make(), None
            ref = make()
            ref.load_state_dict(model.state_dict())
            ddp = DistributedDataParallel(model)
            loss_fn = torch.nn.CrossEntropyLoss()
            kw = dict(estimator=est, fisher="empirical", update_every=2, damping=0.1,
                      kfoc_options={"tol": TOL})
            pre = Preconditioner(model, loss_fn, group=dist.group.WORLD, **kw)
            pre1 = Preconditioner(ref, loss_fn, **{**kw, "kfoc_options": {
                "tol": TOL, "accuracy": None, "method": "lanczos"}})
            errs = []
            for _ in range(3):
                for net, p, xs, ys in ((ddp, pre, X[rank::world], y[rank::world]), (ref, pre1, X, y)):
                    net.zero_grad()
                    loss_fn(net(xs), ys).backward()
                    p.step(xs, ys)
                for a, b in zip(model.parameters(), ref.parameters()):
                    errs.append(float((a.grad - b.grad).abs().max() / b.grad.abs().max()))
            out["precond", est] = max(errs)
            out["inverted", est] = list(pre.inverted_here)
            out["blocks", est] = sorted(pre.estimates)
        # capture="hooks" under DDP: each rank records its own forward pass through the wrapper
        torch.manual_seed(0)
        model_h = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        ref = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        ref.load_state_dict(model_h.state_dict())
        ddp, loss_h, loss_fn = DistributedDataParallel(model_h), torch.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()
        kw = dict(estimator="kfac", fisher="empirical", update_every=2, damping=0.1)
        pre = Preconditioner(model_h, loss_h, group=dist.group.WORLD, capture="hooks", **kw)
        pre1 = Preconditioner(ref, loss_fn, **kw)
        errs = []
        for _ in range(3):
            ddp.zero_grad()
            loss_h(ddp(X[rank::world]), y[rank::world]).backward()
            pre.step()
            ref.zero_grad()
            loss_fn(ref(X), y).backward()
            pre1.step(X, y)
            for a, b in zip(model_h.parameters(), ref.parameters()):
                errs.append(float((a.grad - b.grad).abs().max() / b.grad.abs().max()))
        out["precond", "hooks"] = max(errs)
        queue.put((rank, out))
    except Exception as exc:  # pragma: no cover - reported by the test
        import traceback

        queue.put((rank, traceback.format_exc() + repr(exc)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_streaming_estimates_and_the_ddp_preconditioner():
    results = _spawn(2, _training_worker)
    for rank, res in results.items():
        for key, err in res.items():
            if key[0] in ("running", "precond"):
                assert err < 1e-9, (rank, key, err)
    # each block's decomposition on one rank (EKFAC: its eigenbasis), every rank some
    for est in ("kfac", "kfoc_running", "ekfac"):
        blocks = results[0]["blocks", est]
        mine = [results[r]["inverted", est] for r in results]
        assert len(blocks) == 3 and sorted(sum(mine, [])) == blocks and all(mine), mine


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_split_sums_give_the_gathered_estimates(world):
    results = _spawn(world, _worker)
    first = results[0]
    for key, r in first.items():
        if key == "mismatch" or key[0] == "extreme":
            continue
        form, name = key
        m, n = r["mn"]
        assert r["err"] < 1e-10 and r["scale_err"] < 1e-10, (key, r)
        assert r["unchanged"], key
        assert r["allreduces"] == r["calls"], key  # every collective is counted
        assert r["largest"] <= m * m + n * n + 6, key  # factors only, never the statistics
        if name == "kfoc":
            assert r["converged"] and r["allreduces"] == 2 * r["its"] + 3, (key, r)
        elif name == "ekfac":  # the K-FAC basis (2) and the corrected eigenvalues S (1)
            assert r["allreduces"] == 3, key
        else:
            assert r["allreduces"] == 2, key
        # the same bits on every rank
        assert len({results[k][key]["digest"] for k in results}) == 1, key
    for rank, res in results.items():
        assert res["mismatch"] is not None and "the ranks' blocks differ" in res["mismatch"], rank
        for name in ("tkfac", "kfoc", "ekfac"):
            assert res["extreme", name] < 1e-10, (rank, name, res["extreme", name])
        assert "kfac" in res["extreme", "kfac"] and "left factor" in res["extreme", "kfac"], res


def test_inputs_that_cannot_be_reduced_are_refused():
    import numpy as np

    F = ks.KronSum.from_outer(np.ones((3, 2)), np.ones((3, 4)))
    with pytest.raises(TypeError, match="kfac: F must hold torch tensors"):
        ksd.kfac(F)
    Ft = ks.KronSum.from_outer(torch.ones(3, 2, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64))
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="no torch.distributed process group"):
            ksd.kfoc(Ft)
    with pytest.raises(TypeError, match="kfoc"):
        ksd.kfoc(np.ones((3, 3)))


def test_a_kron_batch_is_refused_over_a_process_group():
    """Over a group the all-reduce is part of the estimator on each rank's statistics: a
    rank's own K-FAC estimate (a Kron) would be averaged without it, so it is refused."""
    F = ks.KronSum.from_outer(torch.ones((3, 2), dtype=torch.float64),
                              torch.ones((3, 4), dtype=torch.float64))
    run = ksd.RunningEstimate("kfac", 0.9)
    with pytest.raises(TypeError, match="process group"):
        run.update(ks.kfac(F))
    assert run.step == 0


@pytest.mark.parametrize("bad", [-1, 1.0, True, "0"])
def test_basis_rank_must_be_a_rank(bad):
    with pytest.raises(ValueError, match="basis_rank must be a rank of the group"):
        ksd.RunningEstimate("ekfac", 0.9, basis_rank=bad)


def _basis_worker(rank: int, world: int, path: str, queue) -> None:
    """EKFAC's basis is decomposed on its owner rank only: a basis the other ranks could not
    decompose is never decomposed there, and one the owner cannot decompose raises on every
    rank instead of leaving the others waiting in the broadcast."""
    try:
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
        g = torch.Generator().manual_seed(rank)
        F = ks.KronSum.from_outer(torch.randn(6, 3, generator=g, dtype=torch.float64),
                                  torch.randn(6, 4, generator=g, dtype=torch.float64))
        good = ks.Kron(torch.eye(3, dtype=torch.float64) * 2.0, torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64)))
        bad = ks.Kron(torch.triu(torch.ones(3, 3, dtype=torch.float64)), torch.eye(4, dtype=torch.float64))
        out = {}
        est = ksd.ekfac(F, basis=good if rank == 0 else bad)  # owner: rank 0
        out["owner ok"] = _digest(est)
        try:
            ksd.ekfac(F, basis=bad if rank == 0 else good)
            out["owner fails"] = None
        except ValueError as exc:
            out["owner fails"] = str(exc)
        queue.put((rank, out))
    except Exception as exc:  # pragma: no cover - reported by the test
        import traceback

        queue.put((rank, traceback.format_exc() + repr(exc)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_ekfac_basis_is_decomposed_on_its_owner_only():
    results = _spawn(2, _basis_worker)
    assert results[0]["owner ok"] == results[1]["owner ok"]  # rank 1 never decomposed its bad basis
    assert "not symmetric" in results[0]["owner fails"]
    assert "failed on rank 0" in results[1]["owner fails"]
