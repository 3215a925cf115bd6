"""data_prep/filter_shards.py: CLIP scores equal the model's cosine, swapped captions are found at the threshold the
histogram suggests, --top-fraction is exact, every rule on its own, kept samples are the input's bytes, resume after a
kill and reruns are byte-identical, --scores-only / --from-scores, multi-process scoring and Ray writing."""

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipkit.data_prep import ShardConfig, build_shards
from clipkit.data_prep.filter import FilterConfig, FilterError, filter_shards
from clipkit.data_prep.filter.cli import main as filter_main
from clipkit.data_prep.filter.rules import otsu_threshold
from clipkit.data_prep.writer import TarWriter
from clipkit.eval.models import LoadedModel
from tests._train import REPO, env, free_port
from tests.eval_helpers import COLORS, ColorModel, ColorTokenizer, export_tiny, to_tensor

NAMES = sorted(COLORS)
QUIET = open(os.devnull, "w")


def _color_png(name: str, seed: int, size=(24, 24)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(COLORS[name]) + rng.integers(-25, 26, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def swapped(tmp_path_factory):
    """120 colour images in build_shards' layout (3 shards of 40); 30% of the captions name a wrong colour."""
    root = tmp_path_factory.mktemp("swapped")
    rng = np.random.default_rng(0)
    rows, wrong = [], set()
    swap = set(rng.choice(120, 36, replace=False).tolist())
    for i in range(120):
        true = NAMES[i % 3]
        named = NAMES[(i % 3 + 1 + int(rng.integers(0, 2))) % 3] if i in swap else true
        (root / "img").mkdir(exist_ok=True)
        (root / "img" / f"{i:03d}.png").write_bytes(_color_png(true, i))
        rows.append(f"img/{i:03d}.png,a photo of something {named} number {i}")
        if i in swap:
            wrong.add(i)
    (root / "dump.csv").write_text("path,caption\n" + "\n".join(rows) + "\n")
    build_shards(ShardConfig(inputs=[str(root / "dump.csv")], output=str(root / "shards"), path_col="path",
                             caption_col="caption", samples_per_shard=40, image_size=24, format="png", workers=1,
                             progress=False), log=QUIET)
    keys = {}  # key -> input row, from build_shards' parquet
    for shard in sorted((root / "shards").glob("*.parquet")):
        for r in pq.read_table(shard).to_pylist():
            keys[r["key"]] = int(r["caption"].rsplit(" ", 1)[1])
    return {"spec": str(root / "shards" / "{00000..00002}.tar"), "dir": root / "shards", "wrong": wrong, "row": keys}


def color_model() -> LoadedModel:
    return LoadedModel(ColorModel().eval(), to_tensor, ColorTokenizer(), "color", "")


def _run(spec, out, loaded=None, **kw) -> dict:
    cfg = FilterConfig(input=spec, output=str(out), model="color" if loaded and "from_scores" not in kw else None,
                       workers=1, progress=False, **kw)
    return filter_shards(cfg, QUIET, loaded)


def _rows(out) -> list:
    return [r for p in sorted(Path(out).glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def _members(path) -> list:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def _tree_digest(out) -> dict:
    """sha256 of every data file: tars, parquets (shards' and scores'), sizes.json (the stats and manifest jsons hold
    durations and paths)."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(out).rglob("*")) if p.is_file() and (p.suffix in (".tar", ".parquet")
                                                                       or p.name == "sizes.json")}


def test_scores_equal_the_cosine_of_the_models_embeddings(swapped, tmp_path):
    export = export_tiny(tmp_path / "tiny")
    assert filter_main(["--input", swapped["spec"], "--output", str(tmp_path / "out"), "--model", str(export),
                        "--scores-only", "--no-progress", "--batch-size", "40"]) == 0
    scores = {r["key"]: r["clip_score"] for p in sorted((tmp_path / "out" / "scores").glob("*.parquet"))
              for r in pq.read_table(p).to_pylist()}
    from clipkit.eval.models import load_model

    loaded = load_model(str(export))
    model = loaded.model.double()  # the reference: the same weights in float64, one batch
    keys, images, captions = [], [], []
    for shard in sorted(swapped["dir"].glob("*.tar")):
        members = dict(_members(shard))
        for key in sorted({n.split(".")[0] for n in members}):
            keys.append(key)
            images.append(loaded.preprocess(Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGB")))
            captions.append(members[f"{key}.txt"].decode())
    with torch.no_grad():
        a = F.normalize(model.encode_image(torch.stack(images).double()), dim=-1)
        b = F.normalize(model.encode_text(loaded.tokenizer(captions)), dim=-1)
    reference = (a * b).sum(dim=-1).tolist()
    for key, value in zip(keys, reference):
        assert scores[key] == pytest.approx(value, abs=1e-5)
    checked = len(keys)
    assert checked == 120
    assert (tmp_path / "out" / "clip_scores.png").stat().st_size > 5000
    assert not list((tmp_path / "out").glob("*.tar"))  # --scores-only writes no shards


def test_threshold_the_histogram_suggests_removes_the_swapped_pairs(swapped, tmp_path):
    scored = _run(swapped["spec"], tmp_path / "scored", color_model(), scores_only=True)
    threshold = scored["suggested_min_clip_score"]
    manifest = _run(swapped["spec"], tmp_path / "out", from_scores=str(tmp_path / "scored" / "scores"),
                    min_clip_score=threshold)
    rows = _rows(tmp_path / "out")
    dropped = {swapped["row"][r["key"]] for r in rows if not r["kept"]}
    true_drops = dropped & swapped["wrong"]
    precision, recall = len(true_drops) / max(1, len(dropped)), len(true_drops) / len(swapped["wrong"])
    print(f"suggested threshold {threshold:.4f}: precision {precision:.3f}, recall {recall:.3f}")
    assert recall >= 0.9 and precision >= 0.9
    assert manifest["kept"] == 120 - len(dropped) and manifest["drop_reasons"] == {"min_clip_score": len(dropped)}
    assert manifest["suggested_min_clip_score"] == pytest.approx(threshold)


def test_otsu_threshold_splits_two_modes():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0.1, 0.03, 300), rng.normal(0.5, 0.05, 700)])
    t = otsu_threshold(scores.tolist())
    assert 0.2 < t < 0.4
    assert otsu_threshold([0.3, 0.3]) is None


def test_top_fraction_is_exact_over_the_whole_input(swapped, tmp_path):
    manifest = _run(swapped["spec"], tmp_path / "out", color_model(), top_fraction=0.3)
    rows = _rows(tmp_path / "out")
    kept = [r["clip_score"] for r in rows if r["kept"]]
    dropped = [r["clip_score"] for r in rows if not r["kept"]]
    assert len(kept) == 36 == manifest["kept"]  # round(0.3 x 120)
    assert min(kept) >= max(dropped) and min(kept) == manifest["top_fraction_cut"]
    per_shard = [len([r for r in pq.read_table(p).to_pylist() if r["kept"]])
                 for p in sorted((tmp_path / "out").glob("*.parquet"))]
    assert len(set(per_shard)) > 1 or sum(per_shard) == 36  # decided over the input, not per shard


def _rule_shard(path: Path) -> None:
    """One sample per rule, each failing only that rule (captions and sizes), plus two that pass everything."""
    samples = [
        ("ok1", "a photo of something red", (40, 40)),
        ("words", "the seaside", (40, 40)),  # 2 words, 11 chars
        ("chars", "it is a", (40, 40)),  # 3 words, 7 chars (py3langid: English, as every caption but "lang")
        ("lang", "une photo de quelque chose de rouge sur la table", (40, 40)),
        ("side", "a photo of something red", (16, 14)),
        ("aspect", "a photo of something red", (120, 40)),
        ("ok2", "another photo of something green", (48, 40)),
    ]
    writer = TarWriter(str(path))
    for key, caption, size in samples:
        writer.add(f"{key}.png", _color_png("red", 0, size))
        writer.add(f"{key}.txt", caption.encode())
    writer.commit()


@pytest.mark.parametrize("flag, value, dropped", [
    ("min_caption_words", 3, {"words"}),
    ("min_caption_chars", 8, {"chars"}),
    ("caption_language", ["en"], {"lang"}),
    ("min_image_side", 20, {"side"}),
    ("max_aspect_ratio", 2.0, {"aspect"}),
])
def test_each_rule_alone(tmp_path, flag, value, dropped):
    _rule_shard(tmp_path / "rules.tar")
    _run(str(tmp_path / "rules.tar"), tmp_path / "out", **{flag: value})
    rows = _rows(tmp_path / "out")
    assert {r["key"] for r in rows if not r["kept"]} == dropped
    assert {r["drop_reason"] for r in rows if not r["kept"]} == {flag}
    assert [n for n, _ in _members(tmp_path / "out" / "rules.tar")] == [
        f"{r['key']}.{ext}" for r in rows if r["kept"] for ext in ("png", "txt")]


def test_kept_samples_are_the_input_bytes_and_reruns_are_identical(swapped, tmp_path):
    out = tmp_path / "out"
    manifest = _run(swapped["spec"], out, color_model(), top_fraction=0.5, min_caption_words=3)
    rows = _rows(out)
    kept = [r["key"] for r in rows if r["kept"]]
    assert len(kept) == manifest["kept"] == 60
    for shard in sorted(swapped["dir"].glob("*.tar")):
        source = _members(shard)
        keys = {r["key"] for r in pq.read_table(out / (shard.stem + ".parquet")).to_pylist() if r["kept"]}
        assert _members(out / shard.name) == [(n, d) for n, d in source if n.split(".")[0] in keys]
    digest = _tree_digest(out)
    again = _run(swapped["spec"], out, color_model(), top_fraction=0.5, min_caption_words=3)
    assert again["kept"] == 60 and _tree_digest(out) == digest
    fresh = tmp_path / "fresh"
    _run(swapped["spec"], fresh, color_model(), top_fraction=0.5, min_caption_words=3)
    assert _tree_digest(fresh) == digest  # byte-identical in another folder too
    import json

    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == 60 and set(sizes) == {p.name for p in swapped["dir"].glob("*.tar")}


def test_a_killed_run_resumes_inside_a_shard_to_the_same_bytes(swapped, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    _run(swapped["spec"], clean, color_model(), top_fraction=0.7)
    out = tmp_path / "out"
    real_add, calls = TarWriter.add, {"n": 0}

    def dying_add(self, name, data):
        calls["n"] += 1
        if calls["n"] == 50:  # inside the second shard
            raise KeyboardInterrupt
        return real_add(self, name, data)

    monkeypatch.setattr(TarWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        _run(swapped["spec"], out, color_model(), top_fraction=0.7)
    monkeypatch.setattr(TarWriter, "add", real_add)
    assert list(out.glob("*.tar.partial")) and list(out.glob("*.rows.partial"))
    from clipkit.eval import models as eval_models

    monkeypatch.setattr(eval_models, "load_model", lambda *a, **k: pytest.fail("rescored"))
    _run(swapped["spec"], out, color_model(), top_fraction=0.7)
    assert _tree_digest(out) == _tree_digest(clean)
    stats = [p.read_text() for p in sorted(out.glob("*_stats.json"))]
    assert any('"resumed_rows": 0' not in s for s in stats)  # the interrupted shard went on from its journal
    assert not list(out.glob("*.partial"))


def test_from_scores_needs_no_model_and_changed_inputs_are_refused(swapped, tmp_path, monkeypatch):
    _run(swapped["spec"], tmp_path / "scored", color_model(), scores_only=True)
    direct = _run(swapped["spec"], tmp_path / "direct", color_model(), min_clip_score=0.0)
    from clipkit.eval import models as eval_models

    monkeypatch.setattr(eval_models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    reused = _run(swapped["spec"], tmp_path / "reused", from_scores=str(tmp_path / "scored" / "scores"),
                  min_clip_score=0.0)
    assert reused["kept"] == direct["kept"]
    assert _members(tmp_path / "reused" / "00000.tar") == _members(tmp_path / "direct" / "00000.tar")
    other = tmp_path / "other"
    other.mkdir()
    _rule_shard(other / "00000.tar")
    with pytest.raises(FilterError, match="changed since it was scored|no scores"):
        _run(str(other / "00000.tar"), tmp_path / "x", from_scores=str(tmp_path / "scored" / "scores"),
             min_clip_score=0.0)


def test_bad_settings_are_one_error_line(tmp_path, capsys):
    assert filter_main(["--input", "x.tar", "--output", str(tmp_path), "--top-fraction", "0.3"]) == 2
    assert capsys.readouterr().err.startswith("error: --min-clip-score and --top-fraction need --model")
    assert filter_main(["--input", str(tmp_path / "none.tar"), "--output", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(FilterError, match="top-fraction"):
        FilterConfig(input="x", output="y", model="m", top_fraction=1.5).validate()


@pytest.mark.slow
def test_scoring_under_accelerate_launch_and_writing_on_ray_match_one_process(swapped, tmp_path):
    export = export_tiny(tmp_path / "tiny")
    args = ["--input", swapped["spec"], "--model", str(export), "--top-fraction", "0.5", "--no-progress",
            "--batch-size", "8", "--workers", "1"]
    assert filter_main(args + ["--output", str(tmp_path / "one")]) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(REPO / "data_prep" / "filter_shards.py")]
    proc = subprocess.run(launch + args + ["--output", str(tmp_path / "two")], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["key"] for r in one] == [r["key"] for r in two]
    assert np.allclose([r["clip_score"] for r in one], [r["clip_score"] for r in two], atol=1e-6)
    assert _tree_digest(tmp_path / "one").keys() == _tree_digest(tmp_path / "two").keys()
    for shard in sorted((tmp_path / "one").glob("*.tar")):
        assert _members(shard) == _members(tmp_path / "two" / shard.name)
    ray_out = tmp_path / "ray"
    assert filter_main(["--input", swapped["spec"], "--output", str(ray_out), "--from-scores",
                        str(tmp_path / "one" / "scores"), "--top-fraction", "0.5", "--no-progress",
                        "--distributor", "ray", "--workers", "1"]) == 0
    for shard in sorted((tmp_path / "one").glob("*.tar")):
        assert (ray_out / shard.name).read_bytes() == shard.read_bytes()


def test_a_broken_input_tar_is_one_error_line(tmp_path, capsys):
    _rule_shard(tmp_path / "00000.tar")
    data = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[:1500])  # cut inside the second member
    assert filter_main(["--input", str(tmp_path / "00000.tar"), "--output", str(tmp_path / "out"),
                        "--min-caption-words", "2", "--no-progress", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unreadable tar" in err and "00000.tar" in err
