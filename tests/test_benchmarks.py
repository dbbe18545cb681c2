"""Smoke tests of the benchmark suites (CI runs these; the timings themselves are in docs/)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # subprocesses, a cluster or a site build: `-m "not slow"` skips them

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_report_quick_runs_and_writes_records(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    records = json.loads(out.read_text())
    assert records and all({"case", "method", "median_s", "peak_mib"} <= set(r) for r in records)
    assert all(r["median_s"] > 0 for r in records)
    # every K-FOC answer in the table is at the optimum (the targets' accuracy condition)
    gaps = [r["gap_to_optimum"] for r in records if r.get("gap_to_optimum") is not None]
    assert gaps and max(gaps) <= 1e-8
    assert "| case | method |" in proc.stdout


def test_kfoc_floor_quick_runs_every_family(tmp_path):
    """benchmarks/kfoc_floor.py on small sizes: every case and data family, CPU and wall time,
    and every answer within the default accuracy of the optimum."""
    pytest.importorskip("sklearn")
    out = tmp_path / "floor.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kfoc_floor.py"), "--quick",
                           "--rounds", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    records = json.loads(out.read_text())
    for case in ("outer-1024", "outer-4096", "conv", "small-layers", "outer-1797", "outer-1797-f32"):
        fams = {r["family"] for r in records if r["case"] == case}
        assert len(fams) == 4, (case, fams)
    assert all(r["kfoc_cpu_s"] > 0 and r["kfac_wall_s"] > 0 for r in records)
    assert max(r["gap_to_optimum"] for r in records if r["dtype"] == "float64") <= 1e-8
    assert "× kfac (CPU)" in proc.stdout


def test_method_choice_sweep_quick_runs(tmp_path):
    """benchmarks/method_choice.py on small sizes: both solvers timed on every case, the model's
    choice and its cost over the faster solver's recorded."""
    out = tmp_path / "choice.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "method_choice.py"), "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    records = json.loads(out.read_text())
    assert {r["form"] for r in records} == {"outer", "conv"}
    assert {r["dtype"] for r in records} == {"float64", "float32"}
    for r in records:
        assert r["chosen"] in ("gram", "lanczos") and r["faster"] in ("gram", "lanczos")
        assert r["chosen_over_faster"] >= 1.0 and r["gram_cpu_s"] > 0 and r["lanczos_cpu_s"] > 0
    assert "picked the faster solver in" in proc.stdout


@pytest.mark.skipif(shutil.which("asv") is None, reason="asv is not installed (extra 'bench')")
def test_asv_suite_passes_asv_check(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path))  # asv writes ~/.asv-machine.json
    cwd = ROOT / "benchmarks"
    subprocess.run(["asv", "machine", "--yes", "--machine", "ci"], cwd=cwd, env=env, check=True,
                   capture_output=True, timeout=120)
    proc = subprocess.run(["asv", "check", "-E", "existing:same"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No problems found" in proc.stdout


def test_gpu_report_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu_report.py (the GPU table in docs/benchmarks.md) on NumPy, small sizes."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), "--backends", "numpy",
                           "--quick", "--repeats", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in json.loads(out.read_text()) if r["case"] != "gemm"]
    assert {r["case"].split()[0] for r in rows} == {"outer", "conv"}
    for r in rows:
        assert r["floor_s"] > 0 and r["kfac_s"] > 0 and r["kfoc_converged"]
        assert r["kfoc_relerr"] <= r["tkfac_relerr"] + 1e-6 and r["kfoc_relerr"] <= r["kfac_relerr"] + 1e-6
    assert "| backend | case |" in proc.stdout


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # in curvlinops' deps
def test_adapter_report_runners_all_run():
    """Every method of benchmarks/adapter_torch_report.py runs on a small case (no timing)."""
    pytest.importorskip("torch", reason="torch is not installed")
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (extra 'bench')")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import adapter_torch_report as rep
    finally:
        sys.path.pop(0)
    methods = rep.METHODS[1:] + rep.EXTRA + rep.STREAM[1:]
    try:
        import curvlinops  # noqa: F401
        methods = rep.METHODS + rep.EXTRA + rep.STREAM
    except ImportError:
        pass
    for case in ("mlp", "cnn"):
        model, X, y = rep._build(case, "float64")
        X, y = X[:150], y[:150]  # two mini-batches for the stream-* methods
        for method in methods:
            out = rep._runner(method, model, X, y)()
            assert out is not None
    # the NumPy route and the PyTorch-only path give the same factors
    a = rep._runner("kronsum-kfoc", model, X, y)()
    b = rep._runner("kronsum-kfoc-torch", model, X, y)()
    for name in a:
        assert (a[name].to_dense() - b[name].to_dense()).abs().max() <= 1e-8 * b[name].to_dense().abs().max()


def test_kfoc_vs_peers_runs_on_a_few_samples(tmp_path):
    """benchmarks/kfoc_vs_peers.py on 16 digits images: every layer, every method at the optimum."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    out = tmp_path / "peers.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kfoc_vs_peers.py"), "--samples", "16",
                           "--rounds", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    records = json.loads(out.read_text())
    assert len(records) == 7  # 4 MLP and 3 CNN layers
    for r in records:
        assert r["kfoc_gap"] <= 1e-8 and r["authors-power_gap"] <= 1e-6 and r["scipy-svds_gap"] <= 1e-8, r


def test_ekfac_report_quick_runs(tmp_path):
    """benchmarks/ekfac_report.py (the table in docs/ekfac.md) on small sizes."""
    out = tmp_path / "ekfac.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ekfac_report.py"), "--quick",
                           "--rounds", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    records = json.loads(out.read_text())["records"]
    assert {r["case"] for r in records} == {"outer", "conv"}
    assert all(r["ekfac_cpu_s"] > 0 and r["kfac_cpu_s"] > 0 for r in records)
    assert "| case | shape | kfac |" in proc.stdout


def test_laplace_and_training_reports_quick(tmp_path):
    """benchmarks/laplace_report.py and training_report.py on small sizes: every backend and
    optimiser gives finite numbers; kronsum's K-FAC reproduces laplace-torch's evidence."""
    pytest.importorskip("sklearn")
    pytest.importorskip("laplace")
    out = tmp_path / "laplace.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "laplace_report.py"), "--quick",
                           "--rounds", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    recs = json.loads(out.read_text())["records"]
    for net in ("mlp", "cnn"):
        for subset in ("all", "last_layer"):
            lml = {r["backend"]: r["log_marglik"] for r in recs
                   if r["network"] == net and r["subset_of_weights"] == subset}
            assert len(lml) == 4 and all(v == v and abs(v) < float("inf") for v in lml.values())
            if net == "mlp" or subset == "last_layer":  # the same blocks: the same evidence
                assert lml["kronsum kfac"] == pytest.approx(lml["laplace-torch K-FAC"], rel=1e-8)
    out = tmp_path / "training.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "training_report.py"), "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    nets, skipped = report["networks"], report.get("skipped", {})
    assert set(nets) == {"mlp", "cnn"}
    peer = "kfac-pytorch (empirical Fisher)"  # a row where kfac-pytorch is installed, else skipped
    assert set(skipped) <= {peer}
    for runs in nets.values():
        methods = {"SGD", "Adam", "K-FAC", "K-FOC", "EKFAC", "K-FAC (minimal loop)", "K-FAC, empirical Fisher"}
        assert set(runs) == methods | ({peer} - set(skipped))
        # kronsum's runs (and the baselines) learn; the peer's tuned setting may not (it is timed)
        assert all(runs[k]["loss"][-1] < runs[k]["loss"][0] for k in methods)
        assert all(r["cpu_s"][-1] > 0 and r["cpu_ms_per_refresh_step"] > 0 for r in runs.values())


def test_training_report_minimal_loop_is_kronsums_kfac_preconditioner():
    """The training report's timing reference (K-FAC written directly in PyTorch, no checks)
    takes the same steps as Preconditioner(estimator="kfac", capture="hooks"): the same
    sampled labels, estimates and damped solves, on the MLP and on the CNN's convolutions."""
    pytest.importorskip("sklearn")
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from training_report import train
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from kronsum.demo.run import load_data, make_cnn, make_mlp

    X, y = load_data("cpu")
    batches = [torch.arange(i * 64, (i + 1) * 64) for i in range(22)]
    for make in (make_mlp, make_cnn):
        losses = [train(make, X, y, batches, method, lr=0.03, damping=0.1, eval_every=3)["loss"]
                  for method in ("K-FAC", "K-FAC (minimal loop)")]
        np.testing.assert_allclose(losses[1], losses[0], rtol=1e-10)
        assert losses[0][-1] < losses[0][0]


def test_estimator_memory_table(tmp_path):
    """benchmarks/estimator_memory.py (the memory table of docs/which-estimator.md): every layer of
    both demo networks, every estimator, a positive peak and a stored estimate; K-FAC's working
    memory below the rank-2 SVD's, which holds K×K Gram matrices."""
    pytest.importorskip("sklearn")
    pytest.importorskip("torch")
    out = tmp_path / "mem.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "estimator_memory.py"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 7 and {r["network"] for r in rows} == {"mlp", "cnn"}
    for r in rows:
        assert set(r["peak_mib"]) == {"kfac", "tkfac", "kfoc", "ekfac", "ekfac_kfoc", "rank2", "rank3"}
        assert all(v > 0 for v in r["peak_mib"].values()) and all(v > 0 for v in r["stored_mib"].values())
        assert r["peak_mib"]["kfac"] < r["peak_mib"]["rank2"]
    assert "| layer (block, K terms) | inputs MiB |" in proc.stdout
