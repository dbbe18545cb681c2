r"""Kronecker-rank-r approximations: the Kronecker product SVD of a sum of Kronecker products.

The best Frobenius approximation of F by a sum of r Kronecker products (Van Loan & Pitsianis
1993) is the truncated SVD of the rearrangement ``𝓡(F) = Σ_k w_k vec(L_k) vec(R_k)ᵀ``:

.. math::

    \min_{\operatorname{rank}_\otimes B \le r} \|F - B\|_F
    = \Big\| F - \sum_{i \le r} \sigma_i\, U_i \otimes V_i \Big\|_F
    = \Big(\sum_{i > r} \sigma_i^2\Big)^{1/2},

with ``σ_i`` the singular values of 𝓡(F) and ``vec U_i``, ``vec V_i`` its singular vectors
(Eckart–Young). Nothing of size ``(mn)²`` or ``m²n²`` is formed: the top r eigenpairs of
``𝓡𝓡ᵀ`` are found by a block Lanczos iteration with thick restarts, either

``gram``     on K-vectors of coefficients ``α`` (``U = Σ_k α_k L_k``) for the outer and terms
             forms: the operator ``α ↦ W S_Q W S_P α``, self-adjoint in the ``S_P`` inner
             product, with the K×K Gram matrices ``S_P = [⟨L_k, L_l⟩]``, ``S_Q = [⟨R_k, R_l⟩]``
             (as :func:`kronsum.kfoc`'s Gram solver), or
``lanczos``  on ``(d, d)`` matrices through the two contractions of :class:`KronSum`
             (``X ↦ 𝓡𝓡ᵀX`` on the smaller factor, ``d = min(m, n)``): any form, any backend.

The iteration (block size r, Rayleigh–Ritz over the whole basis with full
reorthogonalisation, thick restart to the top Ritz vectors when the basis reaches
``max(20, 4r)`` vectors) stops when every one of the top r Ritz pairs has
``‖𝓡𝓡ᵀu_i − θ_i u_i‖ ≤ tol · max(θ_i, 1e3·ε·θ_1/tol)``: relative to its own eigenvalue, so that
small σ_i are as accurate as large ones, down to the rounding floor. For r = 1 it is
single-vector thick-restart Lanczos with K-FOC's stopping rule. A last Rayleigh–Ritz step in
the factor space (the SVD of the r × n² projection ``𝓡ᵀ[U_1 … U_r]``) gives the singular values
``σ_i = ‖𝓡ᵀU_i‖`` and exactly orthonormal factors.

For the Gram solver the coefficients are those of the unit terms ``L_k/‖L_k‖``: the metric is
then a correlation matrix and heavy-tailed per-sample magnitudes sit in the weights, which
keeps directions near the null space of a singular ``S_P`` (K > rank) from being normalised
into noise.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np

from ._closed_forms import _require_sum
from ._compat import (Array, counted, device_of, float64_available, fro_norm, is_array, is_dask_namespace,
                      materialize, namespace, symmetrize, to_float, trace)
from ._eigen import KRYLOV_DIM, GramSpace, Stop, antisymmetrize, block_lanczos, contraction_space, finish_block
from ._eigen import default_tol as _default_tol
from ._kfoc import _initial, choose_method, positions_cancel
from ._kron import Kron, KronInfo
from ._sum import KronSum, times_scale
from ._validation import check_in_range, check_int, check_real, check_seed

__all__ = ["kronecker_svd", "KronSVD"]

_METHODS = ("auto", "gram", "lanczos")
_SOLVE_METHODS = ("auto", "exact", "cg")
_DAMPINGS = ("exact", "factored")
_CACHE_SIZE = 8  # damped inverses (and rank-2 diagonalisations) kept per KronSVD


# -- the result ----------------------------------------------------------------------------


class KronSVD:
    r"""A Kronecker-rank-r matrix ``Σ_{i<r} σ_i L_i ⊗ R_i``, e.g. the result of :func:`kronecker_svd`.

    Attributes
    ----------
    singular_values : array, shape (r,)
        ``σ_1 ≥ σ_2 ≥ … ≥ σ_r ≥ 0``, the top singular values of the rearrangement 𝓡(F).
    lefts : array, shape (r, m, m)
        Unit-Frobenius left (gradient-side) factors, orthonormal: ``⟨L_i, L_j⟩ = δ_ij``.
    rights : array, shape (r, n, n)
        Unit-Frobenius right (activation-side) factors, orthonormal.
    total_norm : float
        ``‖F‖_F`` of the approximated sum (``None`` for a user-built result).
    info : KronInfo
        ``method`` (``"kronsvd/gram"`` or ``"kronsvd/lanczos"``), ``iterations`` (operator
        applications), ``converged``, ``residual`` (largest eigen-residual of the top r pairs,
        relative to each pair's eigenvalue), ``sigma1`` = σ₁, ``sigma2`` = an estimate of σ_{r+1}, the first singular value
        **not** kept (σ₂ for r = 1, as in :func:`kronsum.kfoc`; ``None`` when unknown) and
        ``notes`` (rank deficiency, near-degenerate singular values, not converged).

    Sign convention: the first term has ``tr(L_1) ≥ 0`` (as :func:`kronsum.kfoc`); every other
    term has its entry of largest magnitude of ``L_i`` (the first in row-major order on exact
    ties) positive. The pair ``(L_i, R_i)`` is flipped together, so the product is unchanged.

    For a PSD F the first term is PSD, but the terms ``i ≥ 2`` are indefinite (Frobenius-
    orthogonal to a PSD first term) and the truncated sum need not be PSD.

    Examples
    --------
    >>> import numpy as np
    >>> import kronsum as ks
    >>> rng = np.random.default_rng(0)
    >>> F = ks.KronSum.from_conv(rng.standard_normal((8, 5, 3)), rng.standard_normal((8, 5, 4)))
    >>> B = ks.kronecker_svd(F, rank=4)
    >>> B.rank, B.info.method, B.info.converged
    (4, 'kronsvd/lanczos', True)
    >>> bool(np.allclose(B.to_dense(), sum(s * np.kron(L, R) for s, L, R in
    ...                                   zip(B.singular_values, B.lefts, B.rights))))
    True
    >>> B2 = B.truncate(2)                            # the best Kronecker-rank-2 approximation
    >>> bool(B2.explained <= B.explained <= 1.0)
    True
    >>> V = rng.standard_normal((3, 4))
    >>> bool(np.allclose(B.matvec(V).reshape(-1), B.to_dense() @ V.reshape(-1)))
    True
    """

    def __init__(self, singular_values: Array, lefts: Array, rights: Array, *,
                 info: KronInfo | None = None, total_norm: float | None = None):
        xp = namespace(singular_values, lefts, rights)
        if lefts.ndim != 3 or rights.ndim != 3 or singular_values.ndim != 1 or \
                lefts.shape[1] != lefts.shape[2] or rights.shape[1] != rights.shape[2] or \
                not (singular_values.shape[0] == lefts.shape[0] == rights.shape[0]):
            raise ValueError(
                f"KronSVD needs singular_values (r,), lefts (r, m, m), rights (r, n, n); got "
                f"{tuple(singular_values.shape)}, {tuple(lefts.shape)}, {tuple(rights.shape)}"
            )
        self._xp = xp
        self.singular_values = singular_values
        self.lefts = lefts
        self.rights = rights
        self.info = info if info is not None else KronInfo(method="user")
        self.total_norm = total_norm
        # per (kind, damping, damping_method): the last _CACHE_SIZE used; the leading term's
        # eigendecomposition is kept once and serves every damping
        self._cache: OrderedDict = OrderedDict()
        self._lead_eig = None

    # -- shape ---------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """r, the number of Kronecker terms."""
        return int(self.lefts.shape[0])

    @property
    def m(self) -> int:
        return int(self.lefts.shape[-1])

    @property
    def n(self) -> int:
        return int(self.rights.shape[-1])

    @property
    def shape(self) -> tuple[int, int]:
        d = self.m * self.n
        return (d, d)

    @property
    def dtype(self) -> Any:
        return self.lefts.dtype

    @property
    def explained(self) -> float | None:
        r"""``Σ_{i≤r} σ_i² / ‖F‖²_F``: the fraction of ``‖F‖²`` the r terms capture.

        ``1 − explained`` is the squared relative error ``‖F − B‖²/‖F‖²`` of this optimum.
        1.0 for a zero F; ``None`` when ``total_norm`` is unknown.
        """
        if self.total_norm is None:
            return None
        if self.total_norm == 0:
            return 1.0
        s = np.asarray([to_float(self.singular_values[i]) for i in range(self.rank)]) / self.total_norm
        return float(min(1.0, np.sum(s * s)))

    def __repr__(self) -> str:
        try:
            s = ", ".join(f"{to_float(self.singular_values[i]):.4g}" for i in range(min(self.rank, 4)))
            s += ", …" if self.rank > 4 else ""
        except Exception:  # lazy arrays: do not force a computation in repr
            s = "<lazy>"
        return (f"KronSVD(rank={self.rank}, singular_values=[{s}], left=({self.m}, {self.m}), "
                f"right=({self.n}, {self.n}), dtype={self.dtype}, method={self.info.method!r})")

    # -- pieces --------------------------------------------------------------------------
    def term(self, i: int) -> Kron:
        """The i-th term ``σ_i L_i ⊗ R_i`` as a :class:`Kron` (``term(0)`` is K-FOC's answer)."""
        if not -self.rank <= i < self.rank:
            raise IndexError(f"term index {i} out of range for rank {self.rank}")
        from ._closed_forms import _new_kron

        return _new_kron(self.lefts[i, ...], self.rights[i, ...], self.singular_values[i],
                         KronInfo(method=f"{self.info.method}[term {i % self.rank}]"), self._xp)

    def truncate(self, rank: int) -> "KronSVD":
        """The first ``rank`` terms: the best Kronecker-rank-``rank`` approximation (no recomputation).

        ``info.sigma2`` becomes σ_{rank+1} (exact from the kept values when ``rank < r``).
        """
        rank = check_int(rank, "rank")
        if not 1 <= rank <= self.rank:
            raise ValueError(f"rank must be an integer between 1 and {self.rank}, got {rank!r}")
        nxt = self.info.sigma2 if rank == self.rank else to_float(self.singular_values[rank])
        info = KronInfo(method=self.info.method, iterations=self.info.iterations,
                        converged=self.info.converged, sigma1=self.info.sigma1, sigma2=nxt,
                        residual=self.info.residual, notes=self.info.notes)
        return KronSVD(self.singular_values[:rank], self.lefts[:rank, ...], self.rights[:rank, ...],
                       info=info, total_norm=self.total_norm)

    def _as_stack(self) -> tuple[Array, Array, Array]:
        """``(scales (r,), lefts (r, m, m), rights (r, n, n))``: the form error evaluation uses."""
        return self.singular_values, self.lefts, self.rights

    # -- algebra -------------------------------------------------------------------------
    def to_dense(self) -> Array:
        """The ``(m·n, m·n)`` matrix ``Σ σ_i kron(L_i, R_i)``. Cost and memory O(r(mn)²): tests only."""
        xp = self._xp
        m, n = self.m, self.n
        big = self.lefts[:, :, None, :, None] * self.rights[:, None, :, None, :]
        big = self.singular_values[:, None, None, None, None] * big
        return xp.reshape(xp.sum(big, axis=0), (m * n, m * n))

    def matvec(self, V: Array) -> Array:
        """``Σ σ_i L_i V R_iᵀ`` for ``V`` of shape ``(..., m, n)``: the product with vec(V).

        Cost O(r·mn(m + n)) per matrix; no ``(mn)²`` array is formed.
        """
        V = self._check_V(V)
        xp = self._xp
        out = None
        for i in range(self.rank):
            t = self.singular_values[i] * (self.lefts[i, ...] @ V @ xp.matrix_transpose(self.rights[i, ...]))
            out = t if out is None else out + t
        return out

    def trace(self) -> Array:
        """``Σ σ_i tr(L_i) tr(R_i)`` as a 0-d array."""
        xp = self._xp
        return xp.sum(self.singular_values * trace(self.lefts, xp) * trace(self.rights, xp))

    def _check_V(self, V):
        if not is_array(V):
            raise TypeError(f"V must be an array, got {type(V).__name__}")
        if V.ndim < 2 or tuple(V.shape[-2:]) != (self.m, self.n):
            raise ValueError(
                f"V must have shape (..., m, n) = (..., {self.m}, {self.n}), got {tuple(V.shape)}"
            )
        return V

    # -- damped solves -------------------------------------------------------------------
    def solve(self, V: Array, damping: Any, *, method: str = "auto", damping_method: str = "exact",
              tol: float | None = None, max_iter: int | None = None, return_info: bool = False):
        r"""``A⁻¹ vec(V)`` reshaped, for ``V`` of shape ``(..., m, n)``, with the damped matrix

        * ``damping_method="exact"``: ``A = Σ_i σ_i L_i ⊗ R_i + λI``;
        * ``damping_method="factored"``: the leading term damped as K-FAC's factored Tikhonov
          with the π correction (:class:`kronsum.KronInverse`, ``method="factored"``),
          ``A = (σ_1 L_1 + π√λ I) ⊗ (R_1 + √λ/π I) + Σ_{i≥2} σ_i L_i ⊗ R_i``.

        Methods:

        ``"exact"``  r = 1: the damped Kronecker inverse. r = 2: simultaneous diagonalisation.
                     When the damped leading term ``D_1 = P ⊗ Q`` is a Kronecker product of
                     positive-definite factors (``damping_method="factored"``, or ``λ = 0`` with
                     ``L_1``, ``R_1`` positive definite), whiten by it: with ``P = X_P X_Pᵀ``,
                     the eigendecomposition ``X_P⁻¹ L_2 X_P⁻ᵀ = E diag(μ) Eᴴ`` (same on the right,
                     ``ν``) makes ``A`` diagonal, ``1 + σ_2 μ_a ν_b``, in the basis
                     ``(X_P⁻ᵀE) ⊗ (X_Q⁻ᵀF̄)``: exact, O(m³ + n³) once, O(mn(m + n)) per solve.
                     A symmetric second factor has a real ``E``; an antisymmetric one (the
                     conv form's second pair can be) a complex unitary ``E`` and imaginary
                     ``μ``. Factors that are neither have no exact route.
                     ``σ_1 L_1 ⊗ R_1 + σ_2 L_2 ⊗ R_2 + λI`` with ``λ > 0`` has three Kronecker
                     terms, which cannot in general be diagonalised together: it is not exact.
        ``"cg"``     preconditioned conjugate gradients on ``A`` (applied as ``r`` Kronecker
                     products plus the damped leading term, O(r·mn(m + n)) per iteration),
                     preconditioned by the damped rank-1 inverse ``D_1⁻¹``; stops when every
                     right-hand side has ``‖b − A x‖ / ‖b‖ ≤ tol``. CG needs A symmetric positive
                     definite: a negative curvature ``pᵀAp ≤ 0`` stops it with a note (the
                     truncated sum need not be PSD; raise the damping).
        ``"auto"``   ``"exact"`` where it is exact (r = 1; r = 2 as above), else ``"cg"``.

        The leading term's eigendecompositions are computed once and reused for every
        damping; the damped inverses (and the rank-2 diagonalisations, which depend on the
        damping) are cached for the last 8 ``(damping, damping_method)`` pairs used.

        Parameters
        ----------
        V : array (..., m, n)
        damping : float or 0-d array, ``λ ≥ 0``
        method : {"auto", "exact", "cg"}
        damping_method : {"exact", "factored"}
        tol : float, optional
            CG's relative residual; default 1e-10 (float64), 1e-5 (float32).
        max_iter : int, optional
            CG's most iterations (default 500; each costs O(r·mn(m + n)) per right-hand side).
        return_info : bool
            Also return a :class:`KronInfo` with ``method`` (``"kronsvd-solve/exact"`` or
            ``"kronsvd-solve/cg"``), ``iterations`` (CG iterations; 0 for exact), ``converged``,
            ``residual`` (the relative residual ``max ‖b − Ax‖/‖b‖`` over the right-hand sides,
            recomputed from the answer: one more product with A) and ``notes``.
            ``converged`` holds only when that residual passes the check: every right-hand side
            has ``‖b − Ax‖ ≤ max(tol·‖b‖, 10(m + n)·ε·(‖A‖‖x‖ + ‖b‖))`` (the exact routes too;
            the rank-2 route is also checked once per damping on a random right-hand side
            before it is used).

        Returns
        -------
        array (..., m, n), or ``(array, KronInfo)`` with ``return_info=True``.

        Examples
        --------
        >>> import numpy as np
        >>> import kronsum as ks
        >>> rng = np.random.default_rng(0)
        >>> F = ks.KronSum.from_outer(rng.standard_normal((40, 3)), rng.standard_normal((40, 4)))
        >>> B = ks.kronecker_svd(F, rank=3)
        >>> V = rng.standard_normal((3, 4))
        >>> X, info = B.solve(V, damping=1.0, return_info=True)
        >>> A = B.to_dense() + np.eye(12)
        >>> bool(np.allclose(X.reshape(-1), np.linalg.solve(A, V.reshape(-1)))), info.method
        (True, 'kronsvd-solve/cg')
        """
        from ._inverse import _check_damping

        V = self._check_V(V)
        lam = _check_damping(damping)
        if method not in _SOLVE_METHODS:
            raise ValueError(f"method must be one of {_SOLVE_METHODS}, got {method!r}")
        if damping_method not in _DAMPINGS:
            raise ValueError(f"damping_method must be one of {_DAMPINGS}, got {damping_method!r}")
        xp = self._xp
        if tol is None:
            tol = _default_tol(xp, self.dtype)
        tol = check_real(tol, "tol", positive=True)
        max_iter = check_int(500 if max_iter is None else max_iter, "max_iter", minimum=1)
        lead = self._lead_inverse(lam, damping_method)
        notes: list[str] = list(lead[1]) if lead[0] is not None else [lead[1]]
        inv1 = lead[0]
        r = self.rank
        if method in ("auto", "exact") and r == 1:
            if inv1 is None:
                raise ValueError(f"the damped rank-1 matrix cannot be inverted: {lead[1]}")
            X = inv1.solve(V)
            if not return_info:
                return X
            return X, self._checked_info(X, V, lam, damping_method, inv1, tol, notes)
        if method in ("auto", "exact") and r == 2:
            ok, prep = self._exact2(lam, damping_method, inv1)
            if ok:
                apply, extra = prep
                X = apply(V)
                if not return_info:
                    return X
                return X, self._checked_info(X, V, lam, damping_method, inv1, tol, notes + list(extra))
            if method == "exact":
                raise ValueError(f"no exact solve for this rank-2 matrix: {prep}")
            notes.append(f"exact rank-2 solve not available ({prep}): used CG")
        elif method == "exact":
            raise ValueError(
                f"method='exact' solves rank 1 and rank 2 only (this result has rank {r}); "
                "use method='cg' or 'auto'"
            )
        X, its, conv, res, cg_notes = self._cg(V, lam, damping_method, inv1, tol, max_iter)
        info = KronInfo(method="kronsvd-solve/cg", iterations=its, converged=conv, residual=res,
                        notes=tuple(notes + cg_notes))
        if not conv and not return_info:
            import warnings

            warnings.warn(
                f"KronSVD.solve: CG did not converge (relative residual {res:.3g} after {its} "
                f"iterations; {'; '.join(cg_notes) or 'max_iter reached'}); the result is not a "
                "solution. Raise the damping (any λ ≥ Σ_(i≥2) σ_i is safe) or pass return_info=True",
                RuntimeWarning, stacklevel=2,
            )
        return (X, info) if return_info else X

    def _cached(self, key, compute):
        """``compute()`` cached under ``key``; the least recently used entry beyond
        ``_CACHE_SIZE`` is dropped, so that many dampings do not grow the cache."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        out = compute()
        self._cache[key] = out
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return out

    def _lead_inverse(self, lam: float, damping_method: str):
        """``(KronInverse of the damped leading term, notes)`` or ``(None, reason)``; cached.
        The two eigendecompositions of the leading term are computed once for all dampings."""
        from ._inverse import KronInverse, _Eig

        if self._lead_eig is None:
            try:
                self._lead_eig = (_Eig(self.term(0), "the leading term"), None)
            except ValueError as exc:
                self._lead_eig = (None, str(exc))
        eig, why = self._lead_eig

        def compute():
            if eig is None:
                return (None, why)
            try:
                inv = KronInverse._from_eig(eig, damping_method, lam)
                return (inv, tuple(inv.notes))
            except ValueError as exc:
                return (None, str(exc))

        return self._cached(("lead", lam, damping_method), compute)

    def _damped_lead_matvec(self, V, lam, damping_method, inv1):
        if inv1 is not None:
            return inv1.matvec(V)
        if damping_method != "exact":
            raise ValueError("the leading term must be symmetric positive semi-definite for "
                             "damping_method='factored'")
        return self.term(0).matvec(V) + lam * V

    def _matvec_damped(self, V, lam, damping_method, inv1):
        """``A vec(V)``: the damped leading term plus the terms ``i ≥ 2``."""
        xp = self._xp
        out = self._damped_lead_matvec(V, lam, damping_method, inv1)
        for i in range(1, self.rank):
            out = out + self.singular_values[i] * (self.lefts[i, ...] @ V @ xp.matrix_transpose(self.rights[i, ...]))
        return out

    def _norm_bound(self, lam, damping_method, inv1) -> float:
        """An upper bound of ``‖A‖₂``: the damped leading term's largest eigenvalue (or
        ``σ_1 + λ``) plus ``Σ_{i≥2} σ_i`` (unit-Frobenius factors have spectral norm ≤ 1)."""
        xp = self._xp
        if inv1 is not None:
            lead = to_float(xp.max(xp.abs(inv1.eigvals())))
        else:
            lead = to_float(self.singular_values[0]) + lam
        return lead + sum(abs(to_float(self.singular_values[i])) for i in range(1, self.rank))

    def _residual(self, X, B, lam, damping_method, inv1, tol) -> tuple[float, bool]:
        """``(max ‖B − A X‖ / ‖B‖, ok)`` over the right-hand sides (0 for zero ones).

        ``ok``: every right-hand side has ``‖B − AX‖ ≤ max(tol·‖B‖, c·ε·(‖A‖‖X‖ + ‖B‖))``,
        the relative residual or a normwise backward error at rounding level
        (``c = 10·(m + n)``): what a backward-stable solve reaches however ill-conditioned A
        is, and what a solve of the wrong matrix does not.
        """
        xp = self._xp
        Rm = B - self._matvec_damped(X, lam, damping_method, inv1)
        rn = xp.sqrt(xp.sum(Rm * Rm, axis=(-2, -1)))
        bn = xp.sqrt(xp.sum(B * B, axis=(-2, -1)))
        xn = xp.sqrt(xp.sum(X * X, axis=(-2, -1)))
        eps = float(xp.finfo(self.dtype).eps)
        floor = 10 * (self.m + self.n) * eps * (self._norm_bound(lam, damping_method, inv1) * xn + bn)
        ok = bool(xp.all(rn <= xp.maximum(tol * bn, floor)))
        return to_float(xp.max(rn / xp.where(bn > 0, bn, xp.ones_like(bn)))), ok

    def _checked_info(self, X, V, lam, damping_method, inv1, tol, notes) -> KronInfo:
        """The exact routes' diagnostics: ``converged`` only when the answer passes
        :meth:`_residual`'s check (one more product with A)."""
        res, ok = self._residual(X, V, lam, damping_method, inv1, tol)
        if not ok:
            notes = list(notes) + [f"the exact solve failed its residual check (relative residual "
                                   f"{res:.3g}): the result is not a solution"]
        return KronInfo(method="kronsvd-solve/exact", residual=res, converged=ok, notes=tuple(notes))

    def _exact2(self, lam, damping_method, inv1):
        r"""The exact rank-2 solve by whitening with the damped leading term ``P ⊗ Q``.

        Returns ``(True, (apply, notes))`` with ``apply(V) = A⁻¹V`` or ``(False, reason)``;
        cached per ``(λ, damping_method)``. With ``P = W_P⁻ᵀW_P⁻¹`` (same for ``Q``),
        ``A = (W_P ⊗ W_Q)⁻ᵀ (I + σ_2 C_P ⊗ C_Q) (W_P ⊗ W_Q)⁻¹`` for ``C_P = W_PᵀL_2W_P``,
        ``C_Q = W_QᵀR_2W_Q``. A symmetric ``C`` is ``U diag(d) Uᵀ`` (real ``eigh``); an
        antisymmetric one (the conv form's second pair can be) is ``U diag(−iν) Uᴴ`` from the
        Hermitian ``eigh(iC)``. Then ``C_P Y C_Qᵀ = U_P (d_P d_Qᵀ ∘ U_PᴴYŪ_Q) U_Qᵀ`` and
        ``A⁻¹`` is diagonal, ``1 + σ_2 d_P,a d_Q,b``, in that basis. Factors that are neither
        (user-built terms) have no such diagonalisation: ``(False, reason)``. The route is
        checked once on a random right-hand side (:meth:`_residual`) before it is used.
        """
        return self._cached(("exact2", lam, damping_method),
                            lambda: self._exact2_compute(lam, damping_method, inv1))

    def _exact2_compute(self, lam, damping_method, inv1):
        xp = self._xp
        if inv1 is None:
            out = (False, "the leading term is not symmetric positive semi-definite")
        elif damping_method == "exact" and lam > 0:
            out = (False, "λI added to two Kronecker terms is not simultaneously diagonalisable; "
                          "exact for damping=0 or damping_method='factored'")
        else:
            out = self._whitened2(inv1)
        if out[0]:
            probe = xp.asarray(np.random.default_rng(0).standard_normal((self.m, self.n)),
                               dtype=self.dtype, device=device_of(self.lefts))
            # judged at the rounding floor alone (tol = 0): the cached route then serves every
            # later call, whatever tolerance it passes
            res, ok = self._residual(out[1][0](probe), probe, lam, damping_method, inv1, 0.0)
            if not ok:
                out = (False, f"the whitened rank-2 solve failed its residual check on a random "
                              f"right-hand side (relative residual {res:.3g})")
        return out

    def _whitened2(self, inv1):
        """The diagonalisation of :meth:`_exact2`: ``(True, (apply, notes))`` or ``(False, reason)``."""
        xp = self._xp
        if inv1.damped_left is not None:
            p, q = inv1.damped_left, inv1.damped_right
        else:  # λ = 0: D_1 = s L ⊗ R itself
            p, q = inv1.scale * inv1.eigvals_left, inv1.eigvals_right
        eps = float(xp.finfo(self.dtype).eps)
        pmin, pmax = to_float(xp.min(p)), to_float(xp.max(p))
        qmin, qmax = to_float(xp.min(q)), to_float(xp.max(q))
        tiny = 10 * max(self.m, self.n) * eps
        if not (pmin > tiny * pmax and qmin > tiny * qmax):
            return False, "the damped leading term is singular (not positive definite)"
        parities = (_parity(self.lefts[1, ...], xp), _parity(self.rights[1, ...], xp))
        if None in parities:
            return False, ("the second term's factors are neither symmetric nor antisymmetric: "
                           "no simultaneous diagonalisation")
        WP = inv1.eigvecs_left / xp.sqrt(p)[None, :]
        WQ = inv1.eigvecs_right / xp.sqrt(q)[None, :]
        complex_ = "anti" in parities
        (dP, UP), (dQ, UQ) = (
            _eig_parity(xp.matrix_transpose(W) @ M @ W, parity, complex_, xp)
            for W, M, parity in ((WP, self.lefts[1, ...], parities[0]),
                                 (WQ, self.rights[1, ...], parities[1])))
        E = 1.0 + self.singular_values[1] * (dP[:, None] * dQ[None, :])
        absE = xp.abs(E)
        if not to_float(xp.min(absE)) > tiny * to_float(xp.max(absE)):
            return False, "the damped rank-2 matrix is singular"
        notes = []
        if parities[0] != parities[1]:
            notes.append("the second term is antisymmetric (one factor symmetric, one "
                         "antisymmetric): the damped rank-2 matrix is not symmetric")
        elif to_float(xp.min(xp.real(E) if complex_ else E)) < 0:
            notes.append("the damped rank-2 matrix is indefinite (the truncated sum is "
                         "not PSD): the solve is exact but not a descent direction")
        if complex_:
            cdt = UP.dtype
            XU, XV = _as(WP, cdt, xp) @ UP, _as(WQ, cdt, xp) @ xp.conj(UQ)
            XUh, XVh = xp.conj(xp.matrix_transpose(XU)), xp.conj(xp.matrix_transpose(XV))

            def apply(V):
                Y = (XUh @ _as(V, cdt, xp) @ XV) / E
                return xp.real(XU @ Y @ XVh)
        else:
            XU, XV = WP @ UP, WQ @ UQ

            def apply(V):
                Y = (xp.matrix_transpose(XU) @ V @ XV) / E
                return XU @ Y @ xp.matrix_transpose(XV)
        return True, (apply, tuple(notes))

    def _cg(self, B, lam, damping_method, inv1, tol, max_iter):
        """Preconditioned CG, batched over the leading axes of ``B`` (..., m, n)."""
        xp = self._xp
        notes: list[str] = []
        if inv1 is None:
            precond = None
            notes.append("no preconditioner: the leading term is not symmetric positive "
                         "semi-definite, or singular at this damping")
        else:
            precond = inv1.solve

        def dot(X, Y):
            return xp.sum(X * Y, axis=(-2, -1), keepdims=True)

        def A(X):
            return self._matvec_damped(X, lam, damping_method, inv1)

        bn = xp.sqrt(dot(B, B))
        safe = xp.where(bn > 0, bn, xp.ones_like(bn))
        X = xp.zeros_like(B)
        R = B
        Z = R if precond is None else precond(R)
        P = Z
        rz = dot(R, Z)
        its, conv = 0, False
        res = to_float(xp.max(xp.sqrt(dot(R, R)) / safe))
        if res <= tol:
            conv = True
        while not conv and its < max_iter:
            AP = A(P)
            pAp = dot(P, AP)
            active = xp.sqrt(dot(R, R)) / safe > tol
            if bool(xp.any(xp.logical_and(active, pAp <= 0))):
                notes.append(f"negative curvature pᵀAp ≤ 0 at iteration {its + 1}: the damped "
                             "matrix is not positive definite; raise the damping")
                break
            ok = pAp > 0
            alpha = xp.where(ok, rz / xp.where(ok, pAp, xp.ones_like(pAp)), xp.zeros_like(pAp))
            X = materialize(X + alpha * P)
            R = materialize(R - alpha * AP)
            its += 1
            res = to_float(xp.max(xp.sqrt(dot(R, R)) / safe))
            if res <= tol:
                conv = True
                break
            Z = R if precond is None else precond(R)
            rz_new = dot(R, Z)
            nz = rz != 0
            beta = xp.where(nz, rz_new / xp.where(nz, rz, xp.ones_like(rz)), xp.zeros_like(rz))
            P = materialize(Z + beta * P)
            rz = rz_new
        true_res, ok = self._residual(X, B, lam, damping_method, inv1, tol)
        if conv and not ok:  # the recurrence's residual drifted from the true one
            conv = False
            notes.append(f"CG's recurrence residual met tol but the recomputed one did not "
                         f"(relative residual {true_res:.3g})")
        elif not conv:
            notes.append(f"CG not converged: relative residual {true_res:.3g} > tol {tol:.3g} "
                         f"after {its} iterations")
        return X, its, conv, true_res, notes


def _eigh(M: Array, xp: Any):
    if is_dask_namespace(xp):
        w, U = np.linalg.eigh(np.asarray(M.compute()))
        return xp.asarray(w), xp.asarray(U)
    return xp.linalg.eigh(M)


def _as(x: Array, dtype: Any, xp: Any) -> Array:
    return x if x.dtype == dtype else xp.astype(x, dtype)


def _parity(M: Array, xp: Any) -> str | None:
    """``"sym"`` or ``"anti"`` when ``M`` is symmetric or antisymmetric up to ``√ε·‖M‖``
    (rounding in the factors; what is dropped is caught by the solve's residual check),
    ``None`` otherwise."""
    nS, nN = to_float(fro_norm(symmetrize(M, xp), xp)), to_float(fro_norm(antisymmetrize(M, xp), xp))
    tau = math.sqrt(float(xp.finfo(M.dtype).eps)) * (nS + nN)
    return "sym" if nN <= tau else "anti" if nS <= tau else None


def _eig_parity(C: Array, parity: str, complex_: bool, xp: Any):
    """``(d, U)`` with ``C = U diag(d) Uᴴ``, ``U`` unitary: ``eigh`` of the symmetric part, or
    ``d = −iν`` from the Hermitian ``eigh(iC)`` of the antisymmetric part; complex when
    ``complex_``."""
    cdt = xp.complex64 if C.dtype == xp.float32 else xp.complex128
    if parity == "sym":
        d, U = _eigh(symmetrize(C, xp), xp)
        return (_as(d, cdt, xp), _as(U, cdt, xp)) if complex_ else (d, U)
    nu, U = _eigh(_as(antisymmetrize(C, xp), cdt, xp) * 1j, xp)
    return _as(nu, cdt, xp) * (-1j), U


# -- the solver ------------------------------------------------------------------------------


@counted
def kronecker_svd(F: KronSum, rank: int = 1, *, method: str = "auto", tol: float | None = None,
                  max_iter: int | None = None, seed: int | None = None) -> KronSVD:
    r"""The best Kronecker-rank-r approximation ``Σ_{i≤r} σ_i L_i ⊗ R_i`` of F (Van Loan & Pitsianis).

    The truncated SVD of the rearrangement ``𝓡(F)``, computed without forming F or 𝓡(F):

    .. math::

        \Big\|F - \sum_{i\le r}\sigma_i L_i \otimes R_i\Big\|_F = \Big(\sum_{i>r}\sigma_i^2\Big)^{1/2}
        = \min_{\operatorname{rank}_\otimes B \le r} \|F - B\|_F .

    Parameters
    ----------
    F : KronSum
    rank : int
        r, with ``1 ≤ r ≤ min(m², n²)`` (the largest Kronecker rank of an ``(mn, mn)`` matrix).
    method : {"auto", "gram", "lanczos"}
        ``"gram"`` (outer and terms forms): block Lanczos on K-vectors of coefficients in the
        ``S_P`` inner product, after the two K×K Gram matrices. ``"lanczos"``: block Lanczos on
        ``(d, d)`` matrices through the contractions, ``d = min(m, n)`` (any form, any
        backend). ``"auto"`` follows :func:`kronsum.choose_method` (``"lanczos"`` where it
        picks the conv form's Gram solver, which has no rank-r version).
    tol : float, optional
        Stop when each of the top r Ritz pairs has ``‖𝓡𝓡ᵀu_i − θ_i u_i‖ ≤ tol·θ_i`` (or is at
        the rounding floor ``1e3·ε·θ_1``), ``θ_i = σ_i²``. Default 1e-10 (float64), 1e-5
        (float32).
    max_iter : int, optional
        Most operator applications (each = both contractions, or one Gram step); default
        ``max(500, 100 r)``.
    seed : int, optional
        Seed of the random start vectors of the block (terms 2..r) and of the factors of
        ``σ = 0`` terms; default a fixed seed, so results are deterministic.

    Returns
    -------
    KronSVD
        ``singular_values`` (r,), orthonormal unit-Frobenius ``lefts`` (r, m, m) and ``rights``
        (r, n, n), symmetric when the terms are; ``explained`` = ``Σσ_i²/‖F‖²``; ``info``.
        If 𝓡(F) has rank k < r, terms k+1..r have ``σ = 0`` and arbitrary orthonormal factors
        (noted). Near-degenerate ``σ_i ≈ σ_{i+1}`` (inside the top r, or ``σ_r ≈ σ_{r+1}``)
        gives one optimal answer and a note.

    Notes
    -----
    Cost, outer form: ``gram`` O(K²(m + n)) for the Gram matrices, O(K²) per application
    (typically a few tens of applications for r ≤ 8), and O(r·K(m² + n²)) to form the r pairs of
    factors, which dominates: about r times K-FOC's factor cost. ``lanczos``: O(K(m² + n²)) per
    application (conv: see :meth:`KronSum.contract_left`) plus O(b·r·d²) for the Rayleigh–Ritz
    over a basis of b ≤ max(20, 4r) vectors; the number of applications grows roughly like r
    times K-FOC's. Memory O(max(20, 4r)·d²) (lanczos) or O(K² + max(20, 4r)·K) (gram).

    Examples
    --------
    >>> import numpy as np
    >>> import kronsum as ks
    >>> rng = np.random.default_rng(0)
    >>> F = ks.KronSum.from_outer(rng.standard_normal((50, 3)), rng.standard_normal((50, 4)))
    >>> B = ks.kronecker_svd(F, rank=3)
    >>> B.singular_values.shape, B.lefts.shape, B.rights.shape
    ((3,), (3, 3, 3), (3, 4, 4))
    >>> s = np.linalg.svd(F.rearranged(), compute_uv=False)
    >>> bool(np.allclose(B.singular_values, s[:3]))
    True
    >>> bool(np.isclose(ks.frobenius_error(F, B), np.sqrt(np.sum(s[3:] ** 2))))
    True
    >>> bool(np.isclose(B.explained, np.sum(s[:3] ** 2) / np.sum(s ** 2)))
    True
    """
    F = _require_sum(F, "kronecker_svd")
    m, n = F.m, F.n
    rmax = min(m * m, n * n)
    rank = check_int(rank, "rank")
    if not 1 <= rank <= rmax:
        raise ValueError(
            f"rank must be an integer with 1 <= rank <= min(m², n²) = min({m * m}, {n * n}) = "
            f"{rmax} for factors of sizes m={m}, n={n}; got {rank!r}"
        )
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    F = F._outer_positions()  # T = 1 conv parts: outer parts, the same F
    requested, method = method, choose_method(F, method)
    if method == "gram" and not F._gram_able():  # the rank-r solver has no conv Gram space
        if requested == "gram":
            raise ValueError("kronecker_svd's method='gram' needs the outer or terms form, or a "
                             "sum of such parts; use 'lanczos' for the conv form")
        method = "lanczos"
    xp = F.xp
    tol_given = tol
    if tol is None:
        tol = _default_tol(xp, F.dtype)
    tol = check_real(tol, "tol", positive=True)
    if max_iter is None:
        max_iter = max(500, 100 * rank)
    max_iter = check_int(max_iter, "max_iter", minimum=1)
    rng = np.random.default_rng(0 if check_seed(seed) is None else seed)

    Fn, (cw, cl, cr) = F.normalized()
    Fn = Fn.persisted()
    c = cw * (cl * cr)
    dtype, dev = Fn.dtype, Fn.device
    w = Fn.weights
    unit_terms = None  # the Gram solver's (1/‖L_k‖, 1/‖R_k‖)
    kind = _range_kind(Fn)
    notes = []
    if method == "gram":
        SP, SQ = Fn._gram("left"), Fn._gram("right")
        f2 = GramSpace(SP, SQ, w, xp).f2()
        aw = xp.abs(w)
        ratio = to_float(xp.sum(aw * ((xp.abs(SP) * xp.abs(SQ)) @ aw))) / max(to_float(f2), 1e-300)
        if ratio > 2:  # terms that cancel: ‖F‖² a small part of its terms' magnitudes
            # the Gram entries' rounding comes at the terms' scale, ratio times F's own; Lanczos
            # on the contractions meets it once rather than twice
            how = ("solved by Lanczos on the contractions" if requested == "auto" else
                   "the Gram route's singular values carry rounding of about ε·ratio·σ₁²/σ_i; "
                   "method='lanczos' avoids it")
            notes.append(f"the terms cancel (the sum of their magnitudes is {ratio:.3g} times "
                         f"‖F‖²): {how}")
            if requested == "auto":
                method = "lanczos"
    if method == "gram":
        # equilibrate: coefficients of the unit terms L_k/‖L_k‖, R_k/‖R_k‖, so that the metric is
        # a correlation matrix (unit diagonal) and the per-sample magnitudes, which are
        # heavy-tailed, sit in the weights w̃_k = w_k‖L_k‖‖R_k‖ (zero terms drop out)
        eye = xp.eye(Fn.num_terms, dtype=dtype, device=dev)
        nl = xp.sqrt(xp.sum(SP * eye, axis=1))
        nr = xp.sqrt(xp.sum(SQ * eye, axis=1))
        dl = xp.where(nl > 0, 1 / xp.where(nl > 0, nl, xp.ones_like(nl)), xp.zeros_like(nl))
        dr = xp.where(nr > 0, 1 / xp.where(nr > 0, nr, xp.ones_like(nr)), xp.zeros_like(nr))
        SPt = materialize(SP * dl[:, None] * dl[None, :])
        SQt = materialize(SQ * dr[:, None] * dr[None, :])
        wt = w * nl * nr
        space = GramSpace(SPt, SQt, wt, xp)
        x0 = wt * (Fn._traces("right") * dr)
        K = Fn.num_terms

        def draw():
            return xp.asarray(rng.standard_normal(K), dtype=dtype, device=dev)

        side = "gram"
        unit_terms = (dl, dr)

        def floor(a):  # rounding floor of an S̃_P-norm: sqrt(eps·‖S̃_P‖)·‖α‖₂, ‖S̃_P‖ ≥ 1
            return to_float(xp.sqrt(xp.sum(a * a)))
    else:
        side = "left" if m <= n else "right"
        space = contraction_space(Fn, side)
        x0 = _initial(Fn, "tkfac", None, side)
        d = m if side == "left" else n

        def draw():
            Z = rng.standard_normal((d, d))
            if kind == "sym":
                Z = Z + Z.T
            return xp.asarray(Z, dtype=dtype, device=dev)

        f2 = Fn._sq_norm()
        floor = None
    f2 = max(to_float(f2), 0.0)
    starts = [x0] + [draw() for _ in range(rank - 1)]
    max_dim = max(KRYLOV_DIM, 4 * rank)
    top = block_lanczos(space, starts, rank, Stop(float(tol)), max_iter, draw, max_dim, floor)
    its, conv, res, theta_next = top.iterations, top.converged, top.residual, top.theta_next
    Ls, Rs, sig, pad_notes = finish_block(Fn, side, space, top.vectors, rank, rng, unit_terms, kind)
    sig_host = [to_float(s) for s in sig]
    notes += list(pad_notes)
    eps = float(xp.finfo(dtype).eps)
    s1 = sig_host[0]
    if s1 > 0 and method == "lanczos" and positions_cancel(Fn, s1, eps):
        # conv positions that cancel within a sample: the contractions round at the positions'
        # scale S', about ε·S'/σ_i of each σ_i; below float64, solved in float64
        why = ("the conv positions cancel within a sample (their products' magnitude is "
               f"{Fn._positions_scale()[0] / s1:.3g} times σ₁), so the contractions round at that scale")
        if dtype != xp.float64 and float64_available(xp):
            out = kronecker_svd(F.astype(xp.float64), rank, method=requested, tol=tol_given,
                                max_iter=max_iter, seed=seed)
            info = out.info
            info = KronInfo(method=info.method, iterations=info.iterations, converged=info.converged,
                            sigma1=info.sigma1, sigma2=info.sigma2, residual=info.residual,
                            notes=info.notes + (f"{why}: solved in float64",))
            return KronSVD(xp.astype(out.singular_values, F.dtype), xp.astype(out.lefts, F.dtype),
                           xp.astype(out.rights, F.dtype), info=info, total_norm=out.total_norm)
        notes.append(f"{why}: each σ_i carries rounding of about ε·{Fn._positions_scale()[0] / s1:.3g}·σ₁")
    if s1 > 0:
        floor = math.sqrt(eps) * s1  # below it, singular values are rounding: no notes
        for i in range(rank - 1):
            if sig_host[i + 1] > floor and sig_host[i] - sig_host[i + 1] <= math.sqrt(eps) * s1:
                notes.append(f"sigma{i + 1} == sigma{i + 2} to working precision: terms {i + 1} and "
                             f"{i + 2} are not unique (their sum is)")
        if theta_next is not None:
            s_next = math.sqrt(max(theta_next, 0.0))
            if sig_host[-1] > floor and sig_host[-1] - s_next <= math.sqrt(eps) * s1:
                notes.append(f"sigma{rank} == sigma{rank + 1} to working precision: the rank-{rank} "
                             "optimum is not unique; one optimal approximation is returned")
    else:
        notes.append("zero sum (sigma1 = 0): the estimate is zero")
    if not conv:
        notes.append(f"not converged: residual {res:.3g} > tol {tol:.3g} after {its} applications")
    check_in_range(s1 * c, "kronecker_svd's σ₁", xp, F.dtype)
    s_next = None if theta_next is None else math.sqrt(max(theta_next, 0.0)) * c
    info = KronInfo(method=f"kronsvd/{method}", iterations=its, converged=conv,
                    sigma1=s1 * c, sigma2=s_next, residual=res, notes=tuple(notes))
    sv = times_scale(xp.stack(sig), c)
    return KronSVD(sv, xp.stack(Ls), xp.stack(Rs), info=info, total_norm=math.sqrt(f2) * c)


def _range_kind(F: KronSum) -> str:
    """``"sym"`` when every term is symmetric (the ranges of 𝓡 and 𝓡ᵀ hold symmetric matrices
    only), ``"parity"`` when F is symmetric but its terms are not (conv: singular vectors are
    symmetric or antisymmetric), ``"none"`` otherwise."""
    if F.form == "sum":
        kinds = {_range_kind(P) for P in F.parts}
        if kinds == {"sym"}:
            return "sym"
        return "parity" if "none" not in kinds else "none"
    if F.form == "outer":
        return "sym"
    if F.form == "conv":
        return "parity"
    return "sym" if F.symmetric else "none"
