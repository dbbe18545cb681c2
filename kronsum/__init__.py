"""kronsum: nearest-Kronecker-product kernels for sums of Kronecker products.

``F = Σ_k w_k L_k ⊗ R_k`` — the Fisher block of a layer that per-sample statistics give —
is held implicitly by :class:`KronSum`; the estimators :func:`kfac`, :func:`tkfac` and
:func:`kfoc` return a :class:`Kron` ``scale · left ⊗ right``, :func:`ekfac` an
eigenvalue-corrected :class:`EigenKron` in one of their eigenbases; :func:`nearest_kronecker` is
the dense ground truth and :func:`frobenius_error` the exact error. Every function takes
arrays of any array-API library and returns arrays of the same library, device and dtype.

Conventions: row-major vec, ``(L ⊗ R) vec(V) = vec(L V Rᵀ)`` with ``vec(V) = V.reshape(-1)``;
a weight stored (out, in) has its block as gradient-side ⊗ activation-side; F is a sum.
"""

from ._accel import clear_cuda_graphs
from ._closed_forms import kfac, tkfac
from ._config import config, get_config, set_config
from ._ekfac import EigenKron, ekfac
from ._error import AccuracyWarning, frobenius_error
from ._kfoc import MethodChoice, choose_method, kfoc
from ._kronsvd import KronSVD, kronecker_svd
from ._inverse import DecompositionError, KronInverse, tkfac_damped_inverses
from ._kron import Kron, KronInfo
from ._reference import nearest_kronecker
from ._running import RunningEstimate
from ._sum import KronSum

__version__ = "0.1.0"

__all__ = [
    "AccuracyWarning",
    "DecompositionError",
    "EigenKron",
    "Kron",
    "KronInfo",
    "KronInverse",
    "KronSVD",
    "KronSum",
    "RunningEstimate",
    "choose_method",
    "MethodChoice",
    "clear_cuda_graphs",
    "config",
    "get_config",
    "set_config",
    "ekfac",
    "frobenius_error",
    "kfac",
    "kfoc",
    "kronecker_svd",
    "nearest_kronecker",
    "tkfac",
    "tkfac_damped_inverses",
    "__version__",
]
