r"""Eigenvalue-corrected Kronecker estimates (EKFAC, George et al. 2018) on any Kronecker basis.

Given orthogonal ``U`` (m, m) and ``V`` (n, n), the matrices
``(U ⊗ V) diag(vec S) (U ⊗ V)ᵀ`` form a linear space; the one nearest to ``F`` in Frobenius
norm is the orthogonal projection, with the diagonal of F in that basis,

.. math::

    S_{ij} = (u_i \otimes v_j)^T F (u_i \otimes v_j)
           = \sum_k w_k\, (u_i^T L_k u_i)(v_j^T R_k v_j),

and the exact error ``‖F − F̂‖² = ‖F‖² − ‖S‖²_F``. ``S`` comes from the statistics without
forming F (:func:`diag_in_basis`).
"""

from __future__ import annotations

import math
from typing import Any

from ._accel import via_numpy_on_cpu
from ._closed_forms import _require_sum, kfac, tkfac
from ._compat import Array, counted, device_of, fro_norm, is_array, materialize_all, namespace
from ._kron import Kron, KronInfo
from ._sum import KronSum, _sum_over
from ._validation import DEFAULT_MAX_ELEMENTS, check_array, check_dense_size

__all__ = ["EigenKron", "ekfac"]

BASES = ("kfac", "tkfac", "kfoc")
_CHUNK_ELEMENTS = 2**22  # entries of the per-sample (K, m, n) products formed at once (conv)


class EigenKron:
    r"""The matrix ``(U ⊗ V) diag(vec S) (U ⊗ V)ᵀ`` of shape ``(m·n, m·n)``, never formed unless asked.

    An eigenvalue-corrected Kronecker estimate (:func:`ekfac`): ``U`` (m, m) and ``V`` (n, n)
    are orthogonal eigenbases of a Kronecker estimate's factors and ``S`` (m, n) holds the
    eigenvalues; in row-major vec (``(L ⊗ R) vec(X) = vec(L X Rᵀ)``) the eigenvalue of
    ``u_i ⊗ v_j`` is ``S[i, j]``. So

    .. math::

        \hat F \operatorname{vec}(X) = \operatorname{vec}\big(U\,((U^T X V) \circ S)\,V^T\big).

    Every operation works in the eigenbasis: :meth:`matvec` and :meth:`solve` cost
    ``O(mn(m + n))``, :meth:`trace` and :meth:`logdet` ``O(mn)``; no ``(mn)²`` array is formed
    except by :meth:`to_dense`.

    Parameters
    ----------
    U : array, shape (m, m)
        Orthogonal (not checked: the caller's responsibility; :func:`ekfac` makes them).
    V : array, shape (n, n)
        Orthogonal.
    S : array, shape (m, n)
    info : KronInfo, optional

    Attributes
    ----------
    U, V, S : arrays
    info : KronInfo
        ``method`` is ``"ekfac/<basis>"`` for :func:`ekfac` results.

    Examples
    --------
    >>> import numpy as np
    >>> from kronsum import EigenKron
    >>> U, V = np.eye(2), np.eye(3)
    >>> E = EigenKron(U, V, np.arange(1.0, 7.0).reshape(2, 3))
    >>> np.allclose(E.to_dense(), np.diag(np.arange(1.0, 7.0)))
    True
    >>> float(E.trace()), E.shape
    (21.0, (6, 6))
    """

    __slots__ = ("U", "V", "S", "info", "_xp")

    def __init__(self, U: Array, V: Array, S: Array, info: KronInfo | None = None):
        U = check_array(U, "U", ndim=2, what="(m, m)")
        V = check_array(V, "V", ndim=2, what="(n, n)")
        S = check_array(S, "S", ndim=2, what="(m, n)")
        if U.shape[0] != U.shape[1] or V.shape[0] != V.shape[1]:
            raise ValueError(f"U and V must be square, got shapes {tuple(U.shape)} and {tuple(V.shape)}")
        if tuple(S.shape) != (U.shape[0], V.shape[0]):
            raise ValueError(
                f"S must have shape (m, n) = ({U.shape[0]}, {V.shape[0]}) to match U "
                f"{tuple(U.shape)} and V {tuple(V.shape)}, got {tuple(S.shape)}"
            )
        xp = namespace(U, V, S, names=("U", "V", "S"))
        dtype = xp.result_type(U, V, S)
        self._xp = xp
        self.U = xp.astype(U, dtype, copy=False)
        self.V = xp.astype(V, dtype, copy=False)
        self.S = xp.astype(S, dtype, copy=False)
        self.info = info if info is not None else KronInfo(method="user")

    @classmethod
    def _new(cls, U: Array, V: Array, S: Array, info: KronInfo, xp: Any) -> "EigenKron":
        """From arrays the library made itself (checked, one dtype): no validation, no copy."""
        out = cls.__new__(cls)
        out._xp, out.U, out.V, out.S, out.info = xp, U, V, S, info
        return out

    def _map_arrays(self, f, xp: Any) -> "EigenKron":
        """The same estimate with ``U``, ``V``, ``S`` replaced by ``f(array)`` (namespace ``xp``)."""
        return EigenKron._new(f(self.U), f(self.V), f(self.S), self.info, xp)

    # -- shape -------------------------------------------------------------------------
    @property
    def m(self) -> int:
        """Size of the left (gradient-side) basis."""
        return int(self.U.shape[0])

    @property
    def n(self) -> int:
        """Size of the right (activation-side) basis."""
        return int(self.V.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(m·n, m·n)``."""
        d = self.m * self.n
        return (d, d)

    @property
    def dtype(self) -> Any:
        return self.S.dtype

    # -- algebra -------------------------------------------------------------------------
    def to_dense(self, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Array:
        """The ``(m·n, m·n)`` matrix ``(U ⊗ V) diag(vec S) (U ⊗ V)ᵀ``. Cost O((mn)³), memory
        O((mn)²); ``ValueError`` above ``max_elements`` entries (default 2**26)."""
        check_dense_size(self.shape[0] ** 2, "the dense EigenKron (m·n, m·n)", max_elements)
        xp = self._xp
        m, n = self.m, self.n
        W = xp.reshape(self.U[:, None, :, None] * self.V[None, :, None, :], (m * n, m * n))
        return (W * xp.reshape(self.S, (1, m * n))) @ xp.matrix_transpose(W)

    def matvec(self, X: Array) -> Array:
        """``U ((Uᵀ X V) ∘ S) Vᵀ`` for ``X`` of shape ``(..., m, n)``: the product with vec(X).

        Cost O(mn(m + n)) per matrix.
        """
        xp = self._xp
        if not is_array(X):
            raise TypeError(f"X must be an array, got {type(X).__name__}")
        if X.ndim < 2 or tuple(X.shape[-2:]) != (self.m, self.n):
            raise ValueError(f"X must have shape (..., m, n) = (..., {self.m}, {self.n}), got {tuple(X.shape)}")
        W = xp.matrix_transpose(self.U) @ X @ self.V
        return self.U @ (W * self.S) @ xp.matrix_transpose(self.V)

    def trace(self) -> Array:
        """``Σ_ij S_ij`` as a 0-d array."""
        return self._xp.sum(self.S)

    def frobenius_norm(self) -> Array:
        """``‖S‖_F`` (the basis is orthogonal) as a 0-d array."""
        return fro_norm(self.S, self._xp)

    # -- damped inverses (the eigenbasis is already there: no decomposition) --------------
    def inverse(self, damping: Any, method: str = "exact") -> Any:
        """The damped matrix ``F̂ + λI`` as a :class:`~kronsum.KronInverse` (method ``"exact"``).

        Its eigenvalues are ``S + λ`` in the basis ``U ⊗ V`` (:meth:`KronInverse.eigvals`), so
        building it costs ``O(mn)``: no eigendecomposition. ``λ >= 0``; entries of ``S`` that
        are negative by rounding are clipped to 0 (noted), clearly negative ones raise
        ``ValueError``, as does ``λ = 0`` with a (numerically) singular ``S``. ``method`` is
        accepted for symmetry with :meth:`Kron.inverse`; only ``"exact"`` exists here.

        >>> import numpy as np
        >>> from kronsum import EigenKron
        >>> E = EigenKron(np.eye(2), np.eye(2), np.array([[1.0, 2.0], [3.0, 4.0]]))
        >>> E.inverse(1.0).eigvals().tolist()
        [[2.0, 3.0], [4.0, 5.0]]
        """
        from ._inverse import KronInverse, _check_damping, _check_method, _GridEig

        method = _check_method(method)
        lam = _check_damping(damping)
        if method != "exact":
            raise ValueError(f"an EigenKron has only the damping method 'exact', got {method!r}")
        eig = _GridEig(self._xp, self.U, self.V, self.S, f"damping={lam!r}")
        return KronInverse._from_eig(eig, "exact", lam)

    def solve(self, X: Array, damping: Any, method: str = "exact") -> Array:
        """``(F̂ + λI)⁻¹ vec(X)`` reshaped, for ``X`` of shape ``(..., m, n)``:
        ``U ((Uᵀ X V) / (S + λ)) Vᵀ``. Cost ``O(mn(m + n))``.

        >>> import numpy as np
        >>> from kronsum import EigenKron
        >>> E = EigenKron(np.eye(2), np.eye(2), np.array([[1.0, 2.0], [3.0, 4.0]]))
        >>> E.solve(np.ones((2, 2)), damping=1.0).tolist()
        [[0.5, 0.3333333333333333], [0.25, 0.2]]
        """
        return self.inverse(damping, method).solve(X)

    def logdet(self, damping: Any, method: str = "exact") -> Array:
        """``log det(F̂ + λI) = Σ_ij log(S_ij + λ)``, a 0-d array. Cost ``O(mn)``.

        >>> import numpy as np
        >>> from kronsum import EigenKron
        >>> E = EigenKron(np.eye(2), np.eye(2), np.array([[1.0, 2.0], [3.0, 4.0]]))
        >>> bool(np.isclose(E.logdet(1.0), np.log(2 * 3 * 4 * 5)))
        True
        """
        return self.inverse(damping, method).logdet()

    def sample(self, n: int, damping: Any, method: str = "exact", *, seed: Any = None,
               form: str = "precision") -> Array:
        """``n`` draws of shape ``(n, m, n_right)`` from ``N(0, (F̂ + λI)⁻¹)``
        (``form="precision"``) or ``N(0, F̂ + λI)`` (``form="covariance"``): ``U (Z ∘ (S + λ)^∓½) Vᵀ``.

        Seeds as in :meth:`KronInverse.sample`. Cost ``O(n · mn(m + n_right))``.

        >>> import numpy as np
        >>> from kronsum import EigenKron
        >>> EigenKron(np.eye(2), np.eye(3), np.ones((2, 3))).sample(4, damping=0.5, seed=0).shape
        (4, 2, 3)
        """
        return self.inverse(damping, method).sample(n, seed=seed, form=form)

    def __repr__(self) -> str:
        return (f"EigenKron(U=({self.m}, {self.m}), V=({self.n}, {self.n}), S=({self.m}, {self.n}), "
                f"dtype={self.dtype}, method={self.info.method!r})")


# -- the projected diagonal -------------------------------------------------------------------


def diag_in_basis(F: KronSum, U: Array, V: Array) -> Array:
    r"""``S_ij = (u_i ⊗ v_j)ᵀ F (u_i ⊗ v_j)`` for every ``i, j``: shape (m, n), F's dtype.

    ``terms``: ``Σ_k w_k diag(UᵀL_kU) diag(VᵀR_kV)ᵀ``, O(K(m³ + n³) + Kmn).
    ``outer``: ``((GU)∘(GU))ᵀ diag(w) ((AV)∘(AV))``, O(K(m² + n² + mn)): one GEMM after the
    rotations. ``conv``: ``Σ_k w_k Y_k ∘ Y_k`` with ``Y_k = Uᵀ X_k V = (G_kU)ᵀ(A_kV)``, the
    cheaper association chosen by multiply-adds, in chunks of samples (memory O(chunk·mn)).
    ``sum``: the sum over the parts. No overflow guard: call it on a normalised sum.
    """
    xp = F.xp
    if F.form == "sum":
        return _sum_over(diag_in_basis(P, U, V) for P in F.parts)
    w = F.weights
    if F.form == "terms":
        dl = xp.sum((F.L @ U) * U, axis=-2)  # (K, m): u_iᵀ L_k u_i
        dr = xp.sum((F.R @ V) * V, axis=-2)
        return xp.matrix_transpose(dl) @ (w[:, None] * dr)
    if F.form == "outer":
        P, Q = F.G @ U, F.A @ V
        return xp.matrix_transpose(P * P) @ (w[:, None] * (Q * Q))
    K, T, m = F.G.shape
    n = F.A.shape[-1]
    rotate_first = T * (m * m + n * n) <= m * n * (m + n)  # (G_kU)ᵀ(A_kV) vs Uᵀ(G_kᵀA_k)V
    chunk = max(1, _CHUNK_ELEMENTS // max(1, m * n + T * (m + n)))
    out = []
    for k0 in range(0, K, chunk):
        k1 = min(K, k0 + chunk)
        G, A = F.G[k0:k1, ...], F.A[k0:k1, ...]
        if rotate_first:
            Y = xp.matrix_transpose(G @ U) @ (A @ V)
        else:
            Y = xp.matrix_transpose(U) @ (xp.matrix_transpose(G) @ A) @ V
        out.append(xp.sum(w[k0:k1, None, None] * (Y * Y), axis=0))
    return _sum_over(out)


def rotated(F: KronSum, U: Array, V: Array) -> KronSum:
    """``(U ⊗ V)ᵀ F (U ⊗ V)`` as a sum of the same form: ``L_k → UᵀL_kU``, ``R_k → VᵀR_kV``
    (outer and conv: ``G → GU``, ``A → AV``). Its diagonal is :func:`diag_in_basis`."""
    xp = F.xp
    if F.form == "sum":
        parts = tuple(rotated(P, U, V) for P in F.parts)
        return KronSum("sum", F.weights, symmetric=F.symmetric, _xp=xp, parts=parts)
    if F.form == "terms":
        Ut, Vt = xp.matrix_transpose(U), xp.matrix_transpose(V)
        return KronSum("terms", F.weights, L=Ut @ F.L @ U, R=Vt @ F.R @ V,
                       symmetric=F.symmetric, _xp=xp)
    return KronSum(F.form, F.weights, G=F.G @ U, A=F.A @ V, symmetric=True, _xp=xp)


# -- the estimator --------------------------------------------------------------------------------


def _basis_of(F: KronSum, basis: Any) -> tuple[Kron, str]:
    if isinstance(basis, Kron):
        if (basis.m, basis.n) != (F.m, F.n):
            raise ValueError(
                f"basis has factor sizes ({basis.m}, {basis.n}) but F has (m, n) = ({F.m}, {F.n})"
            )
        return basis, basis.info.method
    if isinstance(basis, str) and basis in BASES:
        if basis == "kfac":
            return kfac(F), "kfac"
        if basis == "tkfac":
            return tkfac(F), "tkfac"
        from ._kfoc import kfoc

        return kfoc(F), "kfoc"
    raise ValueError(f"basis must be one of {BASES} or a kronsum.Kron, got {basis!r}")


def _eigenbasis(est: Kron, xp: Any, *, check: bool = True) -> tuple[Array, Array]:
    """The eigenvectors ``(U, V)`` of a Kronecker estimate's (symmetric) factors;
    ``check=False`` for factors the library computed from a symmetric sum (finite, symmetric)."""
    from ._inverse import sym_eigh

    U, _ = sym_eigh(xp, est.left, f"left factor ({est.m}, {est.m}) of the basis estimate", check=check)
    V, _ = sym_eigh(xp, est.right, f"right factor ({est.n}, {est.n}) of the basis estimate", check=check)
    return U, V


def _ekfac_in(F: KronSum, U: Array, V: Array, info: KronInfo) -> EigenKron:
    """The corrected eigenvalues of F in the basis ``U ⊗ V``, at F's true scale."""
    xp = F.xp
    Fn, (cw, cl, cr) = F.normalized()
    S = diag_in_basis(Fn, U, V)
    c = cw * (cl * cr)
    if c != 1.0:
        S = S * c
    U, V, S = materialize_all(U, V, S)  # Dask: one pass, then plain small arrays
    return EigenKron._new(U, V, S, info, xp)


@counted
@via_numpy_on_cpu
def _ekfac(F: KronSum, *, basis: Any) -> EigenKron:
    xp = F.xp
    est, name = _basis_of(F, basis)
    if est._xp is not xp and getattr(est._xp, "__name__", None) != getattr(xp, "__name__", ""):
        raise TypeError(f"basis must hold arrays of F's library ({xp.__name__}), got "
                        f"{getattr(est._xp, '__name__', est._xp)}")
    if est.dtype != F.dtype:
        raise TypeError(f"basis has dtype {est.dtype} but F has dtype {F.dtype}")
    # the estimators' factors of a symmetric sum are symmetric and finite: no input checks
    U, V = _eigenbasis(est, xp, check=isinstance(basis, Kron) or not F.symmetric)
    notes = tuple(est.info.notes) if not isinstance(basis, Kron) else ()
    return _ekfac_in(F, U, V, KronInfo(method=f"ekfac/{name}", notes=notes))


def ekfac(F: KronSum, basis: Any = "kfac") -> EigenKron:
    r"""Eigenvalue-corrected estimate (EKFAC, George et al. 2018) in a Kronecker estimate's eigenbasis.

    With ``U``, ``V`` the eigenvectors of the basis estimate's factors, the Frobenius-nearest
    matrix to F of the form ``(U ⊗ V) diag(vec S) (U ⊗ V)ᵀ`` has the diagonal of F in that
    basis as eigenvalues:

    .. math::

        S_{ij} = (u_i \otimes v_j)^T F (u_i \otimes v_j)
               = \sum_k w_k\,(u_i^T L_k u_i)(v_j^T R_k v_j),
        \qquad
        \|F - \hat F\|_F^2 = \|F\|_F^2 - \|S\|_F^2 .

    Outer form: ``S = ((GU)∘(GU))ᵀ diag(w) ((AV)∘(AV))``; conv form:
    ``S = Σ_k w_k (Uᵀ X_k V)∘(Uᵀ X_k V)`` with ``X_k = G_kᵀA_k``; terms form from
    ``diag(UᵀL_kU)`` and ``diag(VᵀR_kV)``; a sum adds its parts. F is never formed.

    The basis estimate ``B`` itself lies in that set (its eigenvalues are products
    ``s a_i b_j``), so the corrected estimate is never farther from F than ``B``; with
    ``basis="kfoc"`` it is never worse than K-FOC, the best single Kronecker product.

    Parameters
    ----------
    F : KronSum
    basis : {"kfac", "tkfac", "kfoc"} or Kron, default "kfac"
        Whose eigenvectors to use: :func:`kfac` (George et al.'s EKFAC), :func:`tkfac`,
        :func:`kfoc` (default options) of F, or a given :class:`Kron` with symmetric factors
        of F's sizes, library and dtype (e.g. a running K-FAC estimate).

    Returns
    -------
    EigenKron
        ``info.method == "ekfac/<basis>"`` (a given Kron: ``"ekfac/" + its info.method``);
        ``info.notes`` carries the basis estimator's notes.

    Raises
    ------
    TypeError
        F is not a :class:`KronSum`, or ``basis`` is a Kron of another library or dtype.
    ValueError
        An unknown ``basis`` name, a Kron of other sizes, or basis factors that are not
        symmetric or not finite.

    Notes
    -----
    Cost: the basis estimate, two symmetric eigendecompositions ``O(m³ + n³)`` and one pass
    over the statistics: outer ``O(K(m² + n² + mn))`` (the rotations ``GU``, ``AV`` and one
    GEMM: about one K-FAC); conv ``O(KT(m² + n² + mn))`` or ``O(K mn(T + m + n))``, whichever
    is cheaper; terms ``O(K(m³ + n³))``. Memory ``O(K(m + n) + mn)`` (conv: bounded chunks).

    Examples
    --------
    >>> import numpy as np
    >>> from kronsum import KronSum, ekfac, kfac, frobenius_error
    >>> rng = np.random.default_rng(0)
    >>> F = KronSum.from_outer(rng.standard_normal((32, 3)), rng.standard_normal((32, 4)))
    >>> est = ekfac(F)                                       # K-FAC's eigenbasis
    >>> est.S.shape, est.info.method
    ((3, 4), 'ekfac/kfac')
    >>> W = np.kron(est.U, est.V)                            # row-major vec: u_i ⊗ v_j
    >>> np.allclose(est.S.reshape(-1), np.diag(W.T @ F.to_dense() @ W))
    True
    >>> bool(frobenius_error(F, est) <= frobenius_error(F, kfac(F)))
    True
    """
    F = _require_sum(F, "ekfac")
    if not isinstance(basis, (str, Kron)):
        raise TypeError(f"basis must be one of {BASES} or a kronsum.Kron, got {type(basis).__name__}")
    if isinstance(basis, str) and basis not in BASES:
        raise ValueError(f"basis must be one of {BASES} or a kronsum.Kron, got {basis!r}")
    return _ekfac(F, basis=basis)
