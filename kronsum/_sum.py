r"""``KronSum``: an implicit sum of Kronecker products ``F = Σ_k w_k L_k ⊗ R_k``.

Three input forms, each stored as given and never densified unless asked:

``terms``  ``L`` (K, m, m), ``R`` (K, n, n): the general sum.
``outer``  ``G`` (K, m), ``A`` (K, n): ``L_k = g_k g_kᵀ``, ``R_k = a_k a_kᵀ`` (a fully-connected
           layer, one term per sample).
``conv``   ``G`` (K, T, m), ``A`` (K, T, n): the term of sample k is ``vec(X_k) vec(X_k)ᵀ``
           with ``X_k = G_kᵀ A_k`` (m, n), i.e. ``Σ_{t,t'} g_t g_t'ᵀ ⊗ a_t a_t'ᵀ``
           (a convolution over T spatial positions; K-FOC's Algorithm 2).

The rearrangement (Van Loan & Pitsianis) maps F to the ``(m², n²)`` matrix
``𝓡(F) = Σ_k w_k vec(L_k) vec(R_k)ᵀ`` with ``‖F‖_F = ‖𝓡(F)‖_F`` and
``𝓡(L ⊗ R) = vec(L) vec(R)ᵀ``; every estimator works with the two products of 𝓡(F) that
:meth:`KronSum.contract_left` and :meth:`KronSum.contract_right` compute.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ._accel import (TRMM_TIME, eig_gram, eig_quadratic_sum, quadratic_blocks, quadratic_rows, row_dots, row_gram, row_sq_norms,
                     symmetric_to_rounding, syrk_available, trmm_pays, weighted_gram)
from ._compat import (Array, count, device_of, float64_available, host_floats, is_dask_namespace, max_abs_host, namespace,
                      persist_all, to_float, trace)
from ._validation import (DEFAULT_MAX_ELEMENTS, check_array, check_dense_size, check_finite_values,
                          check_in_range, check_real, check_weights)

__all__ = ["KronSum"]

_FORMS = ("terms", "outer", "conv", "sum")
_CHUNK = 1024  # rows of a K x K Gram matrix formed at once
_CROSS_BUDGET = 1 << 24  # numbers in one intermediate of the terms × outer/conv cross product


class KronSum:
    r"""The sum ``F = Σ_k w_k L_k ⊗ R_k`` of shape ``(m·n, m·n)``, held implicitly.

    Build it with :meth:`from_terms`, :meth:`from_outer` or :meth:`from_conv`. ``F`` is a
    **sum**, not a mean: ``weights`` default to 1 and must be non-negative. Row-major vec:
    ``(L ⊗ R) vec(V) = vec(L V Rᵀ)``; for a weight stored ``(out, in)`` the left factor is
    gradient-side (``m = out``) and the right one activation-side (``n = in``).

    Examples
    --------
    >>> import numpy as np
    >>> from kronsum import KronSum
    >>> rng = np.random.default_rng(0)
    >>> G, A = rng.standard_normal((8, 3)), rng.standard_normal((8, 4))
    >>> F = KronSum.from_outer(G, A)
    >>> F.shape, F.form, F.num_terms
    ((12, 12), 'outer', 8)
    >>> dense = sum(np.kron(np.outer(g, g), np.outer(a, a)) for g, a in zip(G, A))
    >>> np.allclose(F.to_dense(), dense)
    True
    """

    __slots__ = ("form", "weights", "L", "R", "G", "A", "symmetric", "_psd_terms", "parts", "_xp", "_Xp")

    def __init__(self, form: str, weights: Array, *, L=None, R=None, G=None, A=None,
                 symmetric: bool, _xp: Any, parts: tuple = (), psd_terms: bool = False):
        if form not in _FORMS:
            raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
        self.form = form
        self.weights = weights
        self.L, self.R, self.G, self.A = L, R, G, A
        self.symmetric = symmetric
        # terms form: every L_k, R_k PSD and every weight ≥ 0, known by construction (an estimate
        # the library made, e.g. a running estimate's previous one); outer/conv are by form
        self._psd_terms = psd_terms
        self.parts = parts
        self._xp = _xp
        self._Xp = None  # conv: the per-sample matrices, (m, K, n), when held (_with_per_sample)

    # -- sums of sums ------------------------------------------------------------------
    @classmethod
    def concat(cls, *sums: "KronSum") -> "KronSum":
        """The sum ``F_1 + F_2 + …`` of sums of any forms (also written ``F1 + F2``).

        The result has ``form == "sum"`` and keeps each part in its own form, so a K-FAC
        statistic and a previous estimate can be combined without materialising anything
        (K-FOC_running). ``kfac`` pools the terms of all parts; ``kfoc`` uses the Gram solver when
        every part has the outer or terms form (and :func:`~kronsum.choose_method` finds it
        cheaper), Lanczos otherwise.

        Examples
        --------
        >>> import numpy as np
        >>> from kronsum import KronSum, Kron
        >>> rng = np.random.default_rng(0)
        >>> batch = KronSum.from_outer(rng.standard_normal((5, 2)), rng.standard_normal((5, 3)))
        >>> prev = KronSum.from_kron(Kron(np.eye(2), np.eye(3), scale=2.0))
        >>> F = 0.9 * prev + 0.1 * batch
        >>> F.form, np.allclose(F.to_dense(), 0.9 * prev.to_dense() + 0.1 * batch.to_dense())
        ('sum', True)
        """
        flat: list[KronSum] = []
        for F in sums:
            if not isinstance(F, KronSum):
                raise TypeError(f"KronSum.concat takes KronSum objects, got {type(F).__name__}")
            flat.extend(F.parts if F.form == "sum" else (F,))
        if not flat:
            raise ValueError("KronSum.concat needs at least one sum")
        m, n = flat[0].m, flat[0].n
        for F in flat[1:]:
            if (F.m, F.n) != (m, n):
                raise ValueError(
                    f"all parts must have the same factor sizes (m, n); got ({m}, {n}) and "
                    f"({F.m}, {F.n})"
                )
        xp = flat[0]._xp
        if any(F._xp is not xp for F in flat[1:]):  # parts of several libraries: a clear error
            xp = namespace(*(F.weights for F in flat), names=tuple(f"part {i}" for i in range(len(flat))))
        dtype = xp.result_type(*(F.weights for F in flat))
        flat = [F if F.dtype == dtype else F.astype(dtype) for F in flat]
        if len(flat) == 1:
            return flat[0]
        w = xp.concat([F.weights for F in flat])
        return cls("sum", w, symmetric=all(F.symmetric for F in flat), _xp=xp, parts=tuple(flat))

    @classmethod
    def from_kron(cls, K, *, check_finite: bool = True) -> "KronSum":
        """The one-term sum ``scale · left ⊗ right`` of a :class:`~kronsum.Kron` (``scale ≥ 0``).

        ``check_finite=False`` skips the NaN/inf scan of the factors (for an estimate the
        library computed itself, which is finite by construction)."""
        from ._kron import Kron

        if not isinstance(K, Kron):
            raise TypeError(
                f"KronSum.from_kron takes a kronsum.Kron (e.g. kronsum.kfac(F), or "
                f"Kron(left, right, scale)), got {type(K).__name__}"
            )
        xp = K._xp
        return cls.from_terms(K.left[None, ...], K.right[None, ...], xp.reshape(K.scale, (1,)),
                              check_finite=check_finite)

    def scaled(self, c: float) -> "KronSum":
        """``c · F`` for a finite real ``c ≥ 0`` (also written ``c * F``): the weights times c.

        ``TypeError`` for a non-number, ``ValueError`` for a negative, infinite or NaN ``c``."""
        c = check_real(c, "the factor c of c·F", minimum=0.0)
        if self.form == "sum":
            return KronSum.concat(*(P.scaled(c) for P in self.parts))
        return KronSum(self.form, self.weights * c, L=self.L, R=self.R, G=self.G, A=self.A,
                       symmetric=self.symmetric, _xp=self._xp, psd_terms=self._psd_terms)

    def __add__(self, other: "KronSum") -> "KronSum":
        if not isinstance(other, KronSum):
            return NotImplemented
        return KronSum.concat(self, other)

    def __mul__(self, c: float) -> "KronSum":
        return self.scaled(c)

    __rmul__ = __mul__

    # -- constructors ------------------------------------------------------------------
    @classmethod
    def from_terms(cls, L: Array, R: Array, weights: Array | None = None, *,
                   check_finite: bool = True) -> "KronSum":
        """``F = Σ_k w_k L_k ⊗ R_k`` from stacks ``L`` (K, m, m) and ``R`` (K, n, n).

        The terms need not be symmetric; ``F.symmetric`` records whether they are (then the
        estimators return symmetric factors).
        """
        L = check_array(L, "L", ndim=3, what="(K, m, m)")
        R = check_array(R, "R", ndim=3, what="(K, n, n)")
        xp = namespace(L, R, names=("L", "R"))
        if L.shape[1] != L.shape[2]:
            raise ValueError(f"L must have shape (K, m, m) with square terms, got {tuple(L.shape)}")
        if R.shape[1] != R.shape[2]:
            raise ValueError(f"R must have shape (K, n, n) with square terms, got {tuple(R.shape)}")
        if L.shape[0] != R.shape[0]:
            raise ValueError(
                f"L and R must hold the same number of terms K, got L {tuple(L.shape)} and "
                f"R {tuple(R.shape)}"
            )
        dtype = xp.result_type(L, R)
        L, R = xp.astype(L, dtype, copy=False), xp.astype(R, dtype, copy=False)
        if check_finite:
            check_finite_values(xp, L, "L")
            check_finite_values(xp, R, "R")
        w = check_weights(weights, L.shape[0], xp, dtype, device_of(L), check_finite=check_finite)
        sym = bool(xp.all(L == xp.matrix_transpose(L))) and bool(xp.all(R == xp.matrix_transpose(R)))
        return cls("terms", w, L=L, R=R, symmetric=sym, _xp=xp)

    @classmethod
    def from_outer(cls, G: Array, A: Array, weights: Array | None = None, *,
                   check_finite: bool = True) -> "KronSum":
        """``F = Σ_k w_k g_k g_kᵀ ⊗ a_k a_kᵀ`` from ``G`` (K, m) and ``A`` (K, n).

        One term per sample of a fully-connected layer: ``g_k`` is the gradient with respect
        to the layer's outputs, ``a_k`` its (bias-augmented) input. Memory O(K(m + n)).
        """
        G = check_array(G, "G", ndim=2, what="(K, m)")
        A = check_array(A, "A", ndim=2, what="(K, n)")
        return cls._from_factors("outer", G, A, weights, check_finite)

    @classmethod
    def from_conv(cls, G: Array, A: Array, weights: Array | None = None, *,
                  check_finite: bool = True) -> "KronSum":
        """``F = Σ_k w_k vec(X_k) vec(X_k)ᵀ`` with ``X_k = G_kᵀ A_k``, from ``G`` (K, T, m), ``A`` (K, T, n).

        Equivalently ``Σ_k w_k Σ_{t,t'} g_{kt} g_{kt'}ᵀ ⊗ a_{kt} a_{kt'}ᵀ``: the exact Fisher
        block of a convolution with T spatial positions (``A`` holds the unfolded patches,
        ``G`` the output gradients per position). Memory O(KT(m + n)).
        """
        G = check_array(G, "G", ndim=3, what="(K, T, m)")
        A = check_array(A, "A", ndim=3, what="(K, T, n)")
        if G.shape[1] != A.shape[1]:
            raise ValueError(
                f"G and A must have the same number of positions T, got G {tuple(G.shape)} "
                f"and A {tuple(A.shape)}"
            )
        return cls._from_factors("conv", G, A, weights, check_finite)

    @classmethod
    def _from_factors(cls, form, G, A, weights, check_finite):
        xp = namespace(G, A, names=("G", "A"))
        if G.shape[0] != A.shape[0]:
            raise ValueError(
                f"G and A must have the same number of samples K, got G {tuple(G.shape)} and "
                f"A {tuple(A.shape)}"
            )
        dtype = xp.result_type(G, A)
        G, A = xp.astype(G, dtype, copy=False), xp.astype(A, dtype, copy=False)
        if check_finite:
            check_finite_values(xp, G, "G")
            check_finite_values(xp, A, "A")
        w = check_weights(weights, G.shape[0], xp, dtype, device_of(G), check_finite=check_finite)
        return cls(form, w, G=G, A=A, symmetric=True, _xp=xp)

    # -- shape and type ----------------------------------------------------------------
    @property
    def xp(self) -> Any:
        """The array namespace of the inputs."""
        return self._xp

    @property
    def m(self) -> int:
        """Size of the left (gradient-side) factors."""
        if self.form == "sum":
            return self.parts[0].m
        return int((self.L if self.form == "terms" else self.G).shape[-1])

    @property
    def n(self) -> int:
        """Size of the right (activation-side) factors."""
        if self.form == "sum":
            return self.parts[0].n
        return int((self.R if self.form == "terms" else self.A).shape[-1])

    @property
    def num_terms(self) -> int:
        """K, the number of samples (terms)."""
        return int(self.weights.shape[0])

    @property
    def num_positions(self) -> int:
        """T for the conv form, 1 otherwise."""
        return int(self.G.shape[1]) if self.form == "conv" else 1

    @property
    def shape(self) -> tuple[int, int]:
        """``(m·n, m·n)``, the shape of the dense F."""
        d = self.m * self.n
        return (d, d)

    @property
    def dtype(self) -> Any:
        return self.weights.dtype

    @property
    def device(self) -> Any:
        return device_of(self.weights)

    def __repr__(self) -> str:
        if self.form == "sum":
            return f"KronSum(form='sum', parts={list(self.parts)!r})"
        extra = f", T={self.num_positions}" if self.form == "conv" else ""
        return (f"KronSum(form={self.form!r}, K={self.num_terms}{extra}, m={self.m}, "
                f"n={self.n}, dtype={self.dtype})")

    # -- the two contractions ------------------------------------------------------------
    def contract_left(self, X: Array | None = None) -> Array:
        r"""``Σ_k w_k ⟨L_k, X⟩ R_k`` for ``X`` of shape (m, m): ``𝓡(F)ᵀ vec(X)`` as an (n, n) matrix.

        ``X=None`` means the identity, ``Σ_k w_k tr(L_k) R_k``, computed without the product
        with ``I`` (TKFAC's right factor times ``tr F``).

        Cost: terms O(K(m² + n²)); outer O(K(m² + n²)) without forming any ``g gᵀ``;
        conv O(K(Tm² + T²(m + n) + Tn²)), O(K(Tmn + m²n + mn²)) or, on NumPy for a symmetric
        ``X``, O(K(Tm² + Tmn + mn²/2) + m³) (``syrk`` over the rows ``(G_k v_i)ᵀ A_k`` of
        ``X``'s eigenvectors), whichever is cheapest.
        """
        if X is not None:
            self._check_square(X, "X", self.m)
        count("contractions")
        return self._contract_left(X)

    def _contract_left(self, X: Array | None) -> Array:
        if self.form == "sum":
            return _sum_over(P._contract_left(X) for P in self.parts)
        if self.form == "conv":
            return self._conv_contract(X, self.G, self.A)
        c = self._traces("left") if X is None else self._inner("left", X)
        return self._combine("right", self.weights * c)

    def contract_right(self, Y: Array | None = None) -> Array:
        r"""``Σ_k w_k ⟨R_k, Y⟩ L_k`` for ``Y`` of shape (n, n): ``𝓡(F) vec(Y)`` as an (m, m) matrix.

        ``Y=None`` means the identity. Cost as :meth:`contract_left` with m and n exchanged.
        """
        if Y is not None:
            self._check_square(Y, "Y", self.n)
        count("contractions")
        return self._contract_right(Y)

    def _contract_right(self, Y: Array | None) -> Array:
        if self.form == "sum":
            return _sum_over(P._contract_right(Y) for P in self.parts)
        if self.form == "conv":
            return self._conv_contract(Y, self.A, self.G)
        c = self._traces("right") if Y is None else self._inner("right", Y)
        return self._combine("left", self.weights * c)

    def _contract_eig(self, side: str, d: Array, V: Array) -> Array:
        """:meth:`contract_left` (``side="left"``; ``contract_right`` for ``"right"``) of
        ``M = V diag(d) Vᵀ`` given by ``r`` of its eigenpairs: ``V`` (p, r) with orthonormal
        columns, ``d`` (r,), e.g. the part of a factor that a PSD projection removes. Counted
        as one contraction. The outer form's quadratic forms ``g_kᵀMg_k = ((G V)²d)_k`` cost
        ``K·p·r`` instead of ``K·p²`` (the weighted Gram product of the other side, ``K·q²/2``,
        is the same); the conv form on NumPy (and PyTorch CPU tensors through it) takes the rows
        route (:func:`kronsum._accel.eig_quadratic_sum`, or the held per-sample matrices') with
        the ``r`` given rows per sample and no ``eigh``, ``r/p`` of that route's rows, where
        that is cheaper than the best route for the formed ``M``; elsewhere ``M`` is formed."""
        count("contractions")
        return self._contract_by_eig(side == "left", d, V)

    def _contract_by_eig(self, left: bool, d: Array, V: Array) -> Array:
        xp = self._xp
        if self.form == "sum":
            return _sum_over(P._contract_by_eig(left, d, V) for P in self.parts)
        if self.form == "outer":
            GV = (self.G if left else self.A) @ V  # (K, r)
            return self._combine("right" if left else "left", self.weights * ((GV * GV) @ d))
        if self.form == "conv" and syrk_available(xp):
            P, Q = (self.G, self.A) if left else (self.A, self.G)
            (K, T, p), q, held = P.shape, Q.shape[-1], self._Xp is not None
            # the given eigenpairs' rows against the cheapest route for the formed M
            route = "held-rows" if held else "rows"
            given = conv_contraction_costs(K, T, p, q, syrk=True, per_sample=held, rank=V.shape[1])[route]
            full = conv_contraction_costs(K, T, p, q, syrk=True, trmm=trmm_pays(K * T, p, xp), per_sample=held)
            if given <= min(full.values()):
                if held:
                    return _per_sample_contract(self._Xp, None, left=left, rows=True, xp=xp, eig=(d, V))
                return eig_quadratic_sum(P, Q, None, self.weights, eig=(d, V))
        M = (V * d) @ xp.matrix_transpose(V)
        return self._contract_left(M) if left else self._contract_right(M)

    def _check_square(self, X, name, size):
        if X.ndim != 2 or tuple(X.shape) != (size, size):
            raise ValueError(f"{name} must have shape ({size}, {size}), got {tuple(X.shape)}")

    # per-term inner products ⟨L_k, X⟩ (or ⟨R_k, Y⟩) and combinations Σ c_k L_k (terms/outer,
    # and sums of those: the parts' terms in order, as in ``weights``)
    def _gram_able(self) -> bool:
        """Whether every term is a ``terms`` or ``outer`` term (the Gram solver's forms)."""
        if self.form == "sum":
            return all(P.form in ("terms", "outer") for P in self.parts)
        return self.form in ("terms", "outer")

    def _split(self, c: Array) -> list:
        """``c`` (K,) cut into the parts' pieces (form "sum")."""
        out, i0 = [], 0
        for P in self.parts:
            out.append(c[i0:i0 + P.num_terms])
            i0 += P.num_terms
        return out

    def _inner(self, side: str, X: Array) -> Array:
        xp = self._xp
        if self.form == "sum":
            return xp.concat([P._inner(side, X) for P in self.parts])
        if self.form == "terms":
            T = self.L if side == "left" else self.R
            d = T.shape[-1]
            return xp.reshape(T, (T.shape[0], d * d)) @ xp.reshape(X, (d * d,))
        return quadratic_rows(self.G if side == "left" else self.A, X, xp)  # g_kᵀ X g_k

    def _traces(self, side: str) -> Array:
        """``(tr L_k)_k`` (side="left") or ``(tr R_k)_k``, shape (K,) (terms/outer)."""
        xp = self._xp
        if self.form == "sum":
            return xp.concat([P._traces(side) for P in self.parts])
        if self.form == "terms":
            return trace(self.L if side == "left" else self.R, xp)
        return row_sq_norms(self.G if side == "left" else self.A, xp)

    def _combine(self, side: str, c: Array) -> Array:
        xp = self._xp
        if self.form == "sum":
            return _sum_over(P._combine(side, cp) for P, cp in zip(self.parts, self._split(c)))
        if self.form == "terms":
            T = self.L if side == "left" else self.R
            d = T.shape[-1]
            if c.dtype != T.dtype:  # promoted as a mixed-dtype product would be (PyTorch's @ is not)
                dt = xp.result_type(c, T)
                c, T = xp.astype(c, dt), xp.astype(T, dt)
            return xp.reshape(c @ xp.reshape(T, (T.shape[0], d * d)), (d, d))
        return weighted_gram(self.G if side == "left" else self.A, c, xp)

    def _conv_contract(self, M: Array | None, P: Array, Q: Array) -> Array:
        """``Σ_k w_k Y_kᵀ M Y_k`` with ``Y_k = P_kᵀ Q_k``; P (K, T, p), Q (K, T, q), M (p, p).

        ``M=None`` is the identity. The association (per position through ``P_k M P_kᵀ``, per
        sample through ``Y_k``, or, where ``syrk`` is at hand and ``M`` is symmetric, the
        weighted Gram product of the rows ``(P_k v_i)ᵀ Q_k`` of ``M``'s eigenvectors:
        :func:`kronsum._accel.eig_quadratic_sum`) is chosen by multiply-add count; the
        positions route takes ``P_k M P_kᵀ`` from :func:`kronsum._accel.quadratic_blocks`
        (``trmm`` with ``M``'s triangle where that pays). Symmetric means
        :func:`kronsum._accel.symmetric_to_rounding`.
        """
        xp = self._xp
        K, T, p = P.shape
        q = Q.shape[-1]
        w = self.weights[:, None, None]
        held = self._Xp is not None
        costs = conv_contraction_costs(K, T, p, q, identity=M is None, syrk=syrk_available(xp),
                                       trmm=trmm_pays(K * T, p, xp), per_sample=held)
        if held:
            best = min(costs, key=costs.get)
            if best != "positions":
                rows = best == "held-rows" and (M is None or symmetric_to_rounding(M))
                return _per_sample_contract(self._Xp, M, left=P is self.G, rows=rows, xp=xp)
        elif costs.get("rows", math.inf) < min(costs["positions"], costs["samples"]) and (M is None or symmetric_to_rounding(M)):
            return eig_quadratic_sum(P, Q, M, self.weights)
        if held or costs["positions"] <= costs["samples"]:
            B = w * (P @ xp.matrix_transpose(P) if M is None else quadratic_blocks(P, M, xp))  # w_k P_k M P_kᵀ
            C = B @ Q  # (K, T, q); the weights folded into B: one array of the inputs' size
            return xp.matrix_transpose(xp.reshape(Q, (K * T, q))) @ xp.reshape(C, (K * T, q))
        Y = xp.matrix_transpose(P) @ Q  # (K, p, q)
        MY = w * Y if M is None else w * (M @ Y)  # not (w·M) @ Y: no (K, p, p) array
        Yt = xp.reshape(Y, (K * p, q))
        return xp.matrix_transpose(Yt) @ xp.reshape(MY, (K * p, q))

    # -- per-sample matrices for the conv form -----------------------------------------
    def _conv_X(self) -> Array:
        """``X_k = G_kᵀ A_k``, shape (K, m, n). Materialises K·m·n numbers."""
        xp = self._xp
        return xp.matrix_transpose(self.G) @ self.A

    def _per_sample_pays(self) -> bool:
        """Whether a solve on this conv sum should hold its weighted per-sample matrices
        (:meth:`_with_per_sample`): their K·m·n numbers are at most the inputs' K·T·(m + n)
        (``mn ≤ T(m + n)``), not on Dask (whose contractions are one map-reduce over the
        inputs' chunks), and the contractions they make cheaper save, over three
        applications, more than forming them costs (``KTmn``; :func:`conv_contraction_costs`)."""
        if self.form != "conv" or is_dask_namespace(self._xp):
            return False
        K, T, m, n = self.num_terms, self.num_positions, self.m, self.n
        if m * n > T * (m + n):
            return False
        xp = self._xp
        saved = 0.0
        for p, q in ((m, n), (n, m)):
            kw = dict(syrk=syrk_available(xp), trmm=trmm_pays(K * T, p, xp))
            saved += (min(conv_contraction_costs(K, T, p, q, **kw).values())
                      - min(conv_contraction_costs(K, T, p, q, per_sample=True, **kw).values()))
        return 3 * saved > T * m * n

    def _with_per_sample(self, Xp: Array | None = None) -> "KronSum":
        """The same conv sum holding ``√w_k X_k`` (``X_k = G_kᵀA_k``) in the layout (m, K, n)
        (``Xp``, or computed: ``K·T·m·n`` multiply-adds), so that every contraction may take
        them instead of forming the per-sample products again (:func:`_per_sample_contract`);
        ``self`` where that does not pay (:meth:`_per_sample_pays`)."""
        if not self._per_sample_pays():
            return self
        xp = self._xp
        out = KronSum(self.form, self.weights, G=self.G, A=self.A, symmetric=self.symmetric, _xp=xp)
        if Xp is None:
            m, K, n = self.m, self.num_terms, self.n
            Z = xp.permute_dims(self._conv_X() * xp.sqrt(self.weights)[:, None, None], (1, 0, 2))
            # flattened and back: a copy in the (m, K, n) layout itself, so that the
            # contractions' reshapes of it are views on every library
            Xp = xp.reshape(xp.reshape(Z, (m, K * n)), (m, K, n))
        out._Xp = Xp
        return out

    # -- dense views -----------------------------------------------------------------------
    def _rearranged_rows(self, i0: int, i1: int) -> Array:
        r"""Rows ``(i, i')`` for ``i0 <= i < i1`` of 𝓡(F): shape ((i1 - i0)·m, n²)."""
        if self.form == "sum":
            return _sum_over(P._rearranged_rows(i0, i1) for P in self.parts)
        xp = self._xp
        m, n, K = self.m, self.n, self.num_terms
        b = i1 - i0
        w = self.weights
        if self.form == "terms":
            Lb = xp.reshape(self.L[:, i0:i1, :], (K, b * m))
            return xp.matrix_transpose(Lb) @ (w[:, None] * xp.reshape(self.R, (K, n * n)))
        if self.form == "outer":
            G, A = self.G, self.A
            P = xp.reshape(G[:, i0:i1, None] * G[:, None, :], (K, b * m))
            Q = xp.reshape(A[:, :, None] * A[:, None, :], (K, n * n))
            return xp.matrix_transpose(P) @ (w[:, None] * Q)
        X = self._conv_X()
        Xb = xp.reshape(X[:, i0:i1, :], (K, b * n))
        blk = xp.matrix_transpose(Xb) @ (w[:, None] * xp.reshape(X, (K, m * n)))  # (b n, m n)
        blk = xp.permute_dims(xp.reshape(blk, (b, n, m, n)), (0, 2, 1, 3))
        return xp.reshape(blk, (b * m, n * n))

    def rearranged(self, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Array:
        r"""The dense ``(m², n²)`` rearrangement ``𝓡(F) = Σ_k w_k vec(L_k) vec(R_k)ᵀ``.

        Its best rank-one approximation ``σ₁ u vᵀ`` gives the nearest Kronecker product
        ``σ₁ mat(u) ⊗ mat(v)``. Memory O(m²n²): for tests and small layers; ``ValueError``
        above ``max_elements`` entries (default 2**26).
        """
        check_dense_size(self.m**2 * self.n**2, "the rearranged matrix (m², n²)", max_elements)
        return self._rearranged_rows(0, self.m)

    def to_dense(self, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Array:
        """The dense ``(m·n, m·n)`` matrix F. Memory O((mn)²): for tests and small layers;
        ``ValueError`` above ``max_elements`` entries (default 2**26)."""
        check_dense_size((self.m * self.n) ** 2, "the dense F (m·n, m·n)", max_elements)
        if self.form == "sum":
            return _sum_over(P.to_dense(max_elements=max_elements) for P in self.parts)
        xp = self._xp
        m, n = self.m, self.n
        if self.form == "outer":
            Z = xp.reshape(self.G[:, :, None] * self.A[:, None, :], (self.num_terms, m * n))
            return xp.matrix_transpose(Z) @ (self.weights[:, None] * Z)
        if self.form == "conv":
            Z = xp.reshape(self._conv_X(), (self.num_terms, m * n))
            return xp.matrix_transpose(Z) @ (self.weights[:, None] * Z)
        A = xp.reshape(self.rearranged(max_elements=max_elements), (m, m, n, n))
        return xp.reshape(xp.permute_dims(A, (0, 2, 1, 3)), (m * n, m * n))

    # -- scalar summaries ----------------------------------------------------------------
    def trace(self) -> Array:
        """``tr F = Σ_k w_k tr(L_k) tr(R_k)`` as a 0-d array, in O(K(m + n)) for outer/conv.

        Computed on the normalised sum (:meth:`normalized`), so inputs of any magnitude whose
        F fits the dtype give a finite, accurate trace; ``OverflowError`` when ``tr F`` itself
        is beyond the dtype's range.
        """
        Fn, (cw, cl, cr) = self.normalized()
        c = cw * (cl * cr)
        t = Fn._trace()
        check_in_range(to_float(t) * c, "tr F", self._xp, self.dtype)
        return times_scale(t, c)

    def _trace(self) -> Array:
        if self.form == "sum":
            return _sum_over(P._trace() for P in self.parts)
        xp = self._xp
        w = self.weights
        if self.form == "terms":
            return xp.sum(w * trace(self.L, xp) * trace(self.R, xp))
        if self.form == "outer":
            return xp.sum(w * xp.sum(self.G**2, axis=1) * xp.sum(self.A**2, axis=1))
        X2 = xp.sum(xp.sum(self._conv_X() ** 2, axis=2), axis=1)  # ‖X_k‖²
        return xp.sum(w * X2)

    def frobenius_norm(self) -> Array:
        """``‖F‖_F`` as a 0-d array, from K×K Gram matrices (in row chunks), never from F.

        ``‖F‖²_F = Σ_{k,l} w_k w_l ⟨L_k, L_l⟩⟨R_k, R_l⟩``. Cost O(K²(m + n)) for the outer
        form, O(K²(m² + n²)) for terms, O(K²mn + KTmn) for conv. Safe from overflow: computed on
        the normalised sum; ``OverflowError`` when ``‖F‖_F`` itself is beyond the dtype's range.
        """
        xp = self._xp
        Fn, (cw, cl, cr) = self.normalized()
        s2 = Fn._sq_norm()
        c = cw * (cl * cr)
        nrm = xp.sqrt(xp.where(s2 > 0, s2, xp.zeros_like(s2)))
        check_in_range(to_float(nrm) * c, "‖F‖_F", xp, self.dtype)
        return times_scale(nrm, c)

    def _sq_norm(self) -> Array:
        if self.form == "sum":
            total = _sum_over(P._sq_norm() for P in self.parts)
            for i, P in enumerate(self.parts):
                for Q in self.parts[i + 1:]:
                    total = total + 2 * _cross_inner(P, Q)
            return total
        xp = self._xp
        w = self.weights
        K = self.num_terms
        Xf = None
        if self.form == "conv" and self._Xp is not None:  # the held √w_k X_k: weights folded in
            Xf = xp.reshape(xp.permute_dims(self._Xp, (1, 0, 2)), (K, self.m * self.n))
            w = xp.ones_like(w)
        elif self.form == "conv":
            Xf = xp.reshape(self._conv_X(), (K, self.m * self.n))
        total = xp.zeros((), dtype=self.dtype, device=self.device)
        for i0 in range(0, K, _CHUNK):
            i1 = min(K, i0 + _CHUNK)
            total = total + xp.sum((w[i0:i1] @ self._pair_gram(i0, i1, Xf)) * w)
        return total

    def _rounding_scale(self) -> float:
        """``S = Σ_k |w_k| β_k`` with ``β_k`` the inputs' magnitude in term k: ``‖g_k‖²‖a_k‖²``
        (outer), ``‖G_k‖²_F ‖A_k‖²_F`` (conv), ``‖L_k‖_F ‖R_k‖_F`` (terms); sums add their parts'.
        Rounding every input (weights included) to a precision of unit roundoff ``u`` moves F by
        at most ``5u·S`` to first order (outer and conv: ``4u`` from the two sides' products and
        ``u`` from the weight; terms ``3u``), so by at most ``3ε·S`` with ``ε = 2u``. Cost
        O(K·T·(m + n)) (terms O(K(m² + n²))); a host float."""
        if self.form == "sum":
            return sum(P._rounding_scale() for P in self.parts)
        xp = self._xp
        K = self.num_terms
        if self.form == "terms":
            L2 = xp.reshape(self.L, (K, self.m * self.m))
            R2 = xp.reshape(self.R, (K, self.n * self.n))
            beta = xp.sqrt(row_sq_norms(L2, xp) * row_sq_norms(R2, xp))
        else:
            G2 = xp.reshape(self.G, (K, -1))
            A2 = xp.reshape(self.A, (K, -1))
            beta = row_sq_norms(G2, xp) * row_sq_norms(A2, xp)
        return to_float(xp.sum(xp.abs(self.weights) * beta))

    def _positions_scale(self) -> tuple[float, int]:
        """``(S', T)`` of the conv parts: ``S' = Σ_k |w_k| (Σ_t ‖g_kt‖‖a_kt‖)²``, the magnitude
        at which the contractions' per-position products round (``Σ_t g_t a_tᵀ`` rounds at
        ``Σ_t ‖g_t‖‖a_t‖``, however much the positions cancel), and the most positions of a
        part; ``(0.0, 1)`` without conv parts. Cost O(K·T·(m + n)); a host float."""
        if self.form == "sum":
            parts = [P._positions_scale() for P in self.parts]
            return sum(s for s, _ in parts), max(t for _, t in parts)
        if self.form != "conv":
            return 0.0, 1
        xp = self._xp
        K, T = self.num_terms, self.num_positions
        ng = row_sq_norms(xp.reshape(self.G, (K * T, self.m)), xp)
        na = row_sq_norms(xp.reshape(self.A, (K * T, self.n)), xp)
        per = xp.sum(xp.reshape(xp.sqrt(ng * na), (K, T)), axis=1)
        return to_float(xp.sum(xp.abs(self.weights) * per * per)), T

    def _conv_trace(self) -> float:
        """``Σ_k |w_k| ‖G_kᵀA_k‖²_F`` over the conv parts (their trace of F), computed in float64
        where the library has it (accurate however much the positions cancel), by the cheaper
        of the per-sample matrices (``K·T·m·n`` multiply-adds, ``K·m·n`` numbers) and the
        positions' Gram matrices (``K·T²·(m + n)``, ``K·T²`` numbers); 0.0 without conv parts."""
        if self.form == "sum":
            return sum(P._conv_trace() for P in self.parts)
        if self.form != "conv":
            return 0.0
        xp = self._xp
        G, A, w = self.G, self.A, xp.abs(self.weights)
        if float64_available(xp) and G.dtype != xp.float64:
            G, A, w = (xp.astype(v, xp.float64) for v in (G, A, w))
        T, m, n = self.num_positions, self.m, self.n
        if T * (m + n) < m * n:
            SG = G @ xp.matrix_transpose(G)
            per = xp.sum(xp.reshape(SG * (A @ xp.matrix_transpose(A)), (self.num_terms, T * T)), axis=1)
        else:
            X = xp.matrix_transpose(G) @ A
            per = xp.sum(xp.reshape(X * X, (self.num_terms, m * n)), axis=1)
        return to_float(xp.sum(w * per))

    def _pair_gram(self, i0: int, i1: int, Xf: Array | None = None) -> Array:
        """Rows i0:i1 of the K×K matrix ``⟨L_k, L_l⟩⟨R_k, R_l⟩``; conv form: from ``Xf``, the
        flattened per-sample matrices (K, m·n), formed here when ``None``."""
        if self.form == "conv":
            xp = self._xp
            if Xf is None:
                Xf = xp.reshape(self._conv_X(), (self.num_terms, self.m * self.n))
            return (Xf[i0:i1, :] @ xp.matrix_transpose(Xf)) ** 2
        return self._gram("left", i0, i1) * self._gram("right", i0, i1)

    def _gram(self, side: str, i0: int = 0, i1: int | None = None, *, float64: bool = False) -> Array:
        """Rows i0:i1 of ``S = [⟨L_k, L_l⟩]`` (side="left") or ``[⟨R_k, R_l⟩]`` (terms/outer).

        ``float64=True`` returns float64 (the numba kernels; the array-API Gram route below
        float64), the outer form's Hadamard square taken in float64 (NumPy: straight from the
        inputs' dtype in one pass).
        """
        xp = self._xp
        if self.form == "sum":  # blocks between the parts (the whole matrix only)
            if i0 != 0 or i1 not in (None, self.num_terms):
                raise NotImplementedError("row blocks of a sum's Gram matrix")
            parts = self.parts
            blocks = {}
            for i, P in enumerate(parts):
                blocks[i, i] = P._gram(side, float64=float64)
                for j in range(i + 1, len(parts)):
                    blocks[i, j] = _cross_gram(P, parts[j], side, float64)
                    blocks[j, i] = xp.matrix_transpose(blocks[i, j])
            return xp.concat([xp.concat([blocks[i, j] for j in range(len(parts))], axis=1)
                              for i in range(len(parts))], axis=0)
        i1 = self.num_terms if i1 is None else i1
        if self.form == "terms":
            T = self.L if side == "left" else self.R
            d = T.shape[-1]
            Tf = xp.reshape(T, (T.shape[0], d * d))
            S = Tf[i0:i1, :] @ xp.matrix_transpose(Tf)
            return xp.astype(S, xp.float64, copy=False) if float64 else S
        V = self.G if side == "left" else self.A
        S = row_gram(V, xp) if (i0, i1) == (0, self.num_terms) else V[i0:i1, :] @ xp.matrix_transpose(V)
        return _squared(S, float64)

    def _arrays(self) -> list:
        """Every input array (weights and statistics; a sum: its parts')."""
        if self.form == "sum":
            return [a for P in self.parts for a in P._arrays()]
        return [a for a in (self.weights, self.L, self.R, self.G, self.A) if a is not None]

    def _outer_positions(self) -> "KronSum":
        """The same F with every conv part of one position (T = 1: a 1×1 output map, as in a
        ResNet's last stage) as an outer part, ``Σ_k w_k g_k g_kᵀ ⊗ a_k a_kᵀ`` exactly (views
        of the same arrays), so that the solvers for the outer form apply; ``self`` when there
        is none."""
        if self.form == "sum":
            parts = tuple(P._outer_positions() for P in self.parts)
            if all(p is q for p, q in zip(parts, self.parts)):
                return self
            return KronSum("sum", self.weights, symmetric=self.symmetric, _xp=self._xp, parts=parts)
        if self.form != "conv" or self.G.shape[1] != 1:
            return self
        xp, K = self._xp, self.G.shape[0]
        return KronSum("outer", self.weights, G=xp.reshape(self.G, (K, self.m)),
                       A=xp.reshape(self.A, (K, self.n)), symmetric=True, _xp=xp)

    def _map(self, f, xp: Any = None) -> "KronSum":
        """The same sum with every input array replaced by ``f(array)`` (namespace ``xp``)."""
        xp = self._xp if xp is None else xp
        if self.form == "sum":
            return KronSum("sum", f(self.weights), symmetric=self.symmetric, _xp=xp,
                           parts=tuple(P._map(f, xp) for P in self.parts))
        g = (lambda a: None if a is None else f(a))
        return KronSum(self.form, f(self.weights), L=g(self.L), R=g(self.R), G=g(self.G),
                       A=g(self.A), symmetric=self.symmetric, _xp=xp, psd_terms=self._psd_terms)

    def persisted(self) -> "KronSum":
        """The same sum with Dask inputs persisted (computed once, in one pass, kept in memory
        or on the workers of a ``distributed`` cluster, whatever their size, with their
        chunks); other backends are returned unchanged."""
        if not is_dask_namespace(self._xp):
            return self
        arrays = self._arrays() + ([self.weights] if self.form == "sum" else [])
        done = dict(zip((id(a) for a in arrays), persist_all(*arrays)))
        return self._map(lambda a: done[id(a)])

    def astype(self, dtype: Any) -> "KronSum":
        """The same sum with every input cast to ``dtype`` (a real floating dtype of its namespace)."""
        xp = self._xp
        if not xp.isdtype(dtype, "real floating"):
            raise TypeError(f"dtype must be a real floating dtype, got {dtype}")
        return self._map(lambda a: xp.astype(a, dtype))

    # -- scaling ---------------------------------------------------------------------------
    def normalized(self) -> tuple["KronSum", tuple[float, float, float]]:
        """``(F̃, (c_w, c_L, c_R))`` with ``F = c_w c_L c_R · F̃`` and inputs of F̃ of moderate size.

        ``c_w`` scales the weights, ``c_L`` the left terms (``c_G²`` for outer/conv) and ``c_R``
        the right ones. Each input whose largest magnitude lies outside ``[2⁻³⁰, 2³⁰]``
        (``[2⁻⁸, 2⁸]`` in float32) is divided by a power of two (exact, no rounding) to bring
        it near 1; inputs inside that range are used as they are, without a copy. The
        estimators work on F̃, so inputs of any magnitude the dtype holds give finite, correct
        answers when the answer itself fits. A zero input (F = 0) gives the factors 1.

        The three factors are Python floats (powers of two). When one of them alone would
        leave float64's range although F does not (opposite scales that cancel, such as
        ``G·1e200`` with ``A/1e200``), they are balanced: each is then near the cube root of
        the product, and only the product ``c_w·(c_L·c_R)`` keeps its meaning.
        """
        Fn, ew, el, er, zero = self._normalized()
        return Fn, (1.0, 1.0, 1.0) if zero else _pow2_floats(ew, el, er)

    def _normalized(self) -> tuple["KronSum", int, int, int, bool]:
        """``(F̃, e_w, e_L, e_R, zero)``: :meth:`normalized` with the exponents of its powers of
        two (``F = 2^(e_w + e_L + e_R) F̃``), exact whatever their size. ``zero``: an input
        (weights or one side's statistics) is all zeros, so F = F̃ = 0; the exponents are
        still those of the inputs (K-FAC's factors need them)."""
        xp = self._xp
        if self.form == "sum":
            normed = [P._normalized() for P in self.parts]
            totals = [ew + el + er for _, ew, el, er, _ in normed]
            live = [t for t, nd in zip(totals, normed) if not nd[4]]
            top = max(live) if live else 0
            if top == 0 and all(P is nd[0] for P, nd in zip(self.parts, normed)) and \
                    all(t == 0 for t in totals):
                return self, 0, 0, 0, not live
            # each part relative to the largest non-zero one: 2^(E_p − E) ≤ 1 (0.0 for a
            # negligible part; a zero part is zero whatever its factor)
            parts = [Q.scaled(1.0 if zero else _ldexp1(t - top))
                     for (Q, *_, zero), t in zip(normed, totals)]
            return KronSum.concat(*parts), top, 0, 0, not live
        maxima = max_abs_host(self._scaled_arrays(), xp)
        return self._normalized_by(maxima)

    def _scaled_arrays(self) -> tuple:
        """The three inputs :meth:`normalized` scales, of a single-form sum: ``(weights, L, R)``
        (terms) or ``(weights, G, A)``."""
        if self.form == "terms":
            return self.weights, self.L, self.R
        return self.weights, self.G, self.A

    def _normalized_by(self, maxima: Sequence[float]) -> tuple["KronSum", int, int, int, bool]:
        """:meth:`_normalized` of a single-form sum with the largest magnitudes ``maxima`` of
        its :meth:`_scaled_arrays` given (e.g. the largest over the ranks of a process group,
        so that every rank scales its part alike)."""
        xp = self._xp
        (ew, e1, e2), zero = _pow2_exponents(maxima, self.dtype, xp)
        if ew == e1 == e2 == 0:
            return self, 0, 0, 0, zero
        w, P, Q = self._scaled_arrays()
        if self.form == "terms":
            out = KronSum("terms", _div_pow2(w, ew), L=_div_pow2(P, e1), R=_div_pow2(Q, e2),
                          symmetric=self.symmetric, _xp=xp, psd_terms=self._psd_terms)
            return out, ew, e1, e2, zero
        out = KronSum(self.form, _div_pow2(w, ew), G=_div_pow2(P, e1), A=_div_pow2(Q, e2),
                      symmetric=True, _xp=xp)
        return out, ew, 2 * e1, 2 * e2, zero


_POW2_RANGE = (2.0**-30, 2.0**30)
# float32: the squared norm takes fourth powers of the entries times squared weights, which
# leave float32's range (2¹²⁸) from entries of 2³⁰; entries within 2^±8 keep it inside
_POW2_RANGE_32 = (2.0**-8, 2.0**8)


def _per_sample_contract(Xp: Array, M: Array | None, *, left: bool, rows: bool, xp: Any,
                         eig: tuple | None = None) -> Array:
    """``Σ_k Z_kᵀ M Z_k`` (``left``: M (m, m), the (n, n) result of ``contract_left``) or
    ``Σ_k Z_k M Z_kᵀ`` (M (n, n), the (m, m) result of ``contract_right``) from the held
    weighted per-sample matrices ``Z_k = √w_k X_k``, ``Xp`` (m, K, n); ``M=None`` is the
    identity. Each is one or two products over all samples: in this layout the sums over k
    and over X's rows are one contraction. ``rows`` (NumPy, symmetric ``M``):
    ``M = V diag(d) Vᵀ`` (one ``eigh``) and the Gram product of the rows ``√|d_i| v_iᵀZ_k``
    (or the columns ``√|d_i| Z_k v_i``) of each sign of ``d`` (``syrk``: half the
    multiply-adds of the second product); the identity is one such Gram product. ``eig=(d, V)``
    (``M=None``, ``rows``): ``M`` given by some of its eigenpairs (:func:`kronsum._accel.eig_gram`)."""
    m, K, n = Xp.shape
    X2 = xp.reshape(Xp, (m, K * n))
    Xr = xp.reshape(Xp, (m * K, n))
    if M is not None and not rows:
        if left:
            return xp.matrix_transpose(Xr) @ xp.reshape(M @ X2, (m * K, n))
        return xp.reshape(Xr @ M, (m, K * n)) @ xp.matrix_transpose(X2)
    if M is None and eig is None:
        return xp.matrix_transpose(Xr) @ Xr if left else X2 @ xp.matrix_transpose(X2)
    import numpy as np

    if left:  # rows √|d_i| v_iᵀ Z_k (length n), as (p_s·K, n)
        out = eig_gram(M, lambda Vs: np.reshape(Vs.T @ X2, (-1, n)), eig)
    else:  # columns √|d_i| Z_k v_i (length m), as the rows of (K·p_s, m)
        out = eig_gram(M, lambda Vs: np.reshape(Xr @ Vs, (m, -1)).T, eig)
    d_out = n if left else m
    return np.zeros((d_out, d_out), dtype=Xp.dtype) if out is None else out


def conv_contraction_costs(K: int, T: int, p: int, q: int, *, identity: bool = False,
                           syrk: bool = False, trmm: bool = False, per_sample: bool = False,
                           rank: int | None = None) -> dict:
    """Multiply-adds per sample of each association of the conv contraction
    ``Σ_k w_k Y_kᵀ M Y_k`` (``Y_k = P_kᵀQ_k``, ``M`` (p, p), ``identity``: ``M = I``):
    ``"positions"`` through ``P_k M P_kᵀ``, ``"samples"`` through ``Y_k``, and with ``syrk``
    ``"rows"``, the weighted Gram product of the rows of ``M``'s eigenvectors (its ``eigh``,
    about ``12p³ + 5·10⁵`` multiply-adds at a GEMM's speed on one BLAS thread, shared by the K
    samples; ``trmm``: the positions route's ``P_k M`` through ``trmm``,
    :func:`kronsum._accel.quadratic_blocks`, at :data:`kronsum._accel.TRMM_TIME` of a gemm).
    ``per_sample``: the per-sample matrices are held (:meth:`KronSum._with_per_sample`), which
    replaces ``"samples"`` and ``"rows"`` by ``"held"`` and ``"held-rows"`` (the same
    associations without forming ``Y_k``). ``rank``: ``M`` given by that many of its
    eigenpairs (:meth:`KronSum._contract_eig`), so the rows routes take ``rank`` rows per
    sample instead of ``p`` and no ``eigh``. The one cost model of
    :meth:`KronSum._conv_contract` and K-FOC's method choice."""
    m_cost = 0 if identity else p * p
    out = {"positions": T * m_cost * (TRMM_TIME if trmm else 1) + T * T * (p + q) + T * q * q}
    eig = 0 if identity or rank is not None else (12 * p ** 3 + 5e5) / K
    r = p if rank is None else rank  # the rows per sample of the rows routes
    if per_sample:
        out["held"] = m_cost * q + (p * q * q / 2 if identity else p * q * q)
        if syrk:
            out["held-rows"] = (0 if identity else r * p * q) + r * q * q / 2 + eig
        return out
    out["samples"] = T * p * q + m_cost * q + p * q * q
    if syrk:
        out["rows"] = (0 if identity else T * p * r) + T * r * q + r * q * q / 2 + eig
    return out


def _sum_over(arrays):
    it = iter(arrays)
    total = next(it)
    for a in it:
        total = total + a
    return total


def _cross_inner(P: KronSum, Q: KronSum) -> Array:
    """``⟨P, Q⟩_F`` of two single-form sums, without forming either.

    With a terms-form side, through its terms and the other's contraction; otherwise through
    the per-sample matrices ``X_k`` (outer: ``g_k a_kᵀ``): ``Σ_{k,l} w_k w_l ⟨X_k, X'_l⟩²``.
    """
    xp = P.xp
    if Q.form == "terms" and P.form != "terms":
        P, Q = Q, P
    if P.form == "terms":
        if Q.form == "conv":
            return _terms_conv_inner(P, Q)
        # terms or outer: ⟨P, Q⟩ = w_Pᵀ (S_L ∘ S_R) w_Q with the parts' cross Gram matrices
        SL, SR = _cross_gram(P, Q, "left", False), _cross_gram(P, Q, "right", False)
        return xp.sum((P.weights @ (SL * SR)) * Q.weights)

    def flat_X(F):
        X = F._conv_X() if F.form == "conv" else F.G[:, :, None] * F.A[:, None, :]
        return xp.reshape(X, (F.num_terms, F.m * F.n))

    XP, XQ = flat_X(P), flat_X(Q)
    total = xp.zeros((), dtype=P.dtype, device=P.device)
    for i0 in range(0, P.num_terms, _CHUNK):
        i1 = min(P.num_terms, i0 + _CHUNK)
        total = total + xp.sum((P.weights[i0:i1] @ (XP[i0:i1, :] @ xp.matrix_transpose(XQ)) ** 2) * Q.weights)
    return total


def _squared(S: Array, float64: bool) -> Array:
    """The Hadamard square of a fresh Gram product ``S``: the outer form's ``(VWᵀ)∘(VWᵀ)``.
    ``float64=True``: in float64 (NumPy: in place when ``S`` already is), so that squares below
    a lower precision's range are kept."""
    if not float64:
        return S**2
    import numpy as np

    if isinstance(S, np.ndarray):
        return np.square(S, out=S) if S.dtype == np.float64 else np.square(S, dtype=np.float64)
    xp = namespace(S)
    S = xp.astype(S, xp.float64)
    return S * S


def _cross_gram(P: KronSum, Q: KronSum, side: str, float64: bool) -> Array:
    """``[⟨L_k, L'_l⟩]`` (side="left") or ``[⟨R_k, R'_l⟩]`` between the terms of two parts of
    the terms/outer forms, shape (K_P, K_Q); float64 on request (see :meth:`KronSum._gram`)."""
    xp = P.xp
    if P.form == "outer" and Q.form == "outer":
        V, W = (P.G, Q.G) if side == "left" else (P.A, Q.A)
        return _squared(V @ xp.matrix_transpose(W), float64)
    if P.form == "terms" and Q.form == "terms":
        T, U = (P.L, Q.L) if side == "left" else (P.R, Q.R)
        d = T.shape[-1]
        S = xp.reshape(T, (-1, d * d)) @ xp.matrix_transpose(xp.reshape(U, (-1, d * d)))
    elif P.form == "terms":  # ⟨T_k, v_l v_lᵀ⟩ = v_lᵀ T_k v_l, in chunks of T's terms
        T, V = (P.L, Q.G) if side == "left" else (P.R, Q.A)
        Kp, Kq, d = T.shape[0], V.shape[0], V.shape[-1]
        step = max(1, min(Kp, _CROSS_BUDGET // max(Kq * d, 1)))
        blocks = [row_dots(V[None, ...] @ xp.matrix_transpose(T[i0:i0 + step, ...]), V[None, ...], xp)
                  for i0 in range(0, Kp, step)]
        S = blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=0)
    else:
        return xp.matrix_transpose(_cross_gram(Q, P, side, float64))
    return xp.astype(S, xp.float64, copy=False) if float64 else S


def _terms_conv_inner(P: KronSum, Q: KronSum) -> Array:
    """``⟨P, Q⟩_F = Σ_{k,l} w_k w'_l ⟨X_l, L_k X_l R_kᵀ⟩`` for a terms-form ``P`` and a conv
    ``Q``, batched over P's terms in chunks sized so that no intermediate holds more than
    about ``_CROSS_BUDGET`` (2²⁴) numbers (no loop over single terms)."""
    xp = P.xp
    Kp, Kq, m, n = P.num_terms, Q.num_terms, P.m, P.n
    # numbers per term of P in the largest intermediate (broadcast batches may be expanded)
    step = max(1, min(Kp, _CROSS_BUDGET // max(Kq * (m * n + m * m + n * n), 1)))
    X = Q._conv_X()[None, ...]  # (1, Kq, m, n)
    total = xp.zeros((), dtype=P.dtype, device=P.device)
    for i0 in range(0, Kp, step):
        L, R = P.L[i0:i0 + step, ...], P.R[i0:i0 + step, ...]  # (c, m, m), (c, n, n)
        LXR = (L[:, None, ...] @ X) @ xp.matrix_transpose(R)[:, None, ...]  # (c, Kq, m, n)
        inner = xp.sum(LXR * X, axis=(-2, -1))  # (c, Kq)
        total = total + xp.sum((P.weights[i0:i0 + step] @ inner) * Q.weights)
    return total


def _pow2_exponents(maxima: Sequence[float], dtype: Any, xp: Any) -> tuple[list[int], bool]:
    """``(exponents, any array all zero)`` from the arrays' largest magnitudes ``maxima``. Per
    array: 0 when ``max|x|`` is 0, not finite or within the dtype's window, else the ``e`` with
    ``2^e ≤ max|x| < 2^(e+1)`` (so ``2^e`` is representable in the dtype, even for a largest
    entry of 2¹⁰²³ or a subnormal one)."""
    lo, hi = _POW2_RANGE if xp.finfo(dtype).bits >= 64 else _POW2_RANGE_32
    out, zero = [], False
    for c in maxima:
        zero = zero or c == 0.0
        if c == 0.0 or lo <= c <= hi or not math.isfinite(c):
            out.append(0)
        else:
            out.append(math.frexp(c)[1] - 1)
    return out, zero


def _ldexp1(e: int) -> float:
    """``2^e`` as a float: ``inf`` above float64's range and ``0.0`` below it (no exception)."""
    if e > 1023:
        return math.inf
    return math.ldexp(1.0, max(e, -1100))


def times_scale(x: Array, c: float) -> Array:
    """``x · c`` for a 0-d (or small) array ``x`` and a power-of-two factor ``c`` from
    :meth:`KronSum.normalized`, in steps of at most 2¹⁰⁰: no step casts a number beyond the
    range of ``x``'s dtype (float32) when the product itself fits."""
    if c == 1.0 or c == 0.0 or not math.isfinite(c):
        return x * c
    mant, e = math.frexp(c)
    x = x * (2 * mant)
    e -= 1
    while e != 0:
        step = max(-100, min(100, e))
        x = x * math.ldexp(1.0, step)
        e -= step
    return x


def _div_pow2(x: Array, e: int) -> Array:
    """``x / 2^e`` (exact); ``x`` itself for ``e = 0``."""
    return x if e == 0 else x / math.ldexp(1.0, e)


def _pow2_floats(ew: int, el: int, er: int) -> tuple[float, float, float]:
    """``(2^ew, 2^el, 2^er)`` when each and their product are normal float64 numbers; else a
    balanced split of ``2^(ew + el + er)`` (each near its cube root), so that
    ``c_w·(c_L·c_R)`` is computed without an intermediate overflow or underflow. A product
    beyond float64's range gives ``inf`` or ``0.0``."""
    total = ew + el + er
    if all(-1022 <= e <= 1023 for e in (ew, el, er, el + er, total)):
        return math.ldexp(1.0, ew), math.ldexp(1.0, el), math.ldexp(1.0, er)
    if total > 2046:
        return math.inf, 1.0, 1.0
    if total < -2100:
        return 0.0, 1.0, 1.0
    a = total // 3
    b = (total - a) // 2
    return math.ldexp(1.0, a), math.ldexp(1.0, b), math.ldexp(1.0, total - a - b)
