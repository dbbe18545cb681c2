r"""Damped inverses, log-determinants and samples of ``scale · L ⊗ R`` from its eigenbasis.

With the eigendecompositions ``L = U_L diag(a) U_Lᵀ`` and ``R = U_R diag(b) U_Rᵀ`` every
damped matrix below is diagonal in the basis ``U_L ⊗ U_R``,

.. math::

    D = (U_L \otimes U_R)\, \operatorname{diag}(\operatorname{vec} E)\, (U_L \otimes U_R)^T,

with the ``(m, n)`` grid of eigenvalues ``E`` given by the damping method:

``"exact"``     ``E_ij = s a_i b_j + λ``: the damped Kronecker matrix ``s L ⊗ R + λ I`` itself.
``"factored"``  ``E_ij = (s a_i + π√λ)(b_j + √λ/π)``, ``π = √((tr(sL)/m) / (tr(R)/n))``:
                factored Tikhonov damping with the π correction (Martens & Grosse 2015, §6.3),
                ``(sL + π√λ I) ⊗ (R + (√λ/π) I)``.
``"tkfac"``     ``E_ij = (√δ a_i/Σa + √λ)(√δ b_j/Σb + √λ)``, ``δ = s Σa Σb = tr(sL ⊗ R)``:
                TKFAC's Eq. (14), ``(√δ Φ + √λ I) ⊗ (√δ Ψ + √λ I)`` with unit-trace
                ``Φ = L/tr L``, ``Ψ = R/tr R`` (Gao et al. 2021).
``"tkfac_new"`` Eq. (15)-(16) of the same paper, over a set of layers: see
                :func:`tkfac_damped_inverses`.

so ``D⁻¹ vec(V) = vec(U_L ((U_Lᵀ V U_R) / E) U_Rᵀ)``, ``log det D = Σ_ij log E_ij`` and
``U_L (Z / √E) U_Rᵀ`` with ``Z ~ N(0, I)`` is a draw from ``N(0, D⁻¹)``; no ``(mn)²`` array is
ever formed. The two eigendecompositions cost ``O(m³ + n³)`` once (:class:`KronInverse` caches
them); each solve then costs ``O(mn(m + n))``.

Splitting the magnitude: a :class:`~kronsum.Kron` is ``scale · left ⊗ right`` and each
estimator splits the magnitude differently. All three methods here are functions of the
*product* only: ``"exact"`` trivially; ``"factored"`` is computed from the actual matrices
``S_L = scale·L`` and ``S_R = R`` and the π correction makes it invariant to moving any positive
factor ``c`` between them (``π`` scales by ``c``, so ``(cS_L + cπ√λ I) ⊗ (S_R/c + √λ/(cπ) I)`` is
unchanged); ``"tkfac"`` rewrites the product in TKFAC's own form ``δ Φ ⊗ Ψ`` with unit-trace
factors first, which is exactly the output of :func:`kronsum.tkfac`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ._compat import Array, all_finite, device_of, fro_norm, host_vector, is_array, is_dask_namespace, namespace, to_float
from ._kron import Kron
from ._validation import check_int, check_real

__all__ = ["DecompositionError", "KronInverse", "tkfac_damped_inverses"]

METHODS = ("exact", "factored", "tkfac")
_SEPARABLE = ("factored", "tkfac", "tkfac_new")


class DecompositionError(ValueError):
    """The eigendecomposition of a Kronecker factor failed or returned non-finite values.

    A ``ValueError`` subclass, as :class:`numpy.linalg.LinAlgError` is; the message names the
    factor's shape, the damping and the method.
    """


# -- validation ----------------------------------------------------------------------------


def _check_damping(damping: object, name: str = "damping") -> float:
    """A finite, non-negative real number (Python scalar or 0-d real array) as a float."""
    return check_real(damping, name, minimum=0.0, array_ok=True)


def _check_method(method: object) -> str:
    if method not in METHODS:
        raise ValueError(
            f"method must be one of {METHODS} (the new TKFAC scheme of Eq. (15)-(16) needs "
            f"all layers: use kronsum.tkfac_damped_inverses), got {method!r}"
        )
    return str(method)


def _eps(xp: Any, dtype: Any) -> float:
    return float(xp.finfo(dtype).eps)


# -- the cached eigendecomposition ----------------------------------------------------------


def sym_eigh(xp: Any, M: Array, what: str, *, check: bool = True, check_w: bool = True) -> tuple:
    """``(U, w)`` of the symmetric matrix ``M`` (``M = U diag(w) Uᵀ``, ascending ``w``).

    ``DecompositionError`` for NaN/inf or a failed decomposition, ``ValueError`` for a matrix
    that is not symmetric (``‖M − Mᵀ‖_F > √eps ‖M‖_F``); ``what`` names it in the messages.
    ``check=False`` (a matrix the library made symmetric itself) skips the input checks and the
    symmetrisation, four passes over M (eigh reads one triangle). ``check_w=False`` leaves the
    eigenvalues' finiteness to the caller (which reads them to the host anyway, and then raises
    :func:`eigenvalues_error`). On Dask (no ``linalg.eigh``) the matrix is materialised and
    decomposed with NumPy.
    """
    Ms = M
    if check:
        if not all_finite(xp, M):
            raise DecompositionError(f"the {what} contains NaN or infinite values")
        Mt = xp.matrix_transpose(M)
        nrm = to_float(fro_norm(M, xp))
        asym = to_float(fro_norm(M - Mt, xp))
        if asym > math.sqrt(_eps(xp, M.dtype)) * nrm:
            raise ValueError(
                f"the {what} is not symmetric (‖M − Mᵀ‖_F / ‖M‖_F = {asym / nrm:.3g}); damped "
                "inverses and eigenbases are defined for symmetric (positive semi-definite) factors"
            )
        Ms = (M + Mt) / 2
    try:
        if is_dask_namespace(xp):
            # Dask has no linalg.eigh: the factors are small (m x m), so materialise them,
            # decompose with NumPy and wrap the results back as (single-chunk) Dask arrays.
            w, U = np.linalg.eigh(np.asarray(Ms.compute()))
            w, U = xp.asarray(w), xp.asarray(U)
        else:
            w, U = xp.linalg.eigh(Ms)
    except Exception as exc:
        raise DecompositionError(
            f"eigendecomposition of the {what} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not ((not check_w or all_finite(xp, w)) and (not check or all_finite(xp, U))):
        raise eigenvalues_error(what)
    return U, w


def eigenvalues_error(what: str) -> DecompositionError:
    """The error of a decomposition of the ``what`` whose results are not finite."""
    return DecompositionError(f"eigendecomposition of the {what} returned non-finite values")


class _GridEig:
    """The eigendecomposition ``(U ⊗ V) diag(vec S) (U ⊗ V)ᵀ`` of an eigenvalue-corrected
    estimate (:class:`kronsum.EigenKron`), in the form :class:`KronInverse` reads (method
    ``"exact"`` only): ``grid`` is ``S`` with rounding-level negative entries clipped to 0."""

    __slots__ = ("xp", "UL", "UR", "grid", "a", "b", "s", "m", "n", "dtype", "device", "notes",
                 "sum_a", "sum_b")

    def __init__(self, xp: Any, U: Array, V: Array, S: Array, label: str):
        self.xp = xp
        self.UL, self.UR = U, V
        self.m, self.n = int(U.shape[0]), int(V.shape[0])
        self.dtype, self.device = S.dtype, device_of(S)
        self.a = self.b = None
        self.s = self.sum_a = self.sum_b = None
        where = f"EigenKron of shape ({self.m}·{self.n}, {self.m}·{self.n}) with {label}"
        if not all_finite(xp, S):
            raise ValueError(f"the eigenvalues S of the {where} contain NaN or infinite values")
        notes: list[str] = []
        smin, smax = to_float(xp.min(S)), to_float(xp.max(xp.abs(S)))
        if smin < 0:
            tol = 10 * max(self.m, self.n) * _eps(xp, S.dtype) * smax
            if smin < -tol:
                raise ValueError(
                    f"the {where} is not positive semi-definite: smallest eigenvalue "
                    f"{smin:.6g} (largest magnitude {smax:.6g}, rounding tolerance {tol:.3g}); "
                    "damped inverses, log-determinants and sampling need S >= 0"
                )
            k = int(to_float(xp.sum(xp.where(S < 0, xp.ones_like(S), xp.zeros_like(S)))))
            notes.append(f"clipped {k} negative eigenvalue(s) of S (smallest {smin:.3g}, within "
                         f"the rounding tolerance {tol:.3g}) to 0")
            S = xp.where(S < 0, xp.zeros_like(S), S)
        self.grid = S
        self.notes = notes


class _Eig:
    """Canonical eigendecomposition ``s (U_L diag(a) U_Lᵀ) ⊗ (U_R diag(b) U_Rᵀ)``.

    Signs are canonical (``Σa >= 0``, ``Σb >= 0``, the sign moved into ``s``), rounding-level
    negative eigenvalues are clipped to 0, and ``s >= 0`` unless the product is zero.
    """

    __slots__ = ("xp", "UL", "a", "UR", "b", "s", "m", "n", "dtype", "device", "notes",
                 "sum_a", "sum_b")
    grid = None  # the grid eigendecompositions (_GridEig) carry their eigenvalues here

    def __init__(self, kron: Kron, label: str, check: bool = True):
        if not isinstance(kron, Kron):
            raise TypeError(
                f"expected a kronsum.Kron (wrap factors as Kron(left, right, scale)), got "
                f"{type(kron).__name__}"
            )
        xp = kron._xp
        self.xp = xp
        self.m, self.n = kron.m, kron.n
        self.dtype = kron.dtype
        self.device = device_of(kron.left)
        notes: list[str] = []
        where = f"Kron of shape ({self.m}·{self.n}, {self.m}·{self.n}) with {label}"
        s = to_float(kron.scale)
        if not math.isfinite(s):
            raise ValueError(f"scale of the {where} is not finite: {s}")
        self.UL, a = self._eigh(kron.left, "left", (self.m, self.m), where, check)
        self.UR, b = self._eigh(kron.right, "right", (self.n, self.n), where, check)
        # the eigenvalues' finiteness, sums, signs and clipping from one host copy of both, not
        # a device reduction and host read per quantity
        hab = host_vector(xp.concat((a, b)))
        ha, hb = hab[:self.m], hab[self.m:]
        if not all(map(math.isfinite, hab)):
            side, d = ("left", self.m) if not all(map(math.isfinite, ha)) else ("right", self.n)
            raise eigenvalues_error(f"{side} factor of shape ({d}, {d}) of the {where}")
        sum_a, sum_b = math.fsum(ha), math.fsum(hb)
        if sum_a < 0:
            a, s, sum_a, ha = -a, -s, -sum_a, [-v for v in ha]
            notes.append("left factor is negative semi-definite: its sign was moved into scale")
        if sum_b < 0:
            b, s, sum_b, hb = -b, -s, -sum_b, [-v for v in hb]
            notes.append("right factor is negative semi-definite: its sign was moved into scale")
        a, sum_a = self._clip(a, ha, "left", (self.m, self.m), where, notes, sum_a)
        b, sum_b = self._clip(b, hb, "right", (self.n, self.n), where, notes, sum_b)
        if s < 0 and sum_a > 0 and sum_b > 0:
            raise ValueError(
                f"scale·left ⊗ right is negative semi-definite (scale = {s:.6g} < 0 with "
                f"positive semi-definite factors) for the {where}; damped inverses, "
                "log-determinants and sampling need a positive semi-definite estimate"
            )
        if s < 0:
            s = 0.0
        self.a, self.b, self.s = a, b, s
        self.sum_a, self.sum_b = sum_a, sum_b
        self.notes = notes

    @classmethod
    def assembled(cls, xp: Any, UL: Array, a: Array, UR: Array, b: Array, s: float,
                  notes: tuple = ()) -> "_Eig":
        """An eigendecomposition computed elsewhere (e.g. on another process) and already
        canonical (as :meth:`__init__` leaves it): taken as given, nothing recomputed."""
        obj = cls.__new__(cls)
        obj.xp, obj.UL, obj.a, obj.UR, obj.b, obj.s = xp, UL, a, UR, b, float(s)
        obj.m, obj.n = UL.shape[0], UR.shape[0]
        obj.dtype, obj.device = UL.dtype, device_of(UL)
        obj.sum_a, obj.sum_b = to_float(xp.sum(a)), to_float(xp.sum(b))
        obj.notes = list(notes)
        return obj

    def _eigh(self, M: Array, side: str, shape: tuple, where: str, check: bool) -> tuple:
        return sym_eigh(self.xp, M, f"{side} factor of shape {shape} of the {where}", check=check,
                        check_w=False)

    def _clip(self, w: Array, h: list, side: str, shape: tuple, where: str, notes: list,
              total: float) -> tuple:
        """``(w, Σw)`` with rounding-level negative eigenvalues set to 0 (``h``: ``w`` on the
        host, as floats); ``ValueError`` for a clearly negative one."""
        wmin = min(h) if h else 0.0
        if wmin >= 0:
            return w, total
        xp = self.xp
        wmax = max(-wmin, max(h))
        tol = 10 * shape[0] * _eps(xp, w.dtype) * wmax
        if wmin < -tol:
            raise ValueError(
                f"the {side} factor of shape {shape} of the {where} is not positive "
                f"semi-definite: smallest eigenvalue {wmin:.6g} (largest magnitude {wmax:.6g}, "
                f"rounding tolerance {tol:.3g}); damped inverses, log-determinants and "
                "sampling need a positive semi-definite Kronecker estimate"
            )
        k = sum(1 for v in h if v < 0)
        notes.append(
            f"clipped {k} negative eigenvalue(s) of the {side} factor (smallest {wmin:.3g}, "
            f"within the rounding tolerance {tol:.3g}) to 0"
        )
        w = xp.where(w < 0, xp.zeros_like(w), w)
        return w, math.fsum(v for v in h if v > 0)


# -- the inverse ------------------------------------------------------------------------------


class KronInverse:
    r"""A damped ``scale · L ⊗ R``, held by its cached eigendecomposition.

    Build it with :meth:`kronsum.Kron.inverse` (or ``KronInverse(kron, damping, method)``):
    the two eigendecompositions are computed once, then :meth:`solve`, :meth:`logdet` and
    :meth:`sample` are applied many times, as K-FAC does every ``T_INV`` steps;
    :meth:`with_damping` reuses them for another damping.

    The damped matrix is ``D = (U_L ⊗ U_R) diag(vec E) (U_L ⊗ U_R)ᵀ`` with the ``(m, n)`` grid
    ``E`` of :meth:`eigvals`:

    * ``"exact"``: ``D = s L ⊗ R + λ I``, ``E_ij = s a_i b_j + λ``;
    * ``"factored"``: ``D = (sL + π√λ I) ⊗ (R + √λ/π I)``,
      ``π = √((tr(sL)/m) / (tr(R)/n))`` (Martens & Grosse 2015, §6.3);
    * ``"tkfac"``: ``D = (√δ Φ + √λ I) ⊗ (√δ Ψ + √λ I)``, ``δ = s tr L tr R``,
      ``Φ = L/tr L``, ``Ψ = R/tr R`` (Gao et al. 2021, Eq. (14));
    * ``"tkfac_new"``: Eq. (15)-(16), built by :func:`tkfac_damped_inverses` only.

    All three are functions of the product ``s L ⊗ R`` alone, whatever the split between
    ``scale``, ``left`` and ``right``. A zero product gives ``D = λ I`` for every method.

    Parameters
    ----------
    kron : Kron
        ``scale · left ⊗ right``, symmetric positive semi-definite: a factor whose
        eigenvalues are negative only by rounding (``>= −10·dim·eps·max|eig|``) is clipped to
        0 and the clip recorded in ``notes``; a clearly indefinite factor, or a negative
        product, raises ``ValueError``. Negative-definite pairs (``−L ⊗ −R``) are accepted
        (the sign is moved into the scale).
    damping : float or 0-d array
        ``λ >= 0``, finite. ``λ = 0`` on a (numerically) singular product raises
        ``ValueError`` (smallest eigenvalue ``<= 10·max(m, n)·eps`` times the largest).
    method : {"exact", "factored", "tkfac"}

    Attributes
    ----------
    method : str
    damping : float or None
        ``λ``; ``None`` for ``"tkfac_new"``, whose damping is automatic.
    eigvecs_left, eigvals_left : arrays (m, m), (m,)
        ``U_L`` and ``a`` of ``left`` (sign-canonical, clipped).
    eigvecs_right, eigvals_right : arrays (n, n), (n,)
    scale : float
        ``s`` after the sign canonicalisation.
    damped_left, damped_right : arrays (m,), (n,) or None
        For the factored methods the eigenvalues ``p``, ``q`` of the two damped factors
        (``E = p qᵀ``); ``None`` for ``"exact"``.
    pi, delta, nu, beta : float or None
        ``π`` (``"factored"``), ``δ`` (``"tkfac"``, ``"tkfac_new"``), ``ν`` and ``β``
        (``"tkfac_new"``).
    notes : tuple of str
        Diagnostics: clipped eigenvalues, sign flips, zero products.

    The inverse of an :class:`~kronsum.EigenKron` (:meth:`EigenKron.inverse`) has method
    ``"exact"``, eigenvalues ``S + λ``, ``eigvecs_left = U``, ``eigvecs_right = V`` and
    ``eigvals_left``, ``eigvals_right``, ``scale`` set to ``None`` (its eigenvalues are not
    products).

    Notes
    -----
    Cost: two symmetric eigendecompositions, ``O(m³ + n³)``, once. :meth:`solve` costs
    ``O(mn(m + n))`` per right-hand side: four matrix products in the eigenbasis for
    ``"exact"``; for the factored methods the damped factors' inverses are formed once
    (``O(m³ + n³)``) and a solve is the two products ``D_L⁻¹ V D_R⁻¹``. :meth:`logdet` costs
    ``O(mn)`` and :meth:`sample` ``O(N mn(m + n))`` for ``N`` draws. Memory ``O(m² + n² + mn)``.

    On Dask, which has no ``linalg.eigh``, the (small) factors are materialised and
    decomposed with NumPy, then wrapped back as Dask arrays; ``V`` stays lazy.

    Examples
    --------
    >>> import numpy as np
    >>> from kronsum import Kron
    >>> rng = np.random.default_rng(0)
    >>> X, Y = rng.standard_normal((3, 5)), rng.standard_normal((4, 6))
    >>> K = Kron(X @ X.T, Y @ Y.T, scale=2.0)
    >>> inv = K.inverse(0.1)                          # two eigh, cached
    >>> V = rng.standard_normal((3, 4))
    >>> D = K.to_dense() + 0.1 * np.eye(12)
    >>> np.allclose(inv.solve(V).reshape(-1), np.linalg.solve(D, V.reshape(-1)))
    True
    >>> bool(np.isclose(inv.logdet(), np.linalg.slogdet(D)[1]))
    True
    >>> inv.sample(5, seed=0).shape
    (5, 3, 4)
    """

    __slots__ = ("method", "damping", "eigvecs_left", "eigvals_left", "eigvecs_right",
                 "eigvals_right", "scale", "damped_left", "damped_right", "pi", "delta", "nu",
                 "beta", "notes", "_eig", "_E", "_inv_left", "_inv_right", "_xp", "_ops")

    def __init__(self, kron: Kron, damping: Any, method: str = "exact"):
        method = _check_method(method)
        lam = _check_damping(damping)
        eig = _Eig(kron, f"damping={lam!r}, method={method!r}")
        self._setup(eig, method, lam)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def _of_estimate(cls, kron: Kron, damping: float, method: str = "exact") -> "KronInverse":
        """The damped inverse of an estimate the library made itself (factors symmetric and
        finite by construction, e.g. a :class:`~kronsum.RunningEstimate`'s): as the
        constructor, but the eigendecompositions skip their input checks (finiteness,
        symmetry, the symmetrisation: four passes over each factor); their eigenvalues are
        still checked for finite values (a non-finite factor makes them non-finite)."""
        method = _check_method(method)
        lam = _check_damping(damping)
        return cls._from_eig(_Eig(kron, f"damping={lam!r}, method={method!r}", check=False), method, lam)

    @classmethod
    def _from_eig(cls, eig: _Eig, method: str, damping: float | None, **kw) -> "KronInverse":
        obj = cls.__new__(cls)
        obj._setup(eig, method, damping, **kw)
        return obj

    def _setup(self, eig: _Eig, method: str, lam: float | None, *, delta_eff: float | None = None,
               nu: float | None = None, beta: float | None = None) -> None:
        xp = eig.xp
        self._xp = xp
        self._eig = eig
        self._ops = None  # the solve's operands per dtype (see _operands)
        self.method = method
        self.damping = lam
        self.eigvecs_left, self.eigvals_left = eig.UL, eig.a
        self.eigvecs_right, self.eigvals_right = eig.UR, eig.b
        self.scale = eig.s
        self.pi = self.delta = self.nu = self.beta = None
        notes = list(eig.notes)
        a, b, s, m, n = eig.a, eig.b, eig.s, eig.m, eig.n
        p = q = None
        zero = eig.grid is None and (s == 0 or eig.sum_a == 0 or eig.sum_b == 0)
        if eig.grid is not None:  # an EigenKron: its eigenvalues directly ("exact" only)
            if method != "exact":
                raise ValueError(f"an EigenKron has only the damping method 'exact', got {method!r}")
            self._E = eig.grid + lam
        elif method == "exact":
            self._E = s * (a[:, None] * b[None, :]) + lam
        elif method == "factored":
            if zero:
                self.pi = 1.0
                p = xp.zeros_like(a) + math.sqrt(lam)
                q = xp.zeros_like(b) + math.sqrt(lam)
                notes.append("scale·left ⊗ right is zero: the damped matrix is λI")
            else:
                self.pi = math.sqrt((s * eig.sum_a / m) / (eig.sum_b / n))
                p = s * a + self.pi * math.sqrt(lam)
                q = b + math.sqrt(lam) / self.pi
        else:  # "tkfac" (Eq. 14) and "tkfac_new" (Eq. 15)
            delta = 0.0 if zero else s * eig.sum_a * eig.sum_b
            self.delta = delta
            # unit-trace factors; TKFAC's convention Φ = I/m, Ψ = I/n for a zero product
            phi = xp.zeros_like(a) + 1.0 / m if zero else a / eig.sum_a
            psi = xp.zeros_like(b) + 1.0 / n if zero else b / eig.sum_b
            if method == "tkfac":
                if zero:
                    notes.append("scale·left ⊗ right is zero: the damped matrix is λI")
                    p = xp.zeros_like(a) + math.sqrt(lam)
                    q = xp.zeros_like(b) + math.sqrt(lam)
                else:
                    p = math.sqrt(delta) * phi + math.sqrt(lam)
                    q = math.sqrt(delta) * psi + math.sqrt(lam)
            else:
                self.nu, self.beta = nu, beta
                dt = max(nu, delta_eff)
                p = math.sqrt(dt) * phi + dt / m
                q = math.sqrt(dt) * psi + dt / n
        self.damped_left, self.damped_right = p, q
        if p is not None:
            self._E = p[:, None] * q[None, :]
        if not (method == "exact" and eig.grid is None
                and lam >= float(xp.finfo(eig.dtype).smallest_normal)):
            # (for "exact" E = s·a_i·b_j + λ >= λ > 0 entrywise, with s, a, b >= 0 after the
            # canonicalisation above and λ a normal number of the dtype, so that it does not
            # round to 0: invertible by construction, nothing to read back)
            self._check_invertible(lam)
        if p is not None:
            self._inv_left = (eig.UL / p[None, :]) @ xp.matrix_transpose(eig.UL)
            self._inv_right = (eig.UR / q[None, :]) @ xp.matrix_transpose(eig.UR)
        else:
            self._inv_left = self._inv_right = None
        self.notes = tuple(notes)

    def _check_invertible(self, lam: float | None) -> None:
        xp = self._xp
        emin, emax = to_float(xp.min(self._E)), to_float(xp.max(self._E))
        tol = 10 * max(self.m, self.n) * _eps(xp, self.dtype)
        if not emin > 0 or (lam == 0 and emin <= tol * emax):
            raise ValueError(
                f"the damped matrix of the {'EigenKron' if self._eig.grid is not None else 'Kron'} of shape ({self.m}·{self.n}, {self.m}·{self.n}) "
                f"is singular with damping={lam!r}, method={self.method!r}: smallest eigenvalue "
                f"{emin:.3g}, largest {emax:.3g}; use a damping > 0"
            )

    def with_damping(self, damping: Any) -> "KronInverse":
        """The same method with another damping, reusing the cached eigendecompositions.

        Cost ``O(mn)`` for ``"exact"``, ``O(m³ + n³)`` matrix products (no decomposition)
        for the factored methods.
        """
        if self.method == "tkfac_new":
            raise ValueError("the damping of 'tkfac_new' is automatic; call "
                             "tkfac_damped_inverses again with another nu")
        return KronInverse._from_eig(self._eig, self.method, _check_damping(damping))

    # -- shape -------------------------------------------------------------------------
    @property
    def m(self) -> int:
        return self._eig.m

    @property
    def n(self) -> int:
        return self._eig.n

    @property
    def shape(self) -> tuple[int, int]:
        """``(m·n, m·n)``."""
        return (self.m * self.n, self.m * self.n)

    @property
    def dtype(self) -> Any:
        return self._eig.dtype

    def eigvals(self) -> Array:
        """The ``(m, n)`` grid ``E`` of eigenvalues of the damped matrix (``E_ij`` belongs to
        the eigenvector ``u_i ⊗ v_j``)."""
        return self._E

    # -- application -------------------------------------------------------------------
    def _check_V(self, V: object, name: str = "V") -> tuple[Array, Any]:
        if not is_array(V):
            raise TypeError(f"{name} must be an array, got {type(V).__name__}")
        try:
            xp = namespace(V, self.eigvecs_left)
        except TypeError:
            raise TypeError(
                f"{name} must be an array of the same library as the Kronecker factors "
                f"({type(self.eigvecs_left).__module__}), got {type(V).__module__}"
            ) from None
        if not xp.isdtype(V.dtype, "real floating"):
            raise TypeError(f"{name} must have a real floating dtype, got {V.dtype}")
        if V.ndim < 2 or tuple(V.shape[-2:]) != (self.m, self.n):
            raise ValueError(
                f"{name} must have shape (..., m, n) = (..., {self.m}, {self.n}) to match the "
                f"Kronecker factors of shapes ({self.m}, {self.m}) and ({self.n}, {self.n}), "
                f"got {tuple(V.shape)}"
            )
        return V, xp

    def _cast(self, xp: Any, dtype: Any, *arrays: Array) -> list:
        return [x if x.dtype == dtype else xp.astype(x, dtype) for x in arrays]

    def solve(self, V: Array) -> Array:
        r"""``D⁻¹ vec(V)`` reshaped, for ``V`` of shape ``(..., m, n)``.

        ``U_L ((U_Lᵀ V U_R) / E) U_Rᵀ`` for ``"exact"``; ``D_L⁻¹ V D_R⁻¹`` with the cached
        damped-factor inverses for the factored methods. Cost ``O(mn(m + n))`` per matrix.
        The result has the dtype ``result_type(V, factors)``, the library and device of ``V``.
        """
        V, xp = self._check_V(V)
        return self._apply(V, xp)

    def _apply(self, V: Array, xp: Any) -> Array:
        """:meth:`solve`'s arithmetic without its checks: ``V`` a real floating array of shape
        ``(..., m, n)`` of the factors' library ``xp`` (callers that checked once, e.g. a
        preconditioner's step)."""
        ops = self._ops.get(V.dtype) if self._ops is not None else None
        if ops is None:
            ops = self._operands(V.dtype, xp)
        if V.dtype != ops[0].dtype:
            V = xp.astype(V, ops[0].dtype)
        if len(ops) == 2:
            return ops[0] @ V @ ops[1]
        UL, ULt, UR, URt, E = ops
        return UL @ ((ULt @ V @ UR) / E) @ URt

    def _operands(self, dtype: Any, xp: Any) -> tuple:
        """The solve's operands in ``result_type(dtype, factors)``, cached per ``dtype``:
        ``(D_L⁻¹, D_R⁻¹)`` for the factored methods, else ``(U_L, U_Lᵀ, U_R, U_Rᵀ, E)`` (a
        repeated solve, e.g. every optimiser step, does no casting or dtype promotion)."""
        rt = xp.result_type(dtype, self.dtype)
        if self._inv_left is not None:
            ops = tuple(self._cast(xp, rt, self._inv_left, self._inv_right))
        else:
            UL, UR, E = self._cast(xp, rt, self.eigvecs_left, self.eigvecs_right, self._E)
            ops = (UL, xp.matrix_transpose(UL), UR, xp.matrix_transpose(UR), E)
        if self._ops is None:
            self._ops = {}
        self._ops[dtype] = ops
        return ops

    def matvec(self, V: Array) -> Array:
        """``D vec(V)`` reshaped (the damped matrix itself), for ``V`` of shape ``(..., m, n)``."""
        V, xp = self._check_V(V)
        dtype = xp.result_type(V.dtype, self.dtype)
        V, UL, UR, E = self._cast(xp, dtype, V, self.eigvecs_left, self.eigvecs_right, self._E)
        W = xp.matrix_transpose(UL) @ V @ UR
        return UL @ (W * E) @ xp.matrix_transpose(UR)

    def logdet(self) -> Array:
        """``log det D`` as a 0-d array: ``Σ_ij log E_ij`` (``n Σ log p + m Σ log q`` for the
        factored methods). Cost ``O(mn)``."""
        xp = self._xp
        if self.damped_left is not None:
            return (self.n * xp.sum(xp.log(self.damped_left))
                    + self.m * xp.sum(xp.log(self.damped_right)))
        return xp.sum(xp.log(self._E))

    def to_dense(self) -> Array:
        """The damped ``(mn, mn)`` matrix ``D``: for tests only, cost and memory ``O((mn)²)``."""
        xp = self._xp
        m, n = self.m, self.n
        U = self.eigvecs_left[:, None, :, None] * self.eigvecs_right[None, :, None, :]
        U = xp.reshape(U, (m * n, m * n))
        return (U * xp.reshape(self._E, (1, m * n))) @ xp.matrix_transpose(U)

    def sample(self, n: int, seed: Any = None, form: str = "precision") -> Array:
        r"""``n`` draws from ``N(0, D⁻¹)`` (``form="precision"``) or ``N(0, D)``
        (``form="covariance"``), shape ``(n, m, n_right)``, rows in row-major vec.

        ``X = U_L (Z / √E) U_Rᵀ`` (``Z · √E`` for the covariance form) with ``Z`` standard
        normal of shape ``(n, m, n_right)``: ``vec X = (U_L ⊗ U_R) diag(E^∓½) vec Z``, whose
        covariance is ``D^∓1``. Cost ``O(n · mn(m + n_right))``; no ``(mn)²`` array.

        Parameters
        ----------
        n : int
            Number of draws, ``>= 1``.
        seed : None, int, numpy.random.Generator, SeedSequence or BitGenerator; a JAX PRNG key; a torch.Generator
            Anything :func:`numpy.random.default_rng` accepts draws ``Z`` with NumPy in float64,
            cast to the factors' dtype and moved to their library and device (the same seed
            gives the same samples on every backend). A JAX key (``jax.random.key`` or the
            legacy ``PRNGKey``) draws with ``jax.random.normal`` and needs JAX factors; a
            ``torch.Generator`` draws with ``torch.randn`` and needs torch factors.
        form : {"precision", "covariance"}
            Whether ``D`` is the precision (Laplace posterior: ``N(0, (sL⊗R + λI)⁻¹)``) or
            the covariance of the distribution.
        """
        n = check_int(n, "n (the number of samples)", minimum=1)
        if form not in ("precision", "covariance"):
            raise ValueError(f"form must be 'precision' or 'covariance', got {form!r}")
        xp = self._xp
        shape = (int(n), self.m, self.n)
        Z = _standard_normal(seed, shape, xp, self.dtype, device_of(self.eigvecs_left))
        root = xp.sqrt(self._E)
        W = Z / root if form == "precision" else Z * root
        return self.eigvecs_left @ W @ xp.matrix_transpose(self.eigvecs_right)

    def __repr__(self) -> str:
        return (f"KronInverse(method={self.method!r}, damping={self.damping!r}, "
                f"left=({self.m}, {self.m}), right=({self.n}, {self.n}), dtype={self.dtype}, "
                f"notes={len(self.notes)})")


def _standard_normal(seed: Any, shape: tuple, xp: Any, dtype: Any, device: Any) -> Array:
    mod = type(seed).__module__ or ""
    if mod.startswith("jax"):  # jax and jaxlib array types
        import jax

        if "jax" not in getattr(xp, "__name__", ""):
            raise TypeError("a JAX PRNG key needs JAX factors")
        key = seed
        if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and tuple(key.shape) != (2,):
            raise TypeError(f"seed: a JAX array must be a PRNG key, got shape {tuple(key.shape)}")
        return jax.random.normal(key, shape, dtype=dtype)
    if mod.startswith("torch") and type(seed).__name__ == "Generator":
        import torch

        if "torch" not in xp.__name__:
            raise TypeError("a torch.Generator needs torch factors")
        return torch.randn(shape, generator=seed, dtype=dtype, device=device)
    if isinstance(seed, bool) or not (
        seed is None
        or isinstance(seed, (numbers.Integral, np.random.Generator, np.random.SeedSequence,
                             np.random.BitGenerator))
    ):
        raise TypeError(
            "seed must be None, an int, a numpy Generator/SeedSequence/BitGenerator, a JAX PRNG "
            f"key or a torch.Generator, got {type(seed).__name__}"
        )
    Z = np.random.default_rng(seed).standard_normal(shape)
    return xp.asarray(Z, dtype=dtype, device=device)


# -- TKFAC's new damping over a set of layers ----------------------------------------------------


def tkfac_damped_inverses(estimates: Mapping[Any, Kron] | Sequence[Kron], nu: float, *,
                          expand: Any = "unrestricted") -> Any:
    r"""TKFAC's new damping scheme (Gao et al. 2021, Eq. (15)-(16)) over a set of layers.

    For each layer ``l`` with estimate ``δ_l Φ_l ⊗ Ψ_l`` (any :class:`~kronsum.Kron`,
    rewritten with ``δ_l = tr(scale·L ⊗ R)`` and unit-trace ``Φ_l = L/tr L``,
    ``Ψ_l = R/tr R``, exactly :func:`kronsum.tkfac`'s form):

    .. math::

        \tilde\delta_l = \max\{\nu, \delta_l\},\qquad
        \beta = \max_l \tilde\delta_l / \delta_l \quad (16),

    the layers in ``expand`` (the paper's fully-connected layers) have their Fisher expanded,
    ``δ_l ← β δ_l``, and then every layer is damped by Eq. (15),

    .. math::

        \tilde\Phi_l = \sqrt{\tilde\delta_l}\,\Phi_l + \frac{\tilde\delta_l}{m_l} I_{m_l},
        \qquad
        \tilde\Psi_l = \sqrt{\tilde\delta_l}\,\Psi_l + \frac{\tilde\delta_l}{n_l} I_{n_l},

    with ``\tilde\delta_l = \max\{ν, δ_l\}`` recomputed on the (expanded) ``δ_l``. There is no
    ``λ``: the damping is set by the traces.

    Parameters
    ----------
    estimates : dict of Kron or list of Kron
        One estimate per layer (symmetric positive semi-definite).
    nu : float
        ``ν > 0``, finite: the lower bound on the traces.
    expand : "unrestricted", "none", or iterable of keys / indices
        Which layers ``β`` expands. The paper expands the fully-connected layer, whose trace
        is above ``ν`` so that the ``ν`` restriction does not reach it; ``"unrestricted"``
        (default) expands every layer with ``δ_l >= ν``. Pass the keys (dict) or indices
        (list) of the fully-connected layers to follow the paper literally, or ``"none"``.

    Returns
    -------
    dict or list of KronInverse
        Same keys / order as ``estimates``, ``method == "tkfac_new"``, with ``delta`` the
        layer's ``δ_l`` before expansion, ``nu`` and ``beta``. Layers with ``δ_l = 0`` are left
        out of ``β`` (noted) and damped as ``Φ = I/m``, ``Ψ = I/n`` with ``δ̃ = ν``.

    Notes
    -----
    Cost: the two eigendecompositions of every layer, ``Σ_l O(m_l³ + n_l³)``.

    Examples
    --------
    >>> import numpy as np
    >>> import kronsum as ks
    >>> rng = np.random.default_rng(0)
    >>> conv = ks.tkfac(ks.KronSum.from_outer(0.1 * rng.standard_normal((8, 3)), rng.standard_normal((8, 4))))
    >>> fc = ks.tkfac(ks.KronSum.from_outer(rng.standard_normal((8, 2)), rng.standard_normal((8, 3))))
    >>> invs = ks.tkfac_damped_inverses({"conv": conv, "fc": fc}, nu=5.0, expand=["fc"])
    >>> beta = invs["fc"].beta
    >>> bool(np.isclose(beta, 5.0 / float(conv.scale)))
    True
    >>> invs["conv"].solve(np.ones((3, 4))).shape
    (3, 4)
    """
    if isinstance(estimates, Mapping):
        keys = list(estimates.keys())
        items = [estimates[k] for k in keys]
        is_map = True
    elif isinstance(estimates, Sequence) and not isinstance(estimates, (str, bytes)):
        keys = list(range(len(estimates)))
        items = list(estimates)
        is_map = False
    else:
        raise TypeError(
            f"estimates must be a dict or a list of Kron, got {type(estimates).__name__}"
        )
    if not items:
        raise ValueError("estimates must hold at least one layer")
    nu = _check_damping(nu, "nu")
    if nu <= 0:
        raise ValueError(f"nu must be > 0 (the lower bound on the traces), got {nu!r}")
    eigs = []
    for k, est in zip(keys, items):
        if not isinstance(est, Kron):
            raise TypeError(f"estimates[{k!r}] must be a kronsum.Kron, got {type(est).__name__}")
        eigs.append(_Eig(est, f"nu={nu!r}, method='tkfac_new' (layer {k!r})"))
    deltas = []
    for e in eigs:
        zero = e.s == 0 or e.sum_a == 0 or e.sum_b == 0
        deltas.append(0.0 if zero else e.s * e.sum_a * e.sum_b)
    ratios = [max(nu, d) / d for d in deltas if d > 0]
    beta = max(ratios) if ratios else 1.0
    if isinstance(expand, str):
        if expand == "unrestricted":
            chosen = {k for k, d in zip(keys, deltas) if d >= nu}
        elif expand == "none":
            chosen = set()
        else:
            raise ValueError(f"expand must be 'unrestricted', 'none' or keys, got {expand!r}")
    elif isinstance(expand, Iterable):
        chosen = set(expand)
        unknown = chosen - set(keys)
        if unknown:
            raise ValueError(f"expand names layers that are not in estimates: {sorted(map(repr, unknown))}")
    else:
        raise TypeError(f"expand must be 'unrestricted', 'none' or an iterable of keys, got "
                        f"{type(expand).__name__}")
    out = []
    for k, e, d in zip(keys, eigs, deltas):
        d_eff = beta * d if k in chosen else d
        inv = KronInverse._from_eig(e, "tkfac_new", None, delta_eff=d_eff, nu=nu, beta=beta)
        inv.delta = d
        extra = []
        if d == 0:
            extra.append("zero layer (δ = 0): left out of β, damped with Φ = I/m, Ψ = I/n")
        if k in chosen:
            extra.append(f"expanded by β = {beta:.6g}")
        inv.notes = inv.notes + tuple(extra)
        out.append(inv)
    return dict(zip(keys, out)) if is_map else out
