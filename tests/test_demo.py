"""``python -m kronsum demo``: the quick run end to end, its JSON, and a light ``import kronsum``."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses, a cluster or a site build: `-m "not slow"` skips them

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("torch", "matplotlib", "sklearn", "tqdm")
METHODS = ("kfac", "tkfac", "kfoc")


def _run(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, **kw)


def test_import_kronsum_does_not_import_the_demo_dependencies():
    code = ("import sys, json, kronsum, kronsum.demo, kronsum.__main__; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = _run(["-c", code], check=True).stdout
    assert json.loads(out) == []


def test_cli_help_and_unknown_command():
    assert _run(["-m", "kronsum", "demo", "--help"]).returncode == 0
    bad = _run(["-m", "kronsum", "frobnicate"])
    assert bad.returncode != 0


def test_missing_dependency_names_the_extra():
    code = ("import sys; sys.modules['matplotlib'] = None; "
            "from kronsum.__main__ import main; sys.exit(main(['demo', '--quick']))")
    res = _run(["-c", code])
    assert res.returncode == 2
    assert 'pip install -e ".[demo]"' in res.stderr and "matplotlib" in res.stderr


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from kronsum.demo import missing_dependencies

    missing = missing_dependencies()
    if missing:
        pytest.skip(f"the demo needs the 'demo' extra; missing: {', '.join(missing)}")
    out = tmp_path_factory.mktemp("demo")
    res = _run(["-m", "kronsum", "demo", "--quick", "--train", "--no-progress", "--out", str(out)],
               timeout=600)
    return res, out


def test_quick_demo_runs_and_writes_its_files(quick_run):
    res, out = quick_run
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("demo-errors.png", "demo-heatmaps.png", "demo-heatmaps-layers.png", "demo-train.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert "K-FOC" in res.stdout and "fc1" in res.stdout and "conv2" in res.stdout


def test_quick_demo_json_records_and_kfoc_is_best(quick_run):
    res, out = quick_run
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    records = data["records"]
    checkpoints = data["meta"]["config"]["checkpoints"]
    expected = {("mlp", layer) for layer in ("fc1", "fc2", "fc3", "fc4")}
    expected |= {("cnn", layer) for layer in ("conv1", "conv2", "fc")}
    seen = {(r["network"], r["layer"], r["step"]) for r in records}
    assert seen == {(net, layer, step) for net, layer in expected for step in checkpoints}
    assert len(records) == len(seen)
    for r in records:
        optional = [k for k in ("rank2", "rank3") if r.get(k) is not None]
        for k in METHODS + tuple(optional):
            assert isinstance(r[k], float) and 0.0 <= r[k] <= 1.0 + 1e-12, (k, r)
            assert isinstance(r["times"][k], float) and r["times"][k] >= 0.0
        assert set(r["times"]) >= set(METHODS)
        assert r["kfoc"] <= r["tkfac"] * (1 + 1e-9), r
        assert r["kfoc"] <= r["kfac"] * (1 + 1e-9), r
        for i, j in (("ekfac", "kfac"), ("ekfac_kfoc", "kfoc")):  # never worse than the basis
            assert isinstance(r[i], float) and r[i] <= r[j] * (1 + 1e-9), r
        for i, j in (("rank2", "kfoc"), ("rank3", "rank2")):
            if r.get(i) is not None and r.get(j) is not None:
                assert r[i] <= r[j] * (1 + 1e-9), r
    assert data["kfoc_best_everywhere"] is True and data["violations"] == []
    train = data["train"]
    assert set(train["runs"]) == {"sgd", "kfac", "tkfac", "kfoc"}
    for run in train["runs"].values():
        assert len(run["steps"]) == len(run["wall_seconds"]) == len(run["train_loss"])
        assert all(map(lambda v: v == v, run["train_loss"]))  # no NaN
        # the median over the seeds within their range; one record per seed
        assert len(run["seeds"]) == len(run["final_losses"]) == train["train_seeds"] >= 2
        assert all(lo <= mid <= hi for lo, mid, hi in
                   zip(run["train_loss_min"], run["train_loss"], run["train_loss_max"]))
        assert min(run["final_losses"]) <= run["final_loss"] <= max(run["final_losses"])
