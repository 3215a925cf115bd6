"""The eval/*.py entry points end to end on a random clipkit-tiny export and small local data sets."""

import csv
import io
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipkit.eval.models import load_model
from tests.eval_helpers import color_image, export_tiny, read_json, write_color_folder, write_fashion_idx

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    export = export_tiny(root / "run")
    colors = write_color_folder(root / "colors", per_class=3, misplaced=0)
    for i, c in enumerate(["red", "green", "blue", "red"]):
        color_image(c, seed=i).save(root / f"{i}.png")
    (root / "caps.csv").write_text("path,caption\n0.png,a red square\n1.png,a green square\n0.png,red again\n"
                                   "2.png,a blue square\n3.png,another red one\n")
    fm = write_fashion_idx(root / "fm", n_train=40, n_test=20)
    return root, export, colors, fm


def run_cli(script, args, monkeypatch, capsys):
    """Runs eval/SCRIPT in-process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [script] + [str(a) for a in args])
    code = 0
    try:
        runpy.run_path(str(REPO / "eval" / script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_zeroshot_script_standalone(setup):
    root, export, colors, _ = setup
    out = root / "res" / "zs.json"
    proc = subprocess.run([sys.executable, "eval/zeroshot.py", "--model", str(export.parent), "--dataset",
                           f"folder:{colors}", "--templates", "simple", "--output", str(out), "--workers", "0",
                           "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "acc1" in proc.stdout and "mean_per_class_recall" in proc.stdout
    res = read_json(out)
    assert {"dataset", "model", "pretrained", "task", "metrics"} <= set(res)
    assert res["task"] == "zeroshot_classification" and res["metrics"]["n"] == 9
    assert 0 <= res["metrics"]["acc1"] <= 1 and "acc5" not in res["metrics"]  # 3 classes
    conf = read_json(root / "res" / "zs.confusion.json")
    assert conf["classnames"] == ["blue", "green", "red"] and sum(map(sum, conf["matrix"])) == 9
    assert (root / "res" / "zs.confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_model_specs_agree(setup, tmp_path, monkeypatch, capsys):
    root, export, colors, _ = setup
    weights = export / "open_clip_model.safetensors"
    torch.save(load_file(str(weights)), tmp_path / "w.pt")
    images = torch.stack([load_model(str(export)).preprocess(color_image(c)) for c in ("red", "blue")])
    feats = []
    for spec, pretrained in ((str(export.parent), None), (str(export), None), (f"local-dir:{export}", None),
                             ("clipkit-tiny", str(weights)), ("clipkit-tiny", str(tmp_path / "w.pt"))):
        m = load_model(spec, pretrained)
        with torch.no_grad():
            feats.append(m.model.encode_image(images))
    for f in feats[1:]:
        assert torch.allclose(f, feats[0], atol=1e-6)
    results = []
    for model_args in (["--model", export.parent], ["--model", "clipkit-tiny", "--pretrained", weights]):
        out = tmp_path / f"{len(results)}.json"
        code, _, err = run_cli("zeroshot.py", model_args + ["--dataset", f"folder:{colors}", "--templates", "simple",
                                                            "--workers", 0, "--output", out], monkeypatch, capsys)
        assert code == 0, err
        results.append(read_json(out)["metrics"])
    assert results[0] == results[1]


def test_retrieval_probe_knn_report(setup, tmp_path, monkeypatch, capsys):
    root, export, _, fm = setup
    common = ["--model", export.parent, "--workers", 0, "--no-progress"]
    code, out, err = run_cli("retrieval.py", common + ["--dataset", f"csv:{root / 'caps.csv'}", "--recall-k", 1, 2,
                                                       "--output", tmp_path / "ret.json"], monkeypatch, capsys)
    assert code == 0, err
    m = read_json(tmp_path / "ret.json")["metrics"]
    assert m["n_images"] == 4 and m["n_texts"] == 5
    assert set(m) >= {"image_retrieval_recall@1", "text_retrieval_recall@2"}
    probe = ["--train-dataset", f"fashion-mnist:{fm}:train", "--test-dataset", f"fashion-mnist:{fm}:test"]
    lp_args = ["--wd", 1e-4, 1e-2, "--max-iter", 50, "--output", tmp_path / "lp.json"]
    code, out, err = run_cli("linear_probe.py", common + probe + lp_args, monkeypatch, capsys)
    assert code == 0, err
    lp = read_json(tmp_path / "lp.json")
    assert lp["task"] == "linear_probe" and lp["metrics"]["wd"] in (1e-4, 1e-2) and lp["metrics"]["n"] == 20
    assert set(lp["val_acc1"]) == {"0.0001", "0.01"}
    code, out, err = run_cli("knn.py", common + probe + ["--k", 5, "--output", tmp_path / "knn.json"], monkeypatch,
                             capsys)
    assert code == 0, err
    assert read_json(tmp_path / "knn.json")["metrics"]["k"] == 5
    code, out, err = run_cli("report.py", [tmp_path, "--csv", tmp_path / "all.csv"], monkeypatch, capsys)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO((tmp_path / "all.csv").read_text())))
    assert sorted(r["task"] for r in rows) == ["knn", "linear_probe", "zeroshot_retrieval"]
    code, out, err = run_cli("report.py", [tmp_path / "knn.json", tmp_path / "lp.json"], monkeypatch, capsys)
    assert code == 0 and out.startswith("| model | pretrained | dataset | task |") and out.count("\n") == 4


def test_bad_input_gets_a_clear_error(setup, tmp_path, monkeypatch, capsys):
    root, export, colors, _ = setup
    base = ["--model", export.parent, "--workers", 0]
    (tmp_path / "t.txt").write_text("a photo of something\n")
    (tmp_path / "names.txt").write_text("one\ntwo\n")
    cases = [
        (["--dataset", "imagenet:/data"], "unknown dataset spec"),
        (["--dataset", f"folder:{colors}", "--templates", tmp_path / "t.txt"], "no {c} placeholder"),
        (["--dataset", f"folder:{colors}", "--classnames", tmp_path / "names.txt"], "do not match"),
        (["--dataset", f"csv:{root / 'caps.csv'}"], "no class labels"),
    ]
    for args, message in cases:
        code, _, err = run_cli("zeroshot.py", base + args, monkeypatch, capsys)
        assert code == 2 and message in err, (args, err)
    code, _, err = run_cli("zeroshot.py", ["--model", tmp_path, "--dataset", f"folder:{colors}"], monkeypatch, capsys)
    assert code == 2 and "final/open_clip_config.json" in err
    code, _, err = run_cli("zeroshot.py", ["--model", "clipkit-tiny", "--dataset", f"folder:{colors}"], monkeypatch,
                           capsys)
    assert code == 2 and "--pretrained" in err
