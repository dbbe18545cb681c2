"""The result type: one scaled Kronecker product ``scale * left ⊗ right``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._compat import Array, fro_norm, is_array, namespace, trace
from ._validation import (DEFAULT_MAX_ELEMENTS, check_array, check_dense_size, check_finite_values,
                          check_scale)

__all__ = ["Kron", "KronInfo"]


@dataclass(frozen=True)
class KronInfo:
    """Diagnostics of an estimate.

    Attributes
    ----------
    method : str
        Which estimator and solver produced it, e.g. ``"kfoc/gram"``, ``"kfoc/lanczos"``.
    iterations : int
        Operator applications (one application = both contractions of the sum); 0 for
        closed forms.
    converged : bool
        Whether the stopping rule was met (always ``True`` for closed forms).
    sigma1, sigma2 : float or None
        The two largest singular values of the rearranged sum: ``sigma1`` is the optimal scale;
        from K-FOC's Lanczos solvers ``sigma2`` is the second Ritz value, a lower estimate that
        is not itself converged; exact from ``nearest_kronecker``; ``None`` where the method
        does not produce it.
    residual : float or None
        Final relative eigen-residual ``‖A Aᵀ u − θ u‖ / θ`` of the iterative solvers.
    notes : tuple of str
        Degenerate cases met on the way (zero sum, ``σ1 = σ2``, clipped values ...).
    error_gap_bound : float or None
        From :func:`kfoc`'s iterative solvers: an upper bound of
        ``(‖F − F̂‖ − optimal error)/‖F‖`` at the returned iterate (the ``accuracy`` rule;
        ``inf`` when nothing bounded it). ``None`` elsewhere.
    error_gap_certified : bool or None
        Whether that bound is proven (the Gram solver, when K-FOC explains more than half of
        ``‖F‖²``) rather than estimated from the second Ritz value.
    host_reads : int or None
        How many times the solver waited for values of an array (a batched read of several
        scalars counts once): on an accelerator each is a device synchronisation. Set by
        :func:`kfoc` and :func:`kronecker_svd`; ``None`` elsewhere.
    contractions : int or None
        How many half-steps ``KronSum.contract_left`` / ``contract_right`` the solver ran
        (an operator application is two; the finish and the start add theirs). Set by
        :func:`kfoc` and :func:`kronecker_svd`; ``None`` elsewhere.
    allreduces : int or None
        How many all-reduces over a process group the estimate took (the estimators of
        :mod:`kronsum.adapters.distributed`, on a sum split over ranks); ``None`` elsewhere.

    Examples
    --------
    >>> import numpy as np
    >>> import kronsum as ks
    >>> F = ks.KronSum.from_outer(np.eye(3), np.eye(3))   # σ1 = σ2 = σ3: no unique optimum
    >>> info = ks.kfoc(F, method="lanczos").info
    >>> info.converged, info.degenerate
    (True, True)
    >>> ks.KronSum.from_outer(np.zeros((2, 2)), np.ones((2, 2))).trace().item(), ks.kfac(F).info.notes
    (0.0, ())
    """

    method: str
    iterations: int = 0
    converged: bool = True
    sigma1: float | None = None
    sigma2: float | None = None
    residual: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    host_reads: int | None = None
    contractions: int | None = None
    error_gap_bound: float | None = None
    error_gap_certified: bool | None = None
    allreduces: int | None = None

    def _counted(self, host_reads: int, contractions: int) -> "KronInfo":
        """A copy with the two counts set: ``dataclasses.replace`` without re-running the frozen
        ``__init__`` field by field (the class has no ``__post_init__`` to skip)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__, host_reads=host_reads, contractions=contractions)
        return new

    @property
    def degenerate(self) -> bool:
        """Whether anything was recorded in :attr:`notes` (a degenerate case such as a zero sum
        or ``σ1 = σ2``, clipped eigenvalues, or not converging): check ``notes`` for which."""
        return len(self.notes) > 0


class Kron:
    r"""The matrix ``scale · left ⊗ right`` of shape ``(m·n, m·n)``, never formed unless asked.

    Convention (row-major vec, stated once for the whole library):
    ``(L ⊗ R) vec(V) = vec(L V Rᵀ)`` with ``vec(V) = V.reshape(-1)`` for ``V`` of shape
    ``(m, n)``. For a layer weight stored ``(out, in)``, ``left`` is the gradient-side
    (``m = out``) and ``right`` the activation-side (``n = in``) factor.

    How the magnitude is split between ``scale``, ``left`` and ``right`` is the estimator's
    documented choice (K-FAC: means of the factors times ``Σ w``; TKFAC: unit-trace factors
    times ``tr F``; K-FOC: unit-Frobenius factors times ``σ1``). Only the product is
    meaningful when comparing estimators.

    Parameters
    ----------
    left : array, shape (m, m)
    right : array, shape (n, n)
    scale : float or 0-d array, default 1
        A real number or a one-entry real array of the factors' library (cast to their dtype);
        anything else (``None``, a string, a complex number, several entries, another
        library's array) raises ``TypeError`` or ``ValueError`` naming ``scale``.
    info : KronInfo, optional

    Examples
    --------
    >>> import numpy as np
    >>> from kronsum import Kron
    >>> K = Kron(np.eye(2), np.array([[2.0, 0.0], [0.0, 3.0]]), scale=0.5)
    >>> V = np.ones((2, 2))
    >>> np.allclose(K.matvec(V).reshape(-1), K.to_dense() @ V.reshape(-1))
    True
    >>> float(K.trace())
    5.0
    """

    __slots__ = ("left", "right", "scale", "info", "_xp")

    def __init__(self, left: Array, right: Array, scale: Any = 1.0, info: KronInfo | None = None):
        left = check_array(left, "left", ndim=2, what="(m, m)")
        right = check_array(right, "right", ndim=2, what="(n, n)")
        if left.shape[0] != left.shape[1] or right.shape[0] != right.shape[1]:
            raise ValueError(
                f"left and right must be square, got shapes {tuple(left.shape)} and "
                f"{tuple(right.shape)}"
            )
        xp = namespace(left, right)
        dtype = xp.result_type(left, right)
        self._xp = xp
        self.left = xp.astype(left, dtype, copy=False)
        self.right = xp.astype(right, dtype, copy=False)
        self.scale = check_scale(scale, xp, dtype, left)
        self.info = info if info is not None else KronInfo(method="user")

    # -- shape ---------------------------------------------------------------------
    @property
    def m(self) -> int:
        """Size of the left (gradient-side) factor."""
        return int(self.left.shape[0])

    @property
    def n(self) -> int:
        """Size of the right (activation-side) factor."""
        return int(self.right.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(m·n, m·n)``."""
        d = self.m * self.n
        return (d, d)

    @property
    def dtype(self) -> Any:
        return self.left.dtype

    # -- algebra -------------------------------------------------------------------
    def to_dense(self, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Array:
        """The ``(m·n, m·n)`` matrix ``scale · kron(left, right)``. Cost and memory O((mn)²);
        ``ValueError`` above ``max_elements`` entries (default 2**26)."""
        check_dense_size(self.shape[0] ** 2, "the dense Kron (m·n, m·n)", max_elements)
        xp = self._xp
        m, n = self.m, self.n
        big = self.left[:, None, :, None] * self.right[None, :, None, :]
        return self.scale * xp.reshape(big, (m * n, m * n))

    def matvec(self, V: Array) -> Array:
        """``scale · L V Rᵀ`` for ``V`` of shape ``(..., m, n)``: the product with vec(V).

        Cost O(mn(m + n)) per matrix, no ``(mn)²`` array is formed.
        """
        xp = self._xp
        if not is_array(V):
            raise TypeError(f"V must be an array, got {type(V).__name__}")
        if V.ndim < 2 or tuple(V.shape[-2:]) != (self.m, self.n):
            raise ValueError(
                f"V must have shape (..., m, n) = (..., {self.m}, {self.n}), got "
                f"{tuple(V.shape)}"
            )
        return self.scale * (self.left @ V @ xp.matrix_transpose(self.right))

    def trace(self) -> Array:
        """``scale · tr(left) · tr(right)`` as a 0-d array."""
        xp = self._xp
        return self.scale * trace(self.left, xp) * trace(self.right, xp)

    def frobenius_norm(self) -> Array:
        """``|scale| · ‖left‖_F · ‖right‖_F`` as a 0-d array."""
        xp = self._xp
        return xp.abs(self.scale) * fro_norm(self.left, xp) * fro_norm(self.right, xp)

    def check_finite(self) -> "Kron":
        """Raise ``ValueError`` if any factor or the scale is not finite; return ``self``."""
        xp = self._xp
        check_finite_values(xp, self.left, "left")
        check_finite_values(xp, self.right, "right")
        check_finite_values(xp, self.scale, "scale")
        return self

    def _as_stack(self) -> tuple[Array, Array, Array]:
        """``(scales (1,), lefts (1, m, m), rights (1, n, n))``: the form error evaluation uses."""
        xp = self._xp
        return (
            xp.reshape(self.scale, (1,)),
            xp.reshape(self.left, (1, self.m, self.m)),
            xp.reshape(self.right, (1, self.n, self.n)),
        )

    def __repr__(self) -> str:
        try:
            s = f"{float(self.scale):.6g}"
        except Exception:  # lazy arrays: do not force a computation in repr
            s = "<lazy>"
        return (
            f"Kron(scale={s}, left=({self.m}, {self.m}), right=({self.n}, {self.n}), "
            f"dtype={self.dtype}, method={self.info.method!r})"
        )


    # -- damped inverses (implemented in kronsum/_inverse.py) -------------------------
    def inverse(self, damping: Any, method: str = "exact") -> Any:
        """The damped matrix ``scale·L ⊗ R + λI`` (or its factored/TKFAC form) as a
        :class:`~kronsum.KronInverse`, which caches the two eigendecompositions.

        ``method`` is ``"exact"``, ``"factored"`` (Tikhonov with the π correction, Martens &
        Grosse 2015) or ``"tkfac"`` (Gao et al. 2021, Eq. (14)); see :class:`KronInverse`.
        Cost ``O(m³ + n³)``.

        >>> import numpy as np
        >>> from kronsum import Kron
        >>> K = Kron(np.diag([1.0, 2.0]), np.diag([3.0, 4.0]), scale=2.0)
        >>> K.inverse(1.0).eigvals().tolist()
        [[7.0, 9.0], [13.0, 17.0]]
        """
        from ._inverse import KronInverse

        return KronInverse(self, damping, method)

    def solve(self, V: Array, damping: Any, method: str = "exact") -> Array:
        """``(scale·L ⊗ R + λI)⁻¹ vec(V)`` reshaped, for ``V`` of shape ``(..., m, n)``.

        Shorthand for ``self.inverse(damping, method).solve(V)``: it decomposes the factors on
        every call; keep :meth:`inverse` to solve many times. Cost ``O(m³ + n³ + mn(m + n))``.

        >>> import numpy as np
        >>> from kronsum import Kron
        >>> K = Kron(np.diag([1.0, 2.0]), np.diag([3.0, 4.0]))
        >>> X = K.solve(np.ones((2, 2)), damping=1.0)       # 1 / (a_i b_j + 1)
        >>> np.allclose(X, [[1 / 4, 1 / 5], [1 / 7, 1 / 9]])
        True
        """
        return self.inverse(damping, method).solve(V)

    def logdet(self, damping: Any, method: str = "exact") -> Array:
        """``log det(scale·L ⊗ R + λI)`` (or of the ``method``'s damped form), a 0-d array.

        >>> import numpy as np
        >>> from kronsum import Kron
        >>> K = Kron(np.diag([1.0, 2.0]), np.diag([3.0, 4.0]))
        >>> bool(np.isclose(K.logdet(1.0), np.log(4 * 5 * 7 * 9)))
        True
        """
        return self.inverse(damping, method).logdet()

    def sample(self, n: int, damping: Any, method: str = "exact", *, seed: Any = None,
               form: str = "precision") -> Array:
        """``n`` draws of shape ``(n, m, n_right)`` from ``N(0, (scale·L ⊗ R + λI)⁻¹)``
        (``form="precision"``) or ``N(0, scale·L ⊗ R + λI)`` (``form="covariance"``).

        See :meth:`KronInverse.sample` for the seeds accepted (NumPy seeds/Generators, JAX
        keys, ``torch.Generator``).

        >>> import numpy as np
        >>> from kronsum import Kron
        >>> Kron(np.eye(2), np.eye(3)).sample(4, damping=0.5, seed=0).shape
        (4, 2, 3)
        """
        return self.inverse(damping, method).sample(n, seed=seed, form=form)
