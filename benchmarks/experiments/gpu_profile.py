"""Where K-FAC's and K-FOC's time goes on a GPU (outer form, K=1024, m=n=4096, float32).

    python benchmarks/experiments/gpu_profile.py [cupy|torch]

Times each phase of ``kfac`` and ``kfoc`` (method "gram") with a device synchronisation around
it (median of 10), then, for torch, prints the profiler's kernel table for one call of each.
A diagnostic used to write docs/benchmarks.md's GPU section, not a benchmark.
"""

import statistics
import sys
import time

import kronsum as ks
from kronsum import _eigen
from kronsum._accel import weighted_gram

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from gpu_report import Lib, outer_case  # noqa: E402


def med(lib, fn, n=10):
    fn()
    lib.sync()
    ts = []
    for _ in range(n):
        lib.sync()
        t0 = time.perf_counter()
        fn()
        lib.sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main(name):
    lib = Lib(name)
    K, m = (1024, 4096) if lib.name != "numpy" else (128, 256)
    G, A = outer_case(lib, K, m, m)
    F = ks.KronSum.from_outer(G, A)
    Fn, _ = F.normalized()
    xp = F.xp
    w = Fn.weights
    SP = Fn._gram("left")
    rows = {
        "GEMM G.T@G": lambda: G.T @ G,
        "weighted_gram(G, w)": lambda: weighted_gram(G, w, xp),
        "normalized()": lambda: F.normalized(),
        "kfac": lambda: ks.kfac(F),
        "tkfac": lambda: ks.tkfac(F),
        "_gram('left')": lambda: Fn._gram("left"),
        "SP @ alpha (K-vector)": lambda: SP @ w,
        "gram_solve (incl. finish)": lambda: _eigen.gram_solve(Fn, Fn.weights * Fn._traces("right"),
                                                               _eigen.Stop(1e-5), 500),
        "kfoc": lambda: ks.kfoc(F),
    }
    for k, fn in rows.items():
        print(f"[{name}] {k:28s} {med(lib, fn):9.3f} ms", flush=True)
    out = _eigen.gram_solve(Fn, Fn.weights * Fn._traces("right"), _eigen.Stop(1e-5), 500)
    print(f"[{name}] route {out.route}, applications {out.eig.iterations}, sigma2 {out.eig.sigma2}")
    with ks.config(check_every=1):
        print(f"[{name}] kfoc check_every=1 {med(lib, lambda: ks.kfoc(F)):9.3f} ms")
    with ks.config(gram_squaring=False):
        print(f"[{name}] kfoc (Lanczos route) {med(lib, lambda: ks.kfoc(F)):9.3f} ms, "
              f"{ks.kfoc(F).info.iterations} applications")
    import cProfile
    import pstats

    ks.kfoc(F)
    lib.sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        ks.kfoc(F)
    lib.sync()
    prof.disable()
    print(f"--- cProfile: 10 x kfoc [{name}]")
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)
    if name.startswith("torch"):
        from torch.profiler import ProfilerActivity, profile

        for label, fn in (("kfac", lambda: ks.kfac(F)), ("kfoc", lambda: ks.kfoc(F))):
            fn()
            lib.sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                lib.sync()
            print(f"--- torch profiler: {label}")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "torch")
