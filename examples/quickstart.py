import numpy as np
import kronsum as ks

rng = np.random.default_rng(0)
# per-sample gradient sizes vary (heavy tails)
scale = rng.standard_t(3, size=(512, 1))
# output gradients of a Linear(64, 32), per sample
G = scale * rng.standard_normal((512, 32))
# its inputs, and a column of ones for the bias
A = np.hstack([np.abs(scale) * rng.standard_normal((512, 64)), np.ones((512, 1))])
# F = Σ_k g_k g_kᵀ ⊗ a_k a_kᵀ, never formed
F = ks.KronSum.from_outer(G, A)
for name, est in [("K-FAC", ks.kfac(F)), ("TKFAC", ks.tkfac(F)), ("K-FOC", ks.kfoc(F))]:
    err = float(ks.frobenius_error(F, est, relative=True))
    print(f"{name:6s} ‖F − F̂‖/‖F‖ = {err:.4f}")
