"""Side-by-side timing of kfac/kfoc from two versions of kronsum on a GPU (outer form, K=1024,
m=n=4096, float32), phases of kfoc's squaring route and the option ``cuda_graphs`` (torch),
plus the GPU's busy time inside one call (torch profiler).

    python benchmarks/experiments/gpu_ab.py [cupy,torch] [OLD_DIR]

``OLD_DIR`` holds an earlier version of the package renamed ``kronsum_old`` (e.g.
``git archive <commit> kronsum | tar -x -C OLD_DIR && mv OLD_DIR/kronsum OLD_DIR/kronsum_old``;
the package imports itself relatively). A diagnostic used for docs/benchmarks.md, not a
benchmark: the numbers there come from ``benchmarks/gpu_report.py``.
"""

import os
import statistics
import sys

sys.path.insert(0, __file__.rsplit("/", 2)[0])
import kronsum as ks  # noqa: E402
from gpu_report import Lib, interleaved, outer_case  # noqa: E402


def gpu_busy(lib, fn):
    """(wall of one call, summed kernel time, kernel count) from the torch profiler, in ms."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    lib.sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        lib.sync()
    kern = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy = sum(e.time_range.end - e.time_range.start for e in kern) / 1e3
    span = (max(e.time_range.end for e in kern) - min(e.time_range.start for e in kern)) / 1e3
    return span, busy, len(kern)


def _graphs(F):
    with ks.config(cuda_graphs=True):
        return ks.kfoc(F)


def variants_torch(lib, F):
    """Phases of the squaring route, and the route with the option ``cuda_graphs``."""
    from kronsum import _eigen

    def norm_pass():  # F.normalized() and the squaring pass, its products and its read
        Fn, _ = F.normalized()
        st = _eigen.squaring_pass(Fn, Fn.weights * Fn._traces("right"))
        L, R = Fn._combine("left", st.cL), Fn._combine("right", st.cR)
        return L, R, st.scalars.tolist()

    return {"normalized": lambda: F.normalized(), "norm_pass": norm_pass,
            "kfoc_graphs": lambda: _graphs(F)}


def main(names, old_dir):
    old = None
    if old_dir and os.path.isdir(old_dir):
        sys.path.insert(0, old_dir)
        import kronsum_old as old
    for name in names:
        lib = Lib(name)
        G, A = outer_case(lib, 1024, 4096, 4096)
        F = ks.KronSum.from_outer(G, A)
        fns = {"floor": lambda: (G.T @ G, A.T @ A), "kfac": lambda: ks.kfac(F),
               "kfoc": lambda: ks.kfoc(F)}
        if old is not None:
            Fo = old.KronSum.from_outer(G, A)
            fns.update({"kfac_old": lambda: old.kfac(Fo), "kfoc_old": lambda: old.kfoc(Fo)})
        if name == "torch":
            fns.update(variants_torch(lib, F))
        for rnd in range(3):
            times, outs = interleaved(lib, fns, 30)
            ms = {k: 1e3 * v for k, v in times.items()}
            line = "  ".join(f"{k} {v:.3f}" for k, v in ms.items())
            ratio = f"kfoc/kfac {ms['kfoc'] / ms['kfac']:.2f}"
            if "kfoc_graphs" in ms:
                ratio += f"  graphs {ms['kfoc_graphs'] / ms['kfac']:.2f}"
            if old is not None:
                ratio += f"  old {ms['kfoc_old'] / ms['kfac_old']:.2f}"
            print(f"[{name}] round {rnd}: {line} ms | {ratio}", flush=True)
        info = outs["kfoc"].info
        print(f"[{name}] kfoc {info.method} its {info.iterations} sigma2 {info.sigma2} "
              f"scale {float(outs['kfoc'].scale):.6g}", flush=True)
        if old is not None:
            d = float(lib.xp.max(lib.xp.abs(outs["kfoc"].left - outs["kfoc_old"].left)))
            print(f"[{name}] old {outs['kfoc_old'].info.method}; max |L_new - L_old| = {d:.3g}, "
                  f"scale old {float(outs['kfoc_old'].scale):.6g}", flush=True)
        if "kfoc_graphs" in outs:
            d = float(lib.xp.max(lib.xp.abs(outs["kfoc_graphs"].left - outs["kfoc"].left)))
            print(f"[{name}] cuda_graphs: max |L_graphs - L_kfoc| = {d:.3g}")
        if name.startswith("torch"):
            for k in ("kfac", "kfoc", "kfoc_graphs") + (("kfoc_old",) if old is not None else ()):
                try:
                    span, busy, n = gpu_busy(lib, fns[k])
                    print(f"[{name}] profile {k}: kernels {n}, busy {busy:.3f} ms over a span of "
                          f"{span:.3f} ms", flush=True)
                except Exception as exc:  # a diagnostic: say why and go on
                    print(f"[{name}] profile {k} failed: {exc!r}")
        del F, G, A


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["torch", "cupy"],
         sys.argv[2] if len(sys.argv) > 2 else None)
