r"""A laplace-torch curvature backend whose Kronecker factors are kronsum's estimates.

`laplace-torch <https://github.com/aleximmer/Laplace>`_ builds a Kronecker-factored Laplace
posterior (``hessian_structure="kron"``) from a *curvature backend*, a subclass of
``laplace.curvature.CurvatureInterface`` whose ``kron(x, y, N)`` returns the batch's loss and
a ``laplace.utils.Kron``. :class:`KronsumGGN` is such a backend: it takes each layer's exact
(or Monte-Carlo) GGN block with :func:`kronsum.adapters.torch.collect` and replaces laplace-torch's
own K-FAC by ``kronsum.kfac``, ``kronsum.tkfac`` or ``kronsum.kfoc`` — the Frobenius-nearest
Kronecker product of the block, which laplace-torch cannot otherwise use::

    from laplace import Laplace
    from kronsum.adapters.laplace import KronsumGGN

    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
                 backend=KronsumGGN, backend_kwargs={"estimator": "kfoc"})
    la.fit(train_loader)
    la.optimize_prior_precision()

laplace-torch is an optional dependency (``pip install laplace-torch``); importing this module
without it raises ``ImportError``.

Conventions
-----------
laplace-torch keeps one entry per parameter, in the order of the model's parameters: a weight
``W`` of shape ``(out, in, ...)`` gets two factors ``[B, A]`` with its block ``≈ B ⊗ A``
(``B`` of size ``out``, ``A`` of size ``in·∏kernel``: kronsum's gradient-side ⊗ activation-side
convention with the same row-major ``vec``), and a bias its own dense ``out × out`` block. So
the weight's block here is the block *without* the bias column, and the bias's block is its
exact GGN block ``Σ_k w_k b_k b_kᵀ`` (``b_k`` the per-sample bias gradients), not an
approximation — except with ``weight_sharing="expand"`` on a layer applied to sequences, where
every position is a term (K-FAC-expand's bias block). ``nn.Embedding``'s weight ``(num, dim)`` gets ``[B, A]`` of sizes ``num`` and
``dim`` (kronsum's block is for ``Wᵀ``; its factors are swapped).

An estimate ``σ L ⊗ R`` is split as ``A = (t/tr R)·R`` with ``t`` the mean trace of the
activation statistics (so that for K-FAC ``A`` is the mean activation covariance and ``B`` the
summed gradient covariance, exactly laplace-torch's split) and ``B = σ (tr R/t) L``; ``A`` is
then scaled by ``M/N`` (batch size over data set size) as laplace-torch's backends do, because
``KronLaplace`` *adds factors* over the batches of its data loader. With one batch (the whole
data set) the posterior's block is exactly ``σ L ⊗ R``. With several, K-FAC is unchanged (both
of its factors are sums over the data, so the factor-wise sum is K-FAC of the whole set); for
``tkfac`` and ``kfoc`` the factor-wise sum of per-batch estimates is an approximation of the
whole set's estimate.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Mapping

try:
    import torch
    from laplace.curvature import GGNInterface
    from laplace.utils import Kron as LaplaceKron
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kronsum.adapters.laplace needs torch and laplace-torch: pip install laplace-torch"
    ) from exc

from .._closed_forms import kfac, tkfac
from .._kfoc import kfoc
from .._sum import KronSum
from .torch import _specs_by_key, collect

__all__ = ["KronsumGGN", "ESTIMATORS"]

ESTIMATORS = ("kfoc", "kfac", "tkfac")


class KronsumGGN(GGNInterface):
    r"""laplace-torch curvature backend: Kronecker factors from ``kfoc``, ``kfac`` or ``tkfac``.

    Pass the class as ``Laplace(..., hessian_structure="kron", backend=KronsumGGN,
    backend_kwargs={...})``; laplace-torch constructs it. ``kron`` is kronsum's; ``full`` and
    ``diag`` are laplace-torch's generic GGN ones (``torch.func`` Jacobians).

    Parameters
    ----------
    model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y, stochastic, num_samples
        As for ``laplace.curvature.GGNInterface`` (set by laplace-torch). ``stochastic=True``
        uses the Monte-Carlo Fisher with ``num_samples`` sampled labels per input
        (``collect(..., fisher="mc")``), else the exact GGN (``fisher="exact"``).
    estimator : {"kfoc", "kfac", "tkfac"}
        The Kronecker estimate of each weight's block.
    weight_sharing : {"sample", "expand", "reduce"}
        Passed to :func:`~kronsum.adapters.torch.collect`: how a Linear or Embedding applied to
        sequences enters (convolutions always keep their exact per-sample blocks). ``"sample"``
        (default) keeps each sample's exact block, so ``kfoc`` is the Frobenius-nearest Kronecker
        product of the exact GGN block; ``"expand"`` takes every position as a sample
        (laplace-torch's K-FAC-expand; ``kfac`` is the same either way); ``"reduce"`` is K-FAC-reduce.
    kfoc_options : mapping, optional
        Keyword arguments of :func:`kronsum.kfoc` (e.g. ``{"accuracy": 1e-4}``).

    Raises
    ------
    ValueError
        From ``kron``: a parameter without a block of its own (a layer kind
        :func:`~kronsum.adapters.torch.coverage` does not cover, normalisation layers, a grouped
        convolution or a cross-attention projection whose weight spans several blocks), or
        ``subnetwork_indices`` (use ``hessian_structure="full"`` or ``"diag"`` for those).
    TypeError
        Dict-like (Hugging Face) inputs, which ``collect`` does not take.

    Notes
    -----
    Cost of ``kron`` per batch: one :func:`~kronsum.adapters.torch.collect` (a forward pass and
    the Fisher type's backward passes) and the estimator per layer (see its page), plus one
    extra forward pass for the loss.

    Examples
    --------
    >>> import torch
    >>> from laplace import Laplace
    >>> from kronsum.adapters.laplace import KronsumGGN
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=32)
    >>> la = Laplace(model, "classification", hessian_structure="kron", backend=KronsumGGN,
    ...              backend_kwargs={"estimator": "kfoc"})
    >>> la.fit(loader)
    >>> bool(torch.isfinite(la.log_marginal_likelihood()))
    True
    """

    def __init__(self, model: Any, likelihood: Any, last_layer: bool = False,
                 subnetwork_indices: Any = None, dict_key_x: str = "input_ids",
                 dict_key_y: str = "labels", stochastic: bool = False, num_samples: int = 1,
                 estimator: str = "kfoc", weight_sharing: str = "sample",
                 kfoc_options: Mapping[str, Any] | None = None) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if weight_sharing not in ("sample", "expand", "reduce"):
            raise ValueError("weight_sharing must be one of ('sample', 'expand', 'reduce'), "
                             f"got {weight_sharing!r}")
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x,
                         dict_key_y, stochastic, num_samples)
        self.estimator = estimator
        self.weight_sharing = weight_sharing
        self.kfoc_options = dict(kfoc_options or {})

    def kron(self, x: Any, y: Any, N: int, **kwargs: Any) -> tuple[Any, LaplaceKron]:
        """The batch's loss (``factor ×`` the summed loss) and its ``laplace.utils.Kron``
        (one entry per parameter in ``self.params``' order), rescaled by ``len(y)/N``."""
        if isinstance(x, MutableMapping):
            raise TypeError("KronsumGGN takes tensor inputs; dict-like (Hugging Face) batches are "
                            "not supported by kronsum.adapters.torch.collect")
        if self.subnetwork_indices is not None:
            raise ValueError("KronsumGGN has no subnetwork Kronecker factors: use "
                             "hessian_structure='full' or 'diag' with subnetwork_indices")
        if self.last_layer:  # a laplace FeatureExtractor: the whole network, its last layer's block
            net, layers = self.model.model, [self.model._last_layer_name]
            # laplace-torch's last-layer posterior has every parameter of the last layer, frozen
            # or not (its n_params counts them all); collect gives blocks of trainable ones only
            params = {f"{layers[0]}.{k}": p for k, p in self.model.last_layer.named_parameters()}
            frozen = [k for k, p in params.items() if not p.requires_grad]
            if frozen:
                raise ValueError(
                    f"subset_of_weights='last_layer' with frozen last-layer parameters {frozen}: "
                    "laplace-torch's last-layer posterior includes them, KronsumGGN has no block "
                    "for them; unfreeze them or use subset_of_weights='all'")
        else:
            net, layers = self.model, None
            params = dict(self.params_dict)
        fisher = "mc" if self.stochastic else "exact"
        blocks = collect(net, self.lossfunc, x, y, fisher=fisher, n_samples=self.num_samples,
                         layers=layers, weight_sharing=self.weight_sharing)
        owners = _owners(net, blocks, params)
        M = int(y.shape[0])
        kfacs = []
        for name in params:
            role, spec = owners[name]
            F = blocks[spec.key]
            if role == "bias":
                kfacs.append([_bias_block(F)])
            else:
                kfacs.append(self._weight_factors(F if spec.bias is None else _drop_last_column(F),
                                                  spec.transpose, M / N))
        kron = LaplaceKron(kfacs) * self.factor
        with torch.no_grad():
            loss = self.lossfunc(self.model(x), y)
        return self.factor * loss.detach(), kron

    def _weight_factors(self, F: KronSum, transpose: bool, ratio: float) -> list:
        if self.estimator == "kfoc":
            est = kfoc(F, **self.kfoc_options)
        else:
            est = (kfac if self.estimator == "kfac" else tkfac)(F)
        L, R, sigma = est.left, est.right, est.scale
        acts = F.A
        t = float(torch.linalg.vector_norm(acts)) ** 2 / F.num_terms  # mean activation trace
        tr = float(torch.trace(R))
        c = t / tr if t > 0 and tr > 0 else 1.0
        B, A = sigma * L / c, c * R
        if transpose:  # kronsum's block is for Wᵀ: vec(W) swaps the factors
            B, A = A, B
        return [B, A * ratio]


def _owners(net: Any, blocks: Mapping[str, KronSum], params: Mapping[str, Any]) -> dict:
    """``{parameter name: ("weight" | "bias", BlockSpec)}`` for every parameter, or a
    ``ValueError`` naming those without a block of their own."""
    specs = _specs_by_key(net)
    owners: dict = {}
    shared: set = set()
    for key in blocks:
        spec = specs[key]
        for role, pname in (("weight", spec.weight), ("bias", spec.bias)):
            if pname is None:
                continue
            if pname in owners or spec.rows is not None or spec.vector:
                shared.add(pname)
            owners[pname] = (role, spec)
    missing = [p for p in params if p not in owners]
    bad = [p for p in params if p in shared]
    if missing or bad:
        raise ValueError(
            "laplace-torch's Kron keeps one block per parameter; these parameters have none that "
            f"KronsumGGN can give: {missing + bad} (uncovered layers, normalisation layers, grouped "
            "convolutions or cross-attention projections). Freeze them (requires_grad=False), "
            "use subset_of_weights='last_layer', or another hessian_structure"
        )
    return owners


def _drop_last_column(F: KronSum) -> KronSum:
    """The block of the weight alone: F's activation statistics without the bias's column of ones."""
    if F.form == "outer":
        return KronSum.from_outer(F.G, F.A[:, :-1], F.weights, check_finite=False)
    return KronSum.from_conv(F.G, F.A[..., :-1], F.weights, check_finite=False)


def _bias_block(F: KronSum) -> Any:
    """The bias's exact block ``Σ_k w_k u_k u_kᵀ``, ``u_k = G_kᵀ a_k`` with ``a_k`` the last
    activation column (the bias's input of ones; conv form: ``u_k`` sums over positions)."""
    U = F.G * F.A[..., -1:]
    if F.form == "conv":
        U = U.sum(dim=1)
    return (U * F.weights[:, None]).T @ U
