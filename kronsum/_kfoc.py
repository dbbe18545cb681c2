r"""K-FOC: the Frobenius-optimal single Kronecker product (Schnaus, Lee & Triebel 2021).

``min_{L, R} ‖F − L ⊗ R‖_F`` is the best rank-one approximation of the rearranged matrix
``𝓡(F) = Σ_k w_k vec(L_k) vec(R_k)ᵀ`` (Van Loan & Pitsianis 1993). Three solvers:

``gram``     exact, through K×K Gram matrices (outer and terms forms). With
             ``P = [vec L_k]``, ``Q = [vec R_k]``, ``S_P = PᵀP`` and ``S_Q = QᵀQ`` (for the outer
             form the Hadamard squares ``(GGᵀ)∘(GGᵀ)`` and ``(AAᵀ)∘(AAᵀ)``), the singular values
             of ``𝓡(F) = P W Qᵀ`` are those of ``C_P W C_Q`` with ``C = S^{1/2}``; its top pair
             ``(z, y)`` gives ``L ∝ Σ_k α_k L_k`` with ``α = W C_Q y`` and ``R ∝ Σ_k β_k R_k`` with
             ``β = W C_P z``. No inverse is taken.
``lanczos``  Lanczos with full reorthogonalisation and explicit restarts on ``𝓡𝓡ᵀ`` (or
             ``𝓡ᵀ𝓡``, whichever acts on the smaller factor), applied through the two
             contractions of :class:`KronSum`; any form, any backend.
``power``    the paper's Algorithm 1/2: alternate ``R ← Σ_k w_k⟨L_k, L⟩R_k`` and
             ``L ← Σ_k w_k⟨R_k, R⟩L_k``. Kept as the reference; its error angle shrinks by
             ``(σ2/σ1)²`` per iteration, so Lanczos needs far fewer products on small gaps.

Stopping rule (iterative solvers): the relative eigen-residual
``‖𝓡𝓡ᵀu − θu‖ / θ ≤ tol`` of the normalised iterate ``u``. It bounds the angle to the optimum by
``tol / (1 − σ2²/σ1²)``; the error in ``‖F − L⊗R‖`` is second order in that angle. A rule on the
change of σ would stop far too early, since σ's error is the square of the angle's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._closed_forms import _require_sum, kfac
from ._compat import Array, device_of, eye_like, fro_inner, fro_norm, is_dask_namespace, symmetrize, to_float, trace
from ._kron import Kron, KronInfo
from ._sum import KronSum

__all__ = ["kfoc"]

_METHODS = ("auto", "gram", "lanczos", "power")
_INITS = ("tkfac", "kfac", "identity", "random")
_KRYLOV_DIM = 20


def _default_tol(xp: Any, dtype: Any) -> float:
    return 1e-10 if xp.finfo(dtype).eps < 1e-12 else 1e-5


def choose_method(F: KronSum, method: str = "auto") -> str:
    """The solver :func:`kfoc` uses for ``F`` with ``method``; the rule of ``method="auto"``.

    ``"gram"`` for the outer and terms forms when its O(K²(m + n)) (outer) or
    O(K²(m² + n²)) (terms) Gram products plus O(K³) decompositions cost less than about 30
    operator applications of O(K(m² + n²)) each, and K ≤ 4096; ``"lanczos"`` otherwise, for
    the conv form, and for Dask arrays (whose namespace has no ``eigh``).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "gram":
        if F.form == "conv":
            raise ValueError(
                "method='gram' needs the outer or terms form (a K-column rearrangement); "
                "use 'lanczos' for the conv form"
            )
        if is_dask_namespace(F.xp):
            raise ValueError("method='gram' needs linalg.eigh, which Dask arrays lack; use 'lanczos'")
        return method
    if method != "auto":
        return method
    if F.form == "conv" or is_dask_namespace(F.xp):
        return "lanczos"
    K, m, n = F.num_terms, F.m, F.n
    build = K * K * ((m + n) if F.form == "outer" else (m * m + n * n))
    gram_cost = build + 15 * K**3
    iter_cost = 30 * 2 * K * (m * m + n * n)
    return "gram" if (K <= 4096 and gram_cost <= iter_cost) else "lanczos"


def kfoc(
    F: KronSum,
    *,
    method: str = "auto",
    tol: float | None = None,
    max_iter: int | None = None,
    init: str | Kron = "tkfac",
    seed: int | None = None,
) -> Kron:
    r"""K-FOC: the Kronecker product ``σ₁ L ⊗ R`` nearest to F in Frobenius norm.

    .. math::

        (L, R) = \arg\min_{L, R} \Big\| \sum_k w_k L_k \otimes R_k - L \otimes R \Big\|_F,

    the top singular pair of the rearranged sum ``𝓡(F)``, found without forming F or 𝓡(F).

    Parameters
    ----------
    F : KronSum
    method : {"auto", "gram", "lanczos", "power"}
        Solver; see the module docstring and :func:`choose_method` for the ``"auto"`` rule.
    tol : float, optional
        Relative eigen-residual at which the iterative solvers stop. Default 1e-10 for
        float64, 1e-5 for float32. Ignored by ``"gram"``.
    max_iter : int, optional
        Most operator applications (each = both contractions, the cost of one iteration of
        the paper's Algorithm 1). Default 500 (``lanczos``), 5000 (``power``).
    init : {"tkfac", "kfac", "identity", "random"} or Kron
        Starting factor of the iterative solvers. ``"tkfac"`` (default) starts from TKFAC's
        factor, itself one half-step from the identity; ``"random"`` uses ``seed``; a
        :class:`Kron` (e.g. the previous estimate) warm-starts from its factors.
    seed : int, optional
        Seed of ``init="random"``.

    Returns
    -------
    Kron
        ``left`` (m, m) and ``right`` (n, n) of unit Frobenius norm with ``tr(left) ≥ 0``,
        ``scale = σ₁``. Symmetric when the terms are (always for outer and conv); both PSD when
        F is a PSD sum (non-negative weights, PSD terms, or the outer/conv forms).
        ``info`` holds the solver, iterations, convergence, estimates of σ₁ and σ₂ and notes:
        a zero sum gives ``scale = 0`` with identity-shaped factors; ``σ₁ = σ₂`` (the optimum
        is not unique) is noted and a finite optimal answer is still returned.

    Notes
    -----
    Cost: ``gram`` O(K²(m + n) + K³ + K(m² + n²)) for the outer form; ``lanczos`` and
    ``power`` O(K(m² + n²)) per application for outer/terms (conv: see
    :meth:`KronSum.contract_left`), typically 10–30 applications with Lanczos.

    Examples
    --------
    >>> import numpy as np
    >>> from kronsum import KronSum, kfoc, kfac, frobenius_error
    >>> rng = np.random.default_rng(0)
    >>> F = KronSum.from_outer(rng.standard_normal((32, 4)), rng.standard_normal((32, 5)))
    >>> best = kfoc(F)
    >>> bool(frobenius_error(F, best) <= frobenius_error(F, kfac(F)))
    True
    >>> best.info.method, best.info.converged
    ('kfoc/lanczos', True)
    """
    F = _require_sum(F, "kfoc")
    method = choose_method(F, method)
    xp = F.xp
    if tol is None:
        tol = _default_tol(xp, F.dtype)
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    if max_iter is None:
        max_iter = 5000 if method == "power" else 500
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if isinstance(init, Kron):
        if (init.m, init.n) != (F.m, F.n):
            raise ValueError(
                f"init has factors of sizes ({init.m}, {init.n}) but F needs ({F.m}, {F.n})"
            )
    elif init not in _INITS:
        raise ValueError(f"init must be one of {_INITS} or a Kron, got {init!r}")

    Fn, (cw, cl, cr) = F.normalized()
    c = cw * (cl * cr)
    if method == "gram":
        L, R, sigma, s2, notes = _gram_solve(Fn)
        info = dict(method="kfoc/gram", iterations=0, converged=True, residual=None)
    else:
        side = "left" if Fn.m <= Fn.n else "right"
        x0 = _initial(Fn, init, seed, side)
        apply = _operator(Fn, side)
        solver = _lanczos if method == "lanczos" else _power
        x, its, conv, res, s2 = solver(apply, x0, tol, max_iter, xp)
        L, R, sigma, notes = _finish(Fn, x, side)
        info = dict(method=f"kfoc/{method}", iterations=its, converged=conv, residual=res)
        if not conv:
            notes = notes + (f"not converged: residual {res:.3g} > tol {tol:.3g} after {its} applications",)
    sig1 = to_float(sigma)
    if s2 is not None and sig1 > 0 and s2 >= sig1 * (1 - math.sqrt(xp.finfo(F.dtype).eps)):
        notes = notes + ("sigma1 == sigma2 to working precision: the optimum is not unique; "
                         "one optimal pair is returned",)
    scale_c = to_float(c)
    return Kron(L, R, scale=sigma * c, info=KronInfo(
        sigma1=sig1 * scale_c, sigma2=None if s2 is None else s2 * scale_c, notes=notes, **info))


# -- solvers ------------------------------------------------------------------------------


def _psd_sqrt(S: Array, xp: Any) -> Array:
    lam, V = xp.linalg.eigh(S)
    lam = xp.where(lam > 0, lam, xp.zeros_like(lam))
    return V @ (xp.sqrt(lam)[:, None] * xp.matrix_transpose(V))


def _gram_solve(Fn: KronSum):
    xp = Fn.xp
    w = Fn.weights
    CP = _psd_sqrt(Fn._gram("left"), xp)
    CQ = _psd_sqrt(Fn._gram("right"), xp)
    U, s, Vt = xp.linalg.svd(CP @ (w[:, None] * CQ), full_matrices=False)
    sigma = s[0]
    s2 = to_float(s[1]) if s.shape[0] > 1 else 0.0
    if not bool(sigma > 0):
        L, R, _, notes = _zero_answer(Fn)
        return L, R, sigma, s2, notes
    L = Fn._combine("left", w * (CQ @ Vt[0, :]))
    R = Fn._combine("right", w * (CP @ U[:, 0]))
    if Fn.symmetric:
        L, R = symmetrize(L, xp), symmetrize(R, xp)
    flip = xp.where(trace(L, xp) < 0, -xp.ones_like(sigma), xp.ones_like(sigma))
    L = flip * L / fro_norm(L, xp)
    R = flip * R / fro_norm(R, xp)
    return L, R, sigma, s2, ()


def _operator(Fn: KronSum, side: str):
    if side == "left":
        return lambda X: Fn.contract_right(Fn.contract_left(X))
    return lambda Y: Fn.contract_left(Fn.contract_right(Y))


def _initial(Fn: KronSum, init, seed, side: str) -> Array:
    xp = Fn.xp
    d = Fn.m if side == "left" else Fn.n
    if isinstance(init, Kron):
        x = init.left if side == "left" else init.right
        x = xp.astype(xp.asarray(x), Fn.dtype)
    elif init == "tkfac":
        eye = eye_like(Fn.n if side == "left" else Fn.m, Fn.weights, xp)
        x = Fn.contract_right(eye) if side == "left" else Fn.contract_left(eye)
    elif init == "kfac":
        est = kfac(Fn)
        x = est.left if side == "left" else est.right
    elif init == "identity":
        x = eye_like(d, Fn.weights, xp)
    else:
        rng = np.random.default_rng(seed)
        r = rng.standard_normal((d, d))
        if Fn.symmetric:
            r = r + r.T
        x = xp.asarray(r, dtype=Fn.dtype, device=device_of(Fn.weights))
    nx = fro_norm(x, xp)
    if not bool(nx > 0):  # e.g. tkfac of a zero-trace sum: fall back to the identity
        x = eye_like(d, Fn.weights, xp)
        nx = fro_norm(x, xp)
    return x / nx


def _power(apply, x, tol, max_iter, xp):
    res = math.inf
    for it in range(1, max_iter + 1):
        y = apply(x)
        ny = fro_norm(y, xp)
        if not bool(ny > 0):
            return x, it, True, 0.0, None
        y = y / ny
        c = to_float(fro_inner(y, x, xp))
        res = to_float(fro_norm(y - c * x, xp)) / abs(c) if c != 0 else math.inf
        x = y
        if res <= tol:
            return x, it, True, res, None
    return x, max_iter, False, res, None


def _lanczos(apply, x, tol, max_iter, xp):
    """Restarted Lanczos with full reorthogonalisation for the top eigenpair of a PSD operator.

    The (j × j) tridiagonal projection is solved on the host with NumPy: only its 2j scalars,
    which the convergence check reads anyway, cross from the device.
    """
    n_apply = 0
    res = math.inf
    s2 = None
    eps = float(xp.finfo(x.dtype).eps)
    while True:
        Q = [x]
        alphas: list[float] = []
        betas: list[float] = []
        for j in range(_KRYLOV_DIM):
            w = apply(Q[j])
            n_apply += 1
            a = fro_inner(w, Q[j], xp)
            w = w - a * Q[j]
            if j > 0:
                w = w - betas[-1] * Q[j - 1]
            for _ in range(2):  # full reorthogonalisation, twice is enough
                for q in Q:
                    w = w - fro_inner(w, q, xp) * q
            b = to_float(fro_norm(w, xp))
            alphas.append(to_float(a))
            betas.append(b)
            T = np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1)
            theta, S = np.linalg.eigh(T)
            th1 = float(theta[-1])
            if th1 <= 0:
                return Q[0], n_apply, True, 0.0, 0.0
            breakdown = b <= 64 * eps * th1
            if j == 0 and breakdown:
                # the start vector spans an invariant subspace: Krylov sees no second value,
                # so probe the deflated operator to learn whether sigma1 is repeated
                s2, k = _deflated_top(apply, Q[0], xp)
                return Q[0], n_apply + k, True, 0.0, s2
            s2 = math.sqrt(max(float(theta[-2]), 0.0)) if j > 0 else None
            res = float(b * abs(S[-1, -1]) / th1)
            done = bool(res <= tol or breakdown or n_apply >= max_iter)
            if done or j == _KRYLOV_DIM - 1:
                coef = S[:, -1]
                x = float(coef[0]) * Q[0]
                for cj, q in zip(coef[1:], Q[1:]):
                    x = x + float(cj) * q
                x = x / fro_norm(x, xp)
                if done:
                    return x, n_apply, bool(res <= tol or breakdown), res, s2
                break
            Q.append(w / b)


def _deflated_top(apply, x, xp, steps: int = 4):
    """sqrt of the top eigenvalue of ``(I - xxᵀ) B (I - xxᵀ)`` by a few Lanczos steps."""
    if math.prod(x.shape) == 1:
        return 0.0, 0
    rng = np.random.default_rng(0)
    r = rng.standard_normal(tuple(x.shape))
    q = xp.asarray(r + r.T if r.ndim == 2 else r, dtype=x.dtype, device=device_of(x))
    q = q - fro_inner(q, x, xp) * x
    q = q / fro_norm(q, xp)
    Q = [x, q]
    alphas, betas = [], []
    for j in range(steps):
        w = apply(Q[-1])
        a = to_float(fro_inner(w, Q[-1], xp))
        for _ in range(2):
            for v in Q:
                w = w - fro_inner(w, v, xp) * v
        b = to_float(fro_norm(w, xp))
        alphas.append(a)
        betas.append(b)
        if b <= 1e-300:
            break
        Q.append(w / b)
    T = np.diag(alphas) + np.diag(betas[:len(alphas) - 1], 1) + np.diag(betas[:len(alphas) - 1], -1)
    return math.sqrt(max(float(np.linalg.eigvalsh(T)[-1]), 0.0)), len(alphas)


def _finish(Fn: KronSum, x: Array, side: str):
    """Factors from the converged iterate: ``L`` (unit), ``R = 𝓡ᵀvec(L)/σ``, ``σ = ‖𝓡ᵀvec L‖``."""
    xp = Fn.xp
    L = x if side == "left" else Fn.contract_right(x)
    if Fn.symmetric:
        L = symmetrize(L, xp)
    nl = fro_norm(L, xp)
    if not bool(nl > 0):
        return _zero_answer(Fn)
    L = L / nl
    L = xp.where(trace(L, xp) < 0, -L, L)
    v = Fn.contract_left(L)
    if Fn.symmetric:
        v = symmetrize(v, xp)
    sigma = fro_norm(v, xp)
    if not bool(sigma > 0):
        return _zero_answer(Fn)
    return L, v / sigma, sigma, ()


def _zero_answer(Fn: KronSum):
    xp = Fn.xp
    Il = eye_like(Fn.m, Fn.weights, xp)
    Ir = eye_like(Fn.n, Fn.weights, xp)
    zero = xp.zeros((), dtype=Fn.dtype, device=device_of(Fn.weights))
    return (Il / math.sqrt(Fn.m), Ir / math.sqrt(Fn.n), zero,
            ("zero sum (sigma1 = 0): the estimate is zero",))
