import numpy as np
import kronsum as ks

rng = np.random.default_rng(0)
scale = rng.standard_t(3, size=(512, 1))              # per-sample gradient sizes vary (heavy tails)
G = scale * rng.standard_normal((512, 32))             # output gradients of a Linear(64, 32), per sample
A = np.hstack([np.abs(scale) * rng.standard_normal((512, 64)), np.ones((512, 1))])  # inputs + bias
F = ks.KronSum.from_outer(G, A)                        # F = Σ_k g_k g_kᵀ ⊗ a_k a_kᵀ, never formed
for name, est in [("K-FAC", ks.kfac(F)), ("TKFAC", ks.tkfac(F)), ("K-FOC", ks.kfoc(F))]:
    print(f"{name:6s} ‖F − F̂‖/‖F‖ = {float(ks.frobenius_error(F, est, relative=True)):.4f}")
