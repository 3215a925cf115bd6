"""Scaling-law sweep: the power-law fit against numpy least squares, the Pareto frontier against a brute-force one,
GMACs against the hand-counted multiply-accumulates of a small ViT CLIP, and sweeps end to end with every launcher
(local, Ray, submitit's local executor standing in for SLURM) giving the same results."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipkit.train.compute import TRAINING_FACTOR, forward_gmacs
from clipkit.train.scaling import Point, bootstrap, fit_power_law, frontier, scaling_fit
from clipkit.train.sweep import SweepConfig, SweepError, load_sweep_config, plan_runs, run_sweep
from tests._train import REPO, env
from tests.eval_helpers import write_fashion_idx

SMALL_CFG = {
    "embed_dim": 48,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _synthetic(alpha=-0.11, beta=5.86, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    compute = np.logspace(2, 8, 25)
    error = beta * compute ** alpha * np.exp(rng.normal(0, noise, compute.shape))
    return [Point(float(c), float(e), f"p{i}") for i, (c, e) in enumerate(zip(compute, error))]


def test_fit_equals_numpy_least_squares_in_log_log():
    exact = fit_power_law(_synthetic())
    assert exact["alpha"] == pytest.approx(-0.11, abs=1e-12) and exact["beta"] == pytest.approx(5.86, rel=1e-10)
    points = _synthetic(noise=0.05, seed=3)
    fit = fit_power_law(points)
    x = np.log([p.compute for p in points])
    y = np.log([p.error for p in points])
    slope, intercept = np.polyfit(x, y, 1)
    assert fit["alpha"] == pytest.approx(slope, abs=1e-10)
    assert fit["beta"] == pytest.approx(math.exp(intercept), rel=1e-10)
    # the least-squares normal equations, written out
    n, sx, sy, sxx, sxy = len(x), x.sum(), y.sum(), (x * x).sum(), (x * y).sum()
    assert fit["alpha"] == pytest.approx((n * sxy - sx * sy) / (n * sxx - sx * sx), abs=1e-10)
    with pytest.raises(ValueError):
        fit_power_law([Point(10.0, 0.5), Point(10.0, 0.4)])


def _pareto_brute_force(points):
    """Runs that no other run beats with less or equal compute."""
    return {p.label for p in points
            if not any(q.compute <= p.compute and q.error < p.error and q is not p for q in points)}


def test_frontier_is_the_pareto_set_when_each_compute_has_its_bin():
    rng = np.random.default_rng(0)
    points = [Point(float(c), float(e), f"r{i}")
              for i, (c, e) in enumerate(zip(rng.choice(np.logspace(1, 5, 12), 30), rng.uniform(0.1, 0.9, 30)))]
    distinct = len({p.compute for p in points})
    front = frontier(points, bins=distinct * 50)  # fine bins: one compute value per bin
    assert {p.label for p in front} == _pareto_brute_force(points)
    assert all(a.compute < b.compute and a.error > b.error for a, b in zip(front, front[1:]))


def test_binned_minimum_keeps_the_best_run_of_each_bin():
    points = [Point(100, 0.8, "a"), Point(120, 0.7, "b"), Point(1000, 0.75, "c"), Point(1100, 0.5, "d"),
              Point(10000, 0.6, "e"), Point(11000, 0.65, "f")]
    assert [p.label for p in frontier(points, bins=3)] == ["b", "d"]  # bin 3's best (0.6) is worse than bin 2's
    assert [p.label for p in frontier(points + [Point(12000, 0.3, "g")], bins=3)] == ["b", "d", "g"]


def test_bootstrap_intervals_hold_the_true_exponent():
    points = _synthetic(noise=0.02, seed=1)
    ci = bootstrap(points, samples=300, bins=25, seed=0)
    assert ci["used"] == 300
    lo, hi = ci["alpha"]
    assert lo < -0.11 < hi and hi - lo < 0.05
    assert bootstrap(points, samples=300, bins=25, seed=0) == ci  # seeded: reproducible
    fit = scaling_fit(points, bins=25, bootstrap_samples=100)
    c_max = max(p.compute for p in points)
    assert fit["extrapolated"]["10x"]["error"] == pytest.approx(fit["beta"] * (10 * c_max) ** fit["alpha"])
    assert "error" in scaling_fit(points[:1])  # one point: no fit, and it says why


def _vit_clip_macs(cfg) -> int:
    """Multiply-accumulates of one forward, counted by hand (open_clip ViT + text transformer, mlp_ratio 4)."""
    v, t, embed = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    tokens, width = patches + 1, v["width"]

    def block(n, w):  # qkv, q @ k^T, attn @ v, out projection, 2-layer MLP of 4w
        return n * w * 3 * w + 2 * n * n * w + n * w * w + 2 * n * w * 4 * w

    vision = patches * v["patch_size"] ** 2 * 3 * width + v["layers"] * block(tokens, width) + width * embed
    text = t["layers"] * block(t["context_length"], t["width"]) + t["width"] * embed
    return vision + text


def test_gmacs_equal_the_hand_counted_macs(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps(SMALL_CFG))
    assert forward_gmacs(str(path)) * 1e9 == pytest.approx(_vit_clip_macs(SMALL_CFG), rel=1e-9)
    assert TRAINING_FACTOR == 3


def _config(tmp_path, **kw) -> SweepConfig:
    data = dict(train_data="shards/{0..1}.tar", eval_data="folder:x", models=["clipkit-tiny"], samples=[100, 300],
                batch_size=64, output_dir=str(tmp_path / "sweep"))
    data.update(kw)
    return SweepConfig(**data).validate()


def test_plan_runs_steps_flags_and_names(tmp_path):
    cfg = _config(tmp_path, lrs=[1e-3, 2e-3], train={"workers": 1, "tensorboard": False, "warmup": 3})
    runs = plan_runs(cfg, {"clipkit-tiny": 0.5})
    assert [r.name for r in runs] == ["clipkit-tiny-s100-lr0.001", "clipkit-tiny-s100-lr0.002",
                                      "clipkit-tiny-s300-lr0.001", "clipkit-tiny-s300-lr0.002"]
    assert [r.steps for r in runs] == [2, 2, 5, 5] and [r.samples_seen for r in runs] == [128, 128, 320, 320]
    cmd = runs[0].command
    for flag, value in (("--model", "clipkit-tiny"), ("--steps", "2"), ("--lr", "0.001"), ("--resume", "auto"),
                        ("--warmup", "3"), ("--workers", "1"), ("--batch-size", "64")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--no-tensorboard" in cmd
    assert runs[0].fingerprint != runs[1].fingerprint
    one_lr = plan_runs(_config(tmp_path, samples=[1000]), {"clipkit-tiny": 0.5})[0]
    assert one_lr.name == "clipkit-tiny-s1000" and "--lr" not in one_lr.command
    assert one_lr.command[one_lr.command.index("--warmup") + 1] == "2"  # 10% of 16 steps


def test_bad_configs_fail_before_any_run(tmp_path):
    with pytest.raises(SweepError, match="set by the sweep"):
        _config(tmp_path, train={"steps": 5})
    with pytest.raises(SweepError, match="launcher"):
        _config(tmp_path, launcher="k8s")
    path = tmp_path / "s.yaml"
    path.write_text("train_data: x\nmodels: [a]\n")
    with pytest.raises(SweepError, match="missing keys"):
        load_sweep_config(str(path))
    path.write_text("train_data: x\neval_data: y\nmodels: a\nsamples: [1e3]\nbatch_size: 8\noutput_dir: o\n"
                    "lrs: 2e-3\nbogus: 1\n")
    with pytest.raises(SweepError, match="unknown keys"):
        load_sweep_config(str(path))
    path.write_text("train_data: x\neval_data: y\nmodels: a\nsamples: [1e3]\nbatch_size: 8\noutput_dir: o\n"
                    "lrs: 2e-3\n")
    cfg = load_sweep_config(str(path))
    assert cfg.models == ["a"] and cfg.samples == [1000] and cfg.lrs == [0.002]  # YAML's 2e-3 is a string
    proc = subprocess.run([sys.executable, str(REPO / "train" / "sweep.py"), "--config", str(tmp_path / "none.yaml")],
                          capture_output=True, text=True, env=env(), cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "No such file" in proc.stderr


# ------------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_data")
    idx = write_fashion_idx(root / "idx", n_train=64, n_test=20)
    subprocess.run([sys.executable, str(REPO / "examples" / "fashion_mnist" / "make_shards.py"), "--root", str(idx),
                    "--out", str(root / "shards"), "--per-shard", "32"], check=True, capture_output=True, env=env())
    model = root / "small.json"
    model.write_text(json.dumps(SMALL_CFG))
    return {"train_data": str(root / "shards" / "shard-{000000..000001}.tar"),
            "eval_data": f"fashion-mnist:{idx}:test", "model": str(model)}


def _sweep(data, out, launcher="local", samples=(16, 32), **kw) -> dict:
    settings = dict(train_data=data["train_data"], eval_data=data["eval_data"], models=[data["model"]],
                    samples=list(samples), batch_size=8, output_dir=str(out), lrs=[1e-3], launcher=launcher,
                    train={"workers": 0, "progress": False, "tensorboard": False, "report": False, "shuffle_buffer": 8,
                           "seed": 0},
                    eval={"max_samples": 20}, device="cpu", bootstrap=50)
    settings.update(kw)
    return run_sweep(SweepConfig(**settings).validate(), log=open("/dev/null", "w"))


def _runs(summary):
    return {r["name"]: (r["acc1"], r["steps"], r["compute"]) for r in summary["runs"]}


@pytest.fixture(scope="module")
def local_sweep(sweep_data, tmp_path_factory):
    """(output dir, summary) of the local sweep: 1 model x 16 and 32 samples seen."""
    out = tmp_path_factory.mktemp("sweep") / "local"
    return out, _sweep(sweep_data, out)


@pytest.mark.slow
def test_sweep_end_to_end_local_resumes_and_skips_finished_runs(sweep_data, local_sweep):
    out, summary = local_sweep
    assert [r["status"] for r in summary["runs"]] == ["ok", "ok"]
    gmacs = 3 * _vit_clip_macs(SMALL_CFG) / 1e9
    for run, seen in zip(summary["runs"], (16, 32)):
        assert run["samples_seen"] == seen and run["compute"] == pytest.approx(gmacs * seen)
        assert 0 <= run["acc1"] <= 1 and run["error"] == pytest.approx(1 - run["acc1"])
        assert (Path(run["output_dir"]) / "final" / "open_clip_config.json").is_file()
    on_disk = json.loads((out / "sweep.json").read_text())
    assert set(on_disk) >= {"runs", "fit", "compute_optimal"} and (out / "scaling.png").stat().st_size > 10_000
    if "alpha" in on_disk["fit"]:
        assert set(on_disk["fit"]) >= {"alpha", "beta", "alpha_interval", "beta_interval", "extrapolated"}
    logs = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/train.log")}
    again = _sweep(sweep_data, out)
    assert all(r.get("skipped") for r in again["runs"]) and _runs(again) == _runs(summary)
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/train.log")} == logs  # nothing retrained
    # a changed setting is a different run: it trains again
    changed = _sweep(sweep_data, out, samples=(16,), eval={"max_samples": 10})
    assert not changed["runs"][0].get("skipped") and changed["runs"][0]["n"] == 10


@pytest.mark.slow
def test_slurm_through_submitit_and_ray_give_the_local_results(sweep_data, local_sweep, tmp_path):
    slurm = _sweep(sweep_data, tmp_path / "slurm", launcher="slurm", samples=(16,),
                   slurm={"cluster": "local", "timeout_min": 10})
    local = {name: run for name, run in _runs(local_sweep[1]).items() if name in _runs(slurm)}  # its 16-sample run
    assert slurm["runs"][0]["status"] == "ok", slurm["runs"]
    assert list((tmp_path / "slurm" / "submitit").glob("*/*_result.pkl"))  # it really went through submitit
    ray = _sweep(sweep_data, tmp_path / "ray", launcher="ray", samples=(16,), ray={"local_cpus": 1})
    assert ray["runs"][0]["status"] == "ok", ray["runs"]
    assert len(local) == 1 and local == _runs(slurm) == _runs(ray)
