"""The PyTorch Preconditioner: refreshes, damped solves against dense references, KL clipping,
damping schedules, checkpoints and errors, with torch.optim optimisers."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch adapter needs torch")

from torch import nn  # noqa: E402

import kronsum as ks  # noqa: E402
from kronsum.adapters import torch as kt  # noqa: E402

DT = torch.float64


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(16, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (16,), generator=g)
    return model, X, y


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _block(model, name, grads):
    return torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"][:, None]], 1)


@pytest.mark.parametrize("estimator", ["kfac", "kfoc_running", "ekfac"])
def test_first_step_is_the_damped_solve_of_the_batch_estimate(estimator):
    model, X, y = _setup()
    loss_fn = nn.CrossEntropyLoss()
    pre = kt.Preconditioner(model, loss_fn, estimator=estimator, fisher="empirical", damping=0.1)
    blocks = kt.collect(model, loss_fn, X, y, fisher="empirical")
    make = {"kfac": ks.kfac, "kfoc_running": ks.kfoc, "ekfac": ks.ekfac}[estimator]
    est = {k: make(F) for k, F in blocks.items()}
    loss_fn(model(X), y).backward()
    before = _grads(model)
    pre.step(X, y)
    after = _grads(model)
    for name, e in est.items():
        V = _block(model, name, before)
        want = torch.linalg.solve(e.to_dense() + 0.1 * torch.eye(e.m * e.n, dtype=DT), V.reshape(-1))
        got = _block(model, name, after).reshape(-1)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-7, atol=1e-9 * float(want.abs().max()))


def test_refreshes_follow_update_every_and_inverses_are_reused():
    model, X, y = _setup(1)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pre = kt.Preconditioner(model, loss_fn, estimator="kfac", update_every=3, damping=1e-2)
    seen = []
    for step in range(7):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        seen.append(pre.due())
        pre.step(X if pre.due() else None, y)  # the batch only where a refresh is due
        opt.step()
    assert seen == [True, False, False, True, False, False, True]
    assert pre.steps == 7 and pre.refreshes == 3
    assert all(r.num_updates == 3 for r in pre._running.values())
    with pytest.raises(ValueError, match="pass the batch"):
        pre.steps = 9
        loss_fn(model(X), y).backward()
        pre.step()


def test_training_with_adam_and_a_damping_schedule_reduces_the_loss():
    model, X, y = _setup(2)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    lams = []
    pre = kt.Preconditioner(model, loss_fn, estimator="kfoc_running", update_every=2,
                            damping=lambda t: lams.append(t) or 1e-1 / (1 + t))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        pre.step(X, y)
        opt.step()
        losses.append(loss.item())
    assert lams == list(range(30)) and all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0]


def test_kl_clipping_bounds_the_step():
    model, X, y = _setup(3)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    pre = kt.Preconditioner(model, loss_fn, estimator="kfac", damping=1e-3, kl_clip=1e-3)
    loss_fn(model(X), y).backward()
    before = _grads(model)
    with pytest.raises(ValueError, match="learning rate"):
        pre.step(X, y)
    pre.step(X, y, lr=1.0)
    after = _grads(model)
    nu = pre.last_scale
    assert 0 < nu < 1
    # lr²·⟨νP∇, ∇⟩·ν = kl_clip: the clipped step's predicted KL sits at the bound
    quad = sum(float((after[k] * before[k]).sum()) for k in before) / nu
    assert quad * nu * nu == pytest.approx(1e-3, rel=1e-9)


def test_state_dict_round_trip_gives_the_same_step():
    model, X, y = _setup(4)
    loss_fn = nn.CrossEntropyLoss()
    pre = kt.Preconditioner(model, loss_fn, estimator="kfoc_approx", update_every=5, damping=0.05)
    loss_fn(model(X), y).backward()
    pre.step(X, y)
    state = pre.state_dict()
    model.zero_grad()
    loss_fn(model(X), y).backward()
    g0 = _grads(model)
    pre.step()
    want = _grads(model)
    other = kt.Preconditioner(model, loss_fn, estimator="kfoc_approx", update_every=5, damping=0.05)
    other.load_state_dict(state)
    for k, p in model.named_parameters():
        p.grad.copy_(g0[k])
    other.step()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[k], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="estimator"):
        kt.Preconditioner(model, loss_fn, estimator="kfac").load_state_dict(state)


def test_hooks_capture_resumes_from_a_checkpoint_at_the_refresh_it_is_due():
    """capture='hooks' keeps its hooks on the model only while a refresh is next: a
    preconditioner restored mid-interval records nothing until its own next refresh, and
    then records that step's pass."""
    model, X, y = _setup(4)
    loss_fn = nn.CrossEntropyLoss()
    pre = kt.Preconditioner(model, loss_fn, estimator="kfac", update_every=3, damping=0.1,
                            capture="hooks")
    for _ in range(2):  # a refresh at step 0, then step 1
        model.zero_grad()
        loss_fn(model(X), y).backward()
        pre.step()
    state = pre.state_dict()
    pre.remove()
    other = kt.Preconditioner(model, loss_fn, estimator="kfac", update_every=3, damping=0.1,
                              capture="hooks")
    assert len(model._forward_pre_hooks) == 1  # step 0 of a fresh one is a refresh
    other.load_state_dict(state)  # step 2: not a refresh
    assert len(model._forward_pre_hooks) == 0 and len(loss_fn._forward_hooks) == 0
    model.zero_grad()
    loss_fn(model(X), y).backward()
    other.step()
    assert other.refreshes == 1 and len(model._forward_pre_hooks) == 1  # step 3 refreshes
    model.zero_grad()
    loss_fn(model(X), y).backward()
    other.step()
    assert other.refreshes == 2 and len(model._forward_pre_hooks) == 0
    other.update_every = 1  # set by hand: the next step refreshes, and its pass is recorded
    assert len(model._forward_pre_hooks) == 1
    model.zero_grad()
    loss_fn(model(X), y).backward()
    other.step()
    assert other.refreshes == 3
    with pytest.raises(ValueError, match="update_every"):
        other.update_every = 0


def test_errors_are_clear_and_leave_gradients_alone():
    model, X, y = _setup(5)
    loss_fn = nn.CrossEntropyLoss()
    for kw, match in ((dict(estimator="svd"), "estimator"), (dict(fisher="type-2"), "fisher"),
                      (dict(update_every=0), "update_every"), (dict(damping=-1.0), "damping"),
                      (dict(damping_method="ridge"), "damping_method"), (dict(kl_clip=0.0), "kl_clip")):
        with pytest.raises(ValueError, match=match):
            kt.Preconditioner(model, loss_fn, **kw)
    with pytest.raises(TypeError, match="loss_fn"):
        kt.Preconditioner(model, nn.L1Loss())
    pre = kt.Preconditioner(model, loss_fn, fisher="empirical")
    Xn = X.clone()
    Xn[0, 0] = float("nan")
    loss_fn(model(X), y).backward()
    before = _grads(model)
    with pytest.raises(ValueError, match="NaN or inf"):
        pre.step(Xn, y)
    assert pre.steps == 0 and pre.refreshes == 0
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, before[k], rtol=0, atol=0)
    pre.step(X, y)
    model[0].weight.grad[0, 0] = float("inf")
    before = _grads(model)
    with pytest.raises(ValueError, match="NaN or inf"):
        pre.step()
    for k, p in model.named_parameters():  # nothing written, not even the other blocks
        torch.testing.assert_close(p.grad, before[k], rtol=0, atol=0, equal_nan=True)

    def refreshed_then_filled(damping, value):  # a refresh, then every gradient set to value
        pre = kt.Preconditioner(model, loss_fn, fisher="empirical", damping=damping)
        model.zero_grad()
        loss_fn(model(X), y).backward()
        pre.step(X, y)
        with torch.no_grad():
            for p in model.parameters():
                p.grad.fill_(value)
        return pre, _grads(model)

    # finite gradients whose preconditioned values overflow: named, nothing written
    pre, before = refreshed_then_filled(1e-300, 1e300)
    with pytest.raises(ValueError, match="overflows"):
        pre.step()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, before[k], rtol=0, atol=0)
    # finite preconditioned gradients whose sum alone is beyond the range: written, no error
    pre, before = refreshed_then_filled(1.0, 1e307)
    pre.step()
    e = pre.estimates["0"]
    want = torch.linalg.solve(e.to_dense() + torch.eye(e.m * e.n, dtype=DT),
                              _block(model, "0", before).reshape(-1))
    got = _block(model, "0", _grads(model)).reshape(-1)
    every = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.isfinite(every).all() and float(every.sum()) == float("inf")
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10)


def test_ekfac_refreshes_its_basis_every_basis_every_and_round_trips():
    model, X, y = _setup(4)
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="damping_method='exact' only"):
        kt.Preconditioner(model, loss_fn, estimator="ekfac", damping_method="factored")
    with pytest.raises(ValueError, match="basis_every"):
        kt.Preconditioner(model, loss_fn, estimator="kfac", basis_every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pre = kt.Preconditioner(model, loss_fn, estimator="ekfac", fisher="empirical", update_every=1,
                            decay=0.5, basis_every=2, damping=1e-2)
    bases = []
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        pre.step(X, y)
        opt.step()
        bases.append(pre.estimates["0"].U.clone())
    assert isinstance(pre.estimates["0"], ks.EigenKron)
    assert torch.equal(bases[0], bases[1]) and not torch.equal(bases[1], bases[2])
    # a restored preconditioner takes the same next step
    other = kt.Preconditioner(model, loss_fn, estimator="ekfac", fisher="empirical", update_every=1,
                              decay=0.5, basis_every=2, damping=1e-2)
    other.load_state_dict(pre.state_dict())
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    g0 = _grads(model)
    pre.step(X, y)
    a = _grads(model)
    for k, p in model.named_parameters():
        p.grad.copy_(g0[k])
    other.step(X, y)
    b = _grads(model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=0)


@pytest.mark.parametrize("capture", ["batch", "hooks"])
def test_unfreezing_a_layer_adds_its_block_at_the_next_refresh(capture):
    """Gradual unfreezing: a layer frozen at the first refresh is covered from the refresh after
    it trains again, and its gradient is then preconditioned (the damped solve of its block);
    with either capture (the hooks' cached coverage follows the change)."""
    model, X, y = _setup()
    loss_fn = nn.CrossEntropyLoss()
    model[0].requires_grad_(False)
    pre = kt.Preconditioner(model, loss_fn, estimator="kfac", fisher="empirical", update_every=1,
                            damping=0.1, capture=capture)
    batch = (X, y) if capture == "batch" else ()
    loss_fn(model(X), y).backward()
    pre.step(*batch)
    assert set(pre.estimates) == {"2"}
    model.zero_grad()
    model[0].requires_grad_(True)
    loss_fn(model(X), y).backward()
    before = _grads(model)
    pre.step(*batch)
    assert set(pre.estimates) == {"0", "2"}
    e = pre.estimates["0"]
    want = torch.linalg.solve(e.to_dense() + 0.1 * torch.eye(e.m * e.n, dtype=DT),
                              _block(model, "0", before).reshape(-1))
    np.testing.assert_allclose(_block(model, "0", _grads(model)).reshape(-1).numpy(), want.numpy(),
                               rtol=1e-7, atol=1e-9 * float(want.abs().max()))


class _Scaled(nn.Module):
    """y = W (2x) + b: a layer no built-in rule covers."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in, dtype=DT) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(n_out, dtype=DT))

    def forward(self, x):
        return (2 * x) @ self.weight.T + self.bias


def test_hooks_capture_follows_a_layer_rule_registered_between_refreshes():
    """A custom layer registered (or unregistered) after some refreshes is covered (or left
    out) from the next refresh on: the cached coverage of capture='hooks' is not stale."""
    torch.manual_seed(0)
    model = nn.Sequential(_Scaled(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    X, y = torch.randn(16, 5, dtype=DT), torch.randint(0, 3, (16,))
    loss_fn = nn.CrossEntropyLoss()
    pre = kt.Preconditioner(model, loss_fn, estimator="kfac", fisher="empirical", update_every=1,
                            damping=0.1, capture="hooks")

    def step():
        model.zero_grad()
        with pytest.warns(kt.UncoveredParametersWarning) if "0" not in kt.coverage(model).layers \
                else _no_warning():
            loss_fn(model(X), y).backward()
        pre.step()
        return set(pre.estimates)

    assert step() == {"2"}
    kt.register_layer(_Scaled, lambda mod, args, out: 2 * args[0][:, None, :])
    try:
        assert step() == {"0", "2"}
        F = kt.collect(model, loss_fn, X, y, fisher="empirical")["0"]
        torch.testing.assert_close(pre.estimates["0"].to_dense(), ks.kfac(F).to_dense())
    finally:
        kt.unregister_layer(_Scaled)
    assert step() == {"2"}


class _no_warning:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error", kt.UncoveredParametersWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def _train(model, loss_fn, pre, batches, *, capture, opt_lr=0.05, loss_call=None):
    """SGD steps preconditioned by ``pre``; the batch goes to step() only with capture='batch'."""
    opt = torch.optim.SGD(model.parameters(), lr=opt_lr)
    call = loss_call or (lambda out, yb: loss_fn(out, yb))
    for Xb, yb in batches:
        opt.zero_grad()
        call(model(Xb), yb).backward()
        if capture == "batch":
            pre.step(Xb if pre.due() else None, yb)
        else:
            pre.step()
        opt.step()
    return {k: p.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("fisher", ["mc", "empirical", "exact"])
@pytest.mark.parametrize("estimator", ["kfac", "kfoc_running", "ekfac"])
def test_hooks_capture_equals_the_batch_given_to_step(fisher, estimator):
    """capture='hooks' records the user's own forward pass and runs the Fisher type's backward
    passes at the loss call: the same estimates (same MC draws) as collect on the batch, so
    the same trajectory over refreshes and the steps between them."""
    batches = []
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        batches.append((torch.randn(16, 5, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)))
    params = {}
    for capture in ("batch", "hooks"):
        model, _, _ = _setup(2)
        loss_fn = nn.CrossEntropyLoss()
        pre = kt.Preconditioner(model, loss_fn, estimator=estimator, fisher=fisher, update_every=2,
                                damping=0.1, capture=capture, generator=torch.Generator().manual_seed(3))
        params[capture] = _train(model, loss_fn, pre, batches, capture=capture)
        assert pre.refreshes == 3 and pre.steps == 5
    for k in params["batch"]:
        torch.testing.assert_close(params["hooks"][k], params["batch"][k], rtol=1e-10, atol=1e-12)


def test_hooks_capture_covers_a_sequence_model_with_ignore_index_and_conv():
    """(N, C, T) logits with ignored positions and a CNN: equal to the batch route."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 2, 9, generator=g, dtype=DT)
    y = torch.randint(0, 4, (6, 7), generator=g)
    y[0, :3] = -100  # ignore_index positions: not counted, in either route
    out = {}
    for capture in ("batch", "hooks"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv1d(2, 5, 3), nn.Tanh(), nn.Conv1d(5, 4, 1)).to(DT)
        loss_fn = nn.CrossEntropyLoss()
        pre = kt.Preconditioner(model, loss_fn, estimator="kfac", fisher="mc", damping=0.1,
                                capture=capture, generator=torch.Generator().manual_seed(3))
        out[capture] = _train(model, loss_fn, pre, [(X, y)] * 3, capture=capture)
    for k in out["batch"]:
        torch.testing.assert_close(out["hooks"][k], out["batch"][k], rtol=1e-10, atol=1e-12)


def test_hooks_capture_records_only_refresh_forward_passes_with_gradients():
    model, X, y = _setup(3)
    loss_fn = nn.CrossEntropyLoss()
    pre = kt.Preconditioner(model, loss_fn, estimator="kfac", update_every=2, damping=0.1,
                            capture="hooks")
    hooks = {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}
    assert hooks[""] == (1, 1) and len(loss_fn._forward_hooks) == 1  # a refresh is next
    # an evaluation pass under no_grad is not recorded
    with torch.no_grad():
        loss_fn(model(X), y)
    loss = nn.functional.cross_entropy(model(X), y)  # nor a loss computed without loss_fn
    loss.backward()
    with pytest.raises(ValueError, match="no statistics were recorded"):
        pre.step()
    assert pre.steps == 0 and pre.refreshes == 0
    model.zero_grad()
    loss_fn(model(X), y).backward()
    pre.step()  # step 0: a refresh from the recorded pass
    assert pre.refreshes == 1
    # step 1 is not a refresh: the pass is not recorded, no layer hook stays behind, and the
    # model and the loss carry no hook of the preconditioner until the next refresh is due
    model.zero_grad()
    loss_fn(model(X), y).backward()
    assert {name: (len(m._forward_hooks), len(m._forward_pre_hooks))
            for name, m in model.named_modules()} == {**hooks, "": (0, 0)}
    assert len(loss_fn._forward_hooks) == 0
    pre.step()
    assert {name: (len(m._forward_hooks), len(m._forward_pre_hooks))
            for name, m in model.named_modules()} == hooks  # step 2 refreshes: armed again
    with pytest.raises(ValueError, match="without the batch"):
        pre.step(X, y)
    pre.remove()  # no hook of the preconditioner is left on the model or the loss
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules())
    assert len(loss_fn._forward_hooks) == 0
    loss_fn(model(X), y).backward()
    with pytest.raises(ValueError, match="removed"):
        pre.step()
    with pytest.raises(ValueError, match="capture"):
        kt.Preconditioner(model, loss_fn, capture="graph")


def test_hooks_capture_errors_name_the_problem_and_keep_the_model_clean():
    model, X, y = _setup(4)
    loss_fn = nn.CrossEntropyLoss()
    pre = kt.Preconditioner(model, loss_fn, fisher="empirical", capture="hooks")
    Xn = X.clone()
    Xn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        loss_fn(model(Xn), y)
    # a forward pass that raises leaves no layer hook behind
    with pytest.raises(RuntimeError):
        model(torch.randn(16, 4, dtype=DT))
    assert all(len(m._forward_hooks) == 0 for m in list(model.modules())[1:])
    loss_fn(model(X), y).backward()
    pre.step()
    assert pre.refreshes == 1


@pytest.mark.parametrize("capture", ["batch", "hooks"])
@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_kfac_estimates_are_the_running_kfac_of_the_collected_blocks(capture, fisher):
    """estimator='kfac' reduces each refresh's statistics to their Gram matrices as they are
    recorded; its estimates are RunningEstimate('kfac') over collect's blocks of the same
    batches (same draws), refresh after refresh, on a model with a conv layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5, 4)).to(DT)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(9, 2, 7, generator=g, dtype=DT), torch.randint(0, 4, (9,), generator=g))
               for _ in range(3)]
    pre = kt.Preconditioner(model, loss_fn, estimator="kfac", fisher=fisher, update_every=1,
                            decay=0.7, damping=0.1, capture=capture,
                            generator=torch.Generator().manual_seed(3))
    ref = {}
    draws = torch.Generator().manual_seed(3)
    for X, y in batches:  # the parameters stay fixed: only the statistics change
        model.zero_grad()
        loss_fn(model(X), y).backward()
        pre.step(*(() if capture == "hooks" else (X, y)))
        for k, F in kt.collect(model, loss_fn, X, y, fisher=fisher, generator=draws).items():
            ref.setdefault(k, ks.RunningEstimate("kfac", decay=0.7)).update(F)
    assert set(pre.estimates) == set(ref) == {"0", "3"}
    for k, est in pre.estimates.items():
        want = ref[k].estimate
        assert est.info.method == "running/kfac"
        torch.testing.assert_close(est.to_dense(), want.to_dense(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("capture", ["batch", "hooks"])
def test_kfac_refuses_statistics_that_are_not_finite_and_changes_nothing(capture):
    """The K-FAC path checks each block's factors, not its statistics: an inf among a layer's
    inputs (which tanh saturates: the model's outputs stay finite) still raises ValueError
    naming the layer, before any estimate changes; so does a NaN (caught in the outputs)."""
    model, X, y = _setup(1)
    loss_fn = nn.CrossEntropyLoss()
    pre = kt.Preconditioner(model, loss_fn, estimator="kfac", fisher="empirical", update_every=1,
                            damping=0.1, capture=capture)
    model.zero_grad()
    loss_fn(model(X), y).backward()
    pre.step(*(() if capture == "hooks" else (X, y)))
    before = {k: est.to_dense().clone() for k, est in pre.estimates.items()}
    for bad in (float("nan"), float("inf")):
        Xn = X.clone()
        Xn[3, 1] = bad
        model.zero_grad()
        match = r"layer '0'.*NaN or inf" if bad == float("inf") or capture == "batch" else "outputs"
        with pytest.raises(ValueError, match=match):
            if capture == "hooks":  # raised at the loss call, where the statistics are taken
                loss_fn(model(Xn), y)
                pre.step()
            else:
                loss_fn(model(X), y).backward()
                pre.step(Xn, y)
        assert pre.steps == 1 and pre.refreshes == 1
        for k, est in pre.estimates.items():
            torch.testing.assert_close(est.to_dense(), before[k], rtol=0, atol=0)


@pytest.mark.parametrize("estimator", ["kfac", "kfoc_running", "ekfac"])
def test_a_refresh_that_fails_in_a_decomposition_changes_no_estimate(estimator, monkeypatch):
    """Every block's estimate is updated before the inverses are decomposed: when a later
    decomposition fails, the blocks already updated are put back, and the step can be retried."""
    model, X, y = _setup(3)
    loss_fn = nn.CrossEntropyLoss()
    pre = kt.Preconditioner(model, loss_fn, estimator=estimator, fisher="empirical",
                            update_every=1, damping=0.1)
    model.zero_grad()
    loss_fn(model(X), y).backward()
    pre.step(X, y)
    before = {k: est.to_dense().clone() for k, est in pre.estimates.items()}
    state = pre.state_dict()
    # the decompositions run through the array API namespace of the tensors
    linalg = pytest.importorskip("array_api_compat.torch").linalg
    eigh, calls = linalg.eigh, [0]

    def failing(*args, **kw):  # the last block's decomposition fails
        calls[0] += 1
        if calls[0] > 2:
            raise RuntimeError("eigh failed")
        return eigh(*args, **kw)

    X2 = X.flip(0) * 1.5
    model.zero_grad()
    loss_fn(model(X2), y).backward()
    monkeypatch.setattr(linalg, "eigh", failing)
    with pytest.raises(Exception, match="eigh failed"):
        pre.step(X2, y)
    monkeypatch.setattr(linalg, "eigh", eigh)
    assert calls[0] > 2 and pre.steps == 1 and pre.refreshes == 1
    for k, est in pre.estimates.items():
        torch.testing.assert_close(est.to_dense(), before[k], rtol=0, atol=0)
    assert pre.state_dict()["running"].keys() == state["running"].keys()
    pre.step(X2, y)  # retried: the refresh as it would have been
    other = kt.Preconditioner(model, loss_fn, estimator=estimator, fisher="empirical",
                              update_every=1, damping=0.1)
    other.load_state_dict(state)
    other.step(X2, y)
    for k, est in pre.estimates.items():
        torch.testing.assert_close(est.to_dense(), other.estimates[k].to_dense(), rtol=1e-12, atol=1e-14)
