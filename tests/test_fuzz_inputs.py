"""Fuzzing the public API over shapes, dtypes, magnitudes, memory layouts, backends and options.

The property: every call either returns finite answers that match the unscaled problem
rescaled (computed in float64 NumPy from the same numbers), or raises ``ValueError``,
``TypeError`` or ``OverflowError`` with a message that names the argument (or the quantity
beyond the range); no call writes to its inputs. Bounded and deterministic (derandomised,
a few hundred examples in all, small sizes).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import kronsum as ks

def fuzz(examples: int) -> settings:
    """Derandomised (the same examples on every run), bounded, no example database."""
    return settings(derandomize=True, deadline=None, database=None, max_examples=examples,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# the largest and smallest normal magnitudes (decimal exponents) an input entry may take
_EXP = {"float64": 300, "float32": 37}
_RANGE = {"float64": (np.finfo(np.float64).tiny, np.finfo(np.float64).max),
          "float32": (np.finfo(np.float32).tiny, np.finfo(np.float32).max)}
_RTOL = {"float64": 1e-7, "float32": 2e-3}


def _backends():
    out = ["numpy", "numpy-fortran", "numpy-strided", "numpy-readonly"]
    for names, module in ((["array-api-strict"], "array_api_strict"), (["torch", "torch-strided"], "torch")):
        try:
            __import__(module)
            out.extend(names)
        except ImportError:
            pass
    return out


def _to_backend(a: np.ndarray, backend: str, dtype: str):
    """``a`` (float64) as an array of ``backend`` in ``dtype``, with the backend's layout."""
    a = a.astype(dtype)
    if backend == "numpy":
        return a
    if backend == "numpy-fortran":
        return np.asfortranarray(a)
    if backend == "numpy-strided":  # a non-contiguous view into a larger array
        big = np.zeros((2 * a.shape[0],) + a.shape[1:], dtype=dtype)
        big[::2] = a
        return big[::2]
    if backend == "numpy-readonly":
        a = a.copy()
        a.flags.writeable = False
        return a
    if backend == "array-api-strict":
        import array_api_strict as xps

        return xps.asarray(a, dtype=getattr(xps, dtype))
    import torch

    t = torch.asarray(a.copy(), dtype=getattr(torch, dtype))
    if backend == "torch-strided":  # a non-contiguous view
        big = torch.zeros((2 * a.shape[0],) + a.shape[1:], dtype=t.dtype)
        big[::2] = t
        t = big[::2]
    return t


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy().astype(np.float64)
    try:
        return np.asarray(x, dtype=np.float64)
    except TypeError:  # array-api-strict refuses __array__ on some versions
        return np.from_dlpack(x).astype(np.float64)


@st.composite
def problems(draw, dtype=None, backend=None, m=None, n=None, zeros=False):
    """A sum (outer, terms or conv) whose inputs are unit-magnitude data times 10^e; with
    ``zeros``, sometimes one input is all zeros."""
    dtype = dtype or draw(st.sampled_from(["float64", "float32"]))
    backend = backend or draw(st.sampled_from(_backends()))
    form = draw(st.sampled_from(["outer", "terms", "conv"]))
    K = draw(st.integers(1, 5))
    m = m or draw(st.integers(1, 3))
    n = n or draw(st.integers(1, 4))
    T = draw(st.integers(1, 3)) if form == "conv" else 1
    top = _EXP[dtype]
    exps = [draw(st.integers(-top, top)) for _ in range(3)]  # (left, right, weights)
    if draw(st.booleans()):  # opposite scales that (nearly) cancel: F of moderate size
        exps[1] = max(-top, min(top, -exps[0] + draw(st.integers(-10, 10))))
        exps[2] = draw(st.integers(-10, 10))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)

    def unit(shape):  # magnitudes in [0.5, 2] with random signs: no subnormal entries
        return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.5, 2.0, size=shape)

    if form == "terms":
        X, Y = unit((K, m, m)), unit((K, n, n))
        raw = [X @ np.swapaxes(X, 1, 2) / m, Y @ np.swapaxes(Y, 1, 2) / n]  # PSD terms
        raw = [r / np.abs(r).max() for r in raw]
    elif form == "outer":
        raw = [unit((K, m)), unit((K, n))]
    else:
        raw = [unit((K, T, m)), unit((K, T, n))]
    w = rng.uniform(0.5, 2.0, size=K)
    zero = draw(st.sampled_from([None] * 6 + [0, 1, 2])) if zeros else None
    if zero is not None:  # one side's statistics, or the weights, all zero: F = 0
        if zero == 2:
            w = np.zeros_like(w)
        else:
            raw[zero] = np.zeros_like(raw[zero])
    scales = [10.0 ** e for e in exps]
    arrays = [_to_backend(r * s, backend, dtype) for r, s in zip(raw, scales[:2])]
    weights = _to_backend(w * scales[2], backend, dtype)
    # the unscaled problem from the very numbers passed (rounded to dtype), in float64
    ref_inputs = [_to_numpy(a) / s for a, s in zip(arrays, scales[:2])]
    ref_w = _to_numpy(weights) / scales[2]
    power = 2 if form in ("outer", "conv") else 1  # F scales as c_G² c_A² c_w (outer, conv)
    log_c = power * (exps[0] + exps[1]) + exps[2]  # log10 of F's scale
    return dict(form=form, dtype=dtype, backend=backend, arrays=arrays, weights=weights,
                ref=(ref_inputs, ref_w), log_c=log_c, scales=scales, power=power, m=m, n=n,
                zero=zero is not None)


def _build(form, arrays, weights):
    ctor = {"outer": ks.KronSum.from_outer, "terms": ks.KronSum.from_terms, "conv": ks.KronSum.from_conv}[form]
    return ctor(*arrays, weights)


def _expect(log_value: float, dtype: str) -> str:
    """"fits", "overflow", or "edge" (within three decades of either end: either outcome)."""
    lo, hi = (math.log10(v) for v in _RANGE[dtype])
    if log_value > hi + 0.5:
        return "overflow"
    if lo + 3 < log_value < hi - 0.5:
        return "fits"
    return "edge"


def _check_call(label, call, log_true, dtype, compare):
    """Run ``call``; check it against the expectation for a true value of 10^log_true."""
    expect = _expect(log_true, dtype)
    event(f"{label}: {expect}")
    try:
        got = call()
    except OverflowError as exc:
        assert expect in ("overflow", "edge"), (label, log_true, str(exc))
        assert "range" in str(exc), (label, str(exc))
        return
    assert expect != "overflow", (label, log_true, "no OverflowError")
    if expect == "fits":
        compare(got)


def _close_log(label, value: float, log_want: float, rtol: float):
    assert value != 0 and math.isfinite(value), (label, value, log_want)
    assert abs(math.log10(abs(value)) - log_want) <= rtol / math.log(10) * 2 + 1e-12, (label, value, log_want)


def _check_sum(F, F0, log_c: float, dtype: str):
    """kfoc, nearest_kronecker, tkfac, trace and ‖F‖ of F against the float64 reference F0
    with F = 10^log_c · F0 (up to the rounding of the inputs)."""
    rtol = _RTOL[dtype]
    nk0 = ks.nearest_kronecker(F0)
    s0, t0, f0 = float(nk0.scale), float(F0.trace()), float(F0.frobenius_norm())
    if f0 == 0:  # a zero sum: zero answers and a note, whatever the inputs' magnitudes
        assert float(ks.kronecker_svd(F, rank=1).singular_values[0]) == 0.0
        for est in (ks.kfoc(F), ks.nearest_kronecker(F), ks.tkfac(F)):
            assert float(est.scale) == 0.0 and est.info.degenerate, est.info
            assert np.all(np.isfinite(_to_numpy(est.left))) and np.all(np.isfinite(_to_numpy(est.right)))
        assert float(F.trace()) == 0.0 and float(F.frobenius_norm()) == 0.0
        return
    gap = nk0.info.sigma2 is not None and nk0.info.sigma2 < 0.9 * s0

    def factors_match(label):
        def compare(est):
            _close_log(label, float(est.scale), log_c + math.log10(s0), 10 * rtol)
            if gap:
                for got, want in ((est.left, nk0.left), (est.right, nk0.right)):
                    np.testing.assert_allclose(_to_numpy(got), _to_numpy(want), atol=5 * math.sqrt(rtol) + 1e-6,
                                               err_msg=label)
            # the relative error is scale-free: the reference's optimal one
            rel = float(ks.frobenius_error(F, est, relative=True))
            rel0 = float(ks.frobenius_error(F0, nk0, relative=True))
            assert math.isfinite(rel) and abs(rel - rel0) <= (1e-5 if dtype == "float64" else 2e-2), (label, rel, rel0)
        return compare

    _check_call("kfoc", lambda: ks.kfoc(F), log_c + math.log10(s0), dtype, factors_match("kfoc"))
    _check_call("nearest_kronecker", lambda: ks.nearest_kronecker(F), log_c + math.log10(s0), dtype,
                factors_match("nearest_kronecker"))
    _check_call("kronecker_svd", lambda: ks.kronecker_svd(F, rank=1), log_c + math.log10(s0), dtype,
                lambda B: _close_log("kronecker_svd", float(B.singular_values[0]), log_c + math.log10(s0), 10 * rtol))
    # TKFAC and the trace: δ = c·tr F0 (PSD inputs: tr F0 > 0)
    _check_call("trace", lambda: F.trace(), log_c + math.log10(t0), dtype,
                lambda t: _close_log("trace", float(t), log_c + math.log10(t0), rtol))

    def tkfac_compare(est):
        _close_log("tkfac", float(est.scale), log_c + math.log10(t0), rtol)
        ref = ks.tkfac(F0)
        np.testing.assert_allclose(_to_numpy(est.left), _to_numpy(ref.left), rtol=10 * rtol, atol=10 * rtol)

    _check_call("tkfac", lambda: ks.tkfac(F), log_c + math.log10(t0), dtype, tkfac_compare)
    _check_call("frobenius_norm", lambda: F.frobenius_norm(), log_c + math.log10(f0), dtype,
                lambda v: _close_log("frobenius_norm", float(v), log_c + math.log10(f0), 10 * rtol))


def _unchanged(p, before):
    after = [_to_numpy(a) for a in p["arrays"]] + [_to_numpy(p["weights"])]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's warnings inside references
@fuzz(120)
@given(problems())
def test_public_calls_match_the_rescaled_problem_or_raise(p):
    dtype, form, rtol = p["dtype"], p["form"], _RTOL[p["dtype"]]
    before = [_to_numpy(a).copy() for a in p["arrays"]] + [_to_numpy(p["weights"]).copy()]
    F = _build(form, p["arrays"], p["weights"])
    F0 = _build(form, *p["ref"])
    _check_sum(F, F0, p["log_c"], dtype)
    # K-FAC: scale Σw, factors the means (each must fit the dtype on its own)
    try:
        est = ks.kfac(F)
    except OverflowError as exc:
        assert "kfac's" in str(exc) and "range" in str(exc)
    else:
        assert math.isfinite(float(est.scale))
        assert np.all(np.isfinite(_to_numpy(est.left))) and np.all(np.isfinite(_to_numpy(est.right)))
        ref = ks.kfac(F0)
        _close_log("kfac scale", float(est.scale), math.log10(float(ref.scale)) + math.log10(p["scales"][2]), rtol)
        for got, want, c in ((est.left, ref.left, p["scales"][0]), (est.right, ref.right, p["scales"][1])):
            got = _to_numpy(got)
            if np.abs(got).max() < 1e3 * _RANGE[dtype][0]:  # near subnormal: digits lost
                continue
            for _ in range(p["power"]):  # divided step by step: c² may leave float64
                got = got / c
            want = _to_numpy(want)
            np.testing.assert_allclose(got, want, rtol=10 * rtol, atol=10 * rtol * np.abs(want).max())
    _unchanged(p, before)


@st.composite
def sums_of_two(draw):
    """Two parts of one dtype, backend and factor sizes, of independent magnitudes and forms,
    sometimes with a zero input."""
    p = draw(problems(zeros=True))
    q = draw(problems(dtype=p["dtype"], backend=p["backend"], m=p["m"], n=p["n"], zeros=True))
    return p, q


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@fuzz(80)
@given(sums_of_two())
def test_sums_of_parts_of_any_magnitudes_and_zero_inputs(pq):
    parts, refs, logs = [], [], []
    befores = []
    for p in pq:
        befores.append([_to_numpy(a).copy() for a in p["arrays"]] + [_to_numpy(p["weights"]).copy()])
        parts.append(_build(p["form"], p["arrays"], p["weights"]))
        refs.append(_build(p["form"], *p["ref"]))
        logs.append(-math.inf if p["zero"] else p["log_c"])
    top = max(logs) if max(logs) > -math.inf else 0.0
    # the reference: each part relative to the largest, in float64 (a negligible part is 0)
    F0 = ks.KronSum.concat(*(R.scaled(0.0 if lg == -math.inf else 10.0 ** (lg - top))
                             for R, lg in zip(refs, logs)))
    _check_sum(parts[0] + parts[1], F0, top, pq[0]["dtype"])
    for p, before in zip(pq, befores):
        _unchanged(p, before)


# -- options and bad values ------------------------------------------------------------------

_VALUES = [True, False, None, 0, -1, 1, 3, 2.5, -1e-3, 1e-8, float("nan"), float("inf"), "x", "1e-3",
           1j, np.int64(7), np.float32(1e-4), np.float64(0.5), [1, 2], np.ones(2), np.array(0.1)]

_OPTIONS = {
    "kfoc": (lambda F, v: ks.kfoc(F, tol=v), "tol"),
    "kfoc-accuracy": (lambda F, v: ks.kfoc(F, accuracy=v), "accuracy"),
    "kfoc-max_iter": (lambda F, v: ks.kfoc(F, max_iter=v), "max_iter"),
    "kfoc-seed": (lambda F, v: ks.kfoc(F, init="random", seed=v), "seed"),
    "kronecker_svd-rank": (lambda F, v: ks.kronecker_svd(F, rank=v), "rank"),
    "kronecker_svd-tol": (lambda F, v: ks.kronecker_svd(F, tol=v), "tol"),
    "scaled": (lambda F, v: F.scaled(v), "c·F"),
    "to_dense": (lambda F, v: F.to_dense(max_elements=v), "max_elements"),
    "Kron-scale": (lambda F, v: ks.Kron(np.eye(2), np.eye(3), scale=v), "scale"),
    "inverse": (lambda F, v: ks.kfac(F).inverse(v), "damping"),
    "sample": (lambda F, v: ks.kfac(F).sample(v, damping=0.1, seed=0), "n"),
    "decay": (lambda F, v: ks.RunningEstimate("kfac", decay=v), "decay"),
    "update_every": (lambda F, v: ks.RunningEstimate("kfac", update_every=v), "update_every"),
    "weights": (lambda F, v: ks.KronSum.from_outer(np.ones((2, 2)), np.ones((2, 3)), [v, 1.0]), "weights"),
}


@fuzz(150)
@given(st.sampled_from(sorted(_OPTIONS)), st.sampled_from(range(len(_VALUES))))
def test_options_either_work_or_name_the_argument(option, i):
    F = ks.KronSum.from_outer(np.arange(1.0, 7.0).reshape(3, 2), np.ones((3, 3)) + np.eye(3))
    call, name = _OPTIONS[option]
    try:
        call(F, _VALUES[i])
    except (TypeError, ValueError) as exc:
        assert name in str(exc), (option, _VALUES[i], str(exc))
    except OverflowError as exc:  # pragma: no cover - no option here reaches the range
        pytest.fail(f"{option}={_VALUES[i]!r}: {exc}")


# -- state dicts -------------------------------------------------------------------------------

_STATE_EDITS = {
    "scale": [-1.0, float("nan"), np.float32(1.0), np.ones(1), "1", None, np.array(-2.0), np.array(0.0)],
    "left": [np.ones((2, 3)), np.full((2, 2), np.inf), np.eye(2).astype(np.float32), [[1.0]], None, np.eye(5)],
    "decay": [0.5, 1.5, "0.9", None, True],
    "step": [-1, 2.0, True, 5],
    "num_updates": [0, 7, -3, "1"],
    "estimator": ["kfoc", None, 3, "tkfac"],
    "update_every": [0, 2, 1.5],
}


@fuzz(80)
@given(st.sampled_from(["kfac", "tkfac", "kfoc_running", "kfoc_approx"]),
       st.sampled_from(sorted(_STATE_EDITS)), st.integers(0, 7))
def test_state_dicts_load_consistently_or_name_the_key(estimator, key, j):
    rng = np.random.default_rng(1)
    batches = [ks.KronSum.from_outer(rng.standard_normal((6, 2)), rng.standard_normal((6, 3)))
               for _ in range(2)]
    run = ks.RunningEstimate(estimator, decay=0.9)
    run.update(batches[0])
    state = dict(run.state_dict())
    values = _STATE_EDITS[key]
    state[key] = values[j % len(values)]
    snapshot = {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    try:
        restored = ks.RunningEstimate.from_state_dict(state)
    except (TypeError, ValueError) as exc:
        assert key in str(exc) or "state" in str(exc), (key, state[key], str(exc))
    else:
        try:  # a loaded state continues, or refuses a batch of other sizes by naming them
            est = restored.update(batches[1])
        except ValueError as exc:
            assert "running estimate has" in str(exc), str(exc)
        else:
            assert math.isfinite(float(est.scale))
            assert np.all(np.isfinite(np.asarray(est.left)))
    for k, v in snapshot.items():  # the state was not written to
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(state[k], v)
