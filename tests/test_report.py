"""The run report (eval/report_html.py, clipkit.report): what the page holds for a run with known metrics, the
retrieval strip against a model whose answers are known, compare mode, the error paths, and the report a real
training run writes at its end."""

import json
import logging
import math
import re
import runpy
import sys
from pathlib import Path

import pytest

from clipkit.eval.datasets import build_dataset
from clipkit.eval.models import LoadedModel
from clipkit.report import write_report_after_training, write_run_report
from clipkit.report.charts import COLORS
from clipkit.report.strip import build_strip
from tests._report import (
    CLASSNAMES,
    chart_image,
    colour_pixels,
    parse,
    table_dicts,
    write_result,
    write_run,
)
from tests.eval_helpers import ColorModel, ColorTokenizer, export_tiny, to_tensor, write_color_folder

REPO = Path(__file__).resolve().parents[1]
BLUE, RED = tuple(int(COLORS[0][i:i + 2], 16) for i in (1, 3, 5)), tuple(int(COLORS[1][i:i + 2], 16) for i in (1, 3, 5))


def run_cli(args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["report_html.py"] + [str(a) for a in args])
    code = 0
    try:
        runpy.run_path(str(REPO / "eval" / "report_html.py"), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_single_run_page(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "runA")
    result = write_result(tmp_path / "results", "runA", str(run / "final"))
    monkeypatch.chdir(tmp_path)  # the result names its confusion file relative to here, as eval/zeroshot.py does
    code, out, err = run_cli([run, result, "-o", tmp_path / "r.html"], monkeypatch, capsys)
    assert code == 0, err
    assert "wrote" in out
    text = (tmp_path / "r.html").read_text()
    page = parse(text)

    # self-contained: every image is a data URI, nothing is fetched from anywhere
    assert page.images and all(i["src"].startswith("data:image/") for i in page.images)
    assert not re.search(r"""(src|href)=["'](https?:)?//""", text) and "<script" not in text
    # the curves, one chart each (the run has no peak_mem_gb: no memory chart)
    charts = {i["data-chart"] for i in page.images if "data-chart" in i}
    assert {"loss", "lr", "logit_scale", "samples_per_s", "skipped", "zeroshot", "grad_norm", "data_wait",
            "confusion", "recall"} <= charts
    assert "peak_mem_gb" not in charts
    for key in ("loss", "lr", "samples_per_s", "zeroshot"):
        assert colour_pixels(chart_image(page, key), BLUE) > 200, key  # a line was drawn in the run's colour

    overview = table_dicts(page.tables["overview-table"])[0]
    assert overview["steps"] == "40" and overview["global batch"] == "32" and overview["samples seen"] == "1,280"
    tail = [4.0 * math.exp(-s / 20) for s in range(37, 41)]
    assert float(overview["final loss (last 10%)"]) == pytest.approx(sum(tail) / 4, abs=1e-4)
    assert float(overview["min loss"]) == pytest.approx(4.0 * math.exp(-2), abs=1e-4)
    assert overview["skipped samples"] == "3" and overview["train time (s)"] == "20.0000"
    assert float(overview["median samples/s"]) == pytest.approx(120.5)

    metrics = table_dicts(page.tables["metrics-table"])
    by = {(r["task"], r["metric"]): r["runA"] for r in metrics}
    assert by[("zeroshot_classification", "acc1")] == "0.7500"  # the eval JSON
    assert by[("zeroshot during training", "acc1")] == "0.6100"  # summary.json
    assert table_dicts(page.tables["results-table"])[0]["dataset"] == "folder:colors"

    recall = [t for k, t in page.tables.items() if t and t[0] == ["class", "images", "correct", "recall"]]
    assert [(r["class"], r["recall"]) for r in table_dicts(recall[0])] == [
        ("green", "0.5000"), ("blue", "1.0000"), ("red", "1.0000")]
    assert "lr: 0.001" in text and "zero_stage: 2" in text  # the resolved config
    assert "no retrieval strip" in text  # no final/: said so, not an error


def test_logit_scale_and_zeroshot_series(tmp_path):
    from clipkit.report.runs import load_run

    run = load_run(write_run(tmp_path / "r", steps=30))
    steps, acc = run.series("zeroshot/acc1")
    assert steps == [10, 20, 30] and acc == [0.1, 0.2, 0.61]  # during training, then finish()'s final eval
    assert run.series("logit_scale")[1][0] == pytest.approx(math.log(1 / 0.07) + 0.01)
    assert run.last_step == 30


def test_compare_runs(tmp_path, monkeypatch, capsys):
    a = write_run(tmp_path / "a" / "run", lr=1e-3)
    b = write_run(tmp_path / "b" / "run", lr=5e-4, loss0=3.0, extra_config={"batch_size": 32})
    ra = write_result(tmp_path / "res_a", "run", str(a / "final"), acc1=0.7)
    rb = write_result(tmp_path / "res_b", "run", str(b / "final"), acc1=0.8)
    code, _, err = run_cli([a, b, ra, rb, "-o", tmp_path / "cmp.html"], monkeypatch, capsys)
    assert code == 0, err
    page = parse((tmp_path / "cmp.html").read_text())
    # same directory names: labels made unique with the parent
    overview = table_dicts(page.tables["overview-table"])
    assert [r["run"] for r in overview] == ["a/run", "b/run"]
    assert [r["global batch"] for r in overview] == ["32", "64"]
    loss = chart_image(page, "loss")
    assert colour_pixels(loss, BLUE) > 200 and colour_pixels(loss, RED) > 200  # both runs drawn on one chart
    metrics = table_dicts(page.tables["metrics-table"])
    acc = next(r for r in metrics if r["task"] == "zeroshot_classification" and r["metric"] == "acc1")
    assert (acc["a/run"], acc["b/run"]) == ("0.7000", "0.8000")  # each result in its own run's column
    diff = {r["setting"]: r for r in table_dicts(page.tables["config-diff"])}
    assert set(diff) == {"lr", "batch_size"} and diff["lr"]["b/run"] == "0.0005"


def color_model() -> LoadedModel:
    return LoadedModel(ColorModel().eval(), to_tensor, ColorTokenizer(), "color", "none")


def test_strip_finds_the_right_images_and_captions(tmp_path):
    """ColorModel embeds an image as its mean colour and a text as the colour it names, so every answer is known."""
    folder = write_color_folder(tmp_path / "colors", per_class=4, misplaced=0)
    strip = build_strip(color_model(), build_dataset(f"folder:{folder}"), "color", max_images=50, top_k=4)
    assert len(strip.labels) == 12
    assert [q.text for q in strip.text_queries] == [f"a photo of a {c}." for c in CLASSNAMES]
    for q in strip.text_queries:
        wanted = q.text.split()[-1].rstrip(".")
        assert [strip.labels[h.index] for h in q.hits] == [wanted] * 4 and all(h.correct for h in q.hits)
    assert len(strip.image_queries) == 4  # n_queries: one image of each class first
    assert sorted(strip.labels[q.image] for q in strip.image_queries[:3]) == CLASSNAMES
    for q in strip.image_queries:
        top = q.hits[0]
        assert strip.captions[top.index] == f"a photo of a {strip.labels[q.image]}." and top.correct
        assert not any(h.correct for h in q.hits[1:])
    assert strip.zeroshot["acc1"] == 1.0 and strip.zeroshot["matrix"] == [[4, 0, 0], [0, 4, 0], [0, 0, 4]]
    shown = {h.index for q in strip.text_queries for h in q.hits} | {q.image for q in strip.image_queries}
    assert all(bool(strip.thumbs[i]) == (i in shown) for i in range(12))  # only shown images are embedded

    queries = build_strip(color_model(), build_dataset(f"folder:{folder}"), "color", queries=["something red"])
    assert [queries.labels[h.index] for h in queries.text_queries[0].hits][:4] == ["red"] * 4
    assert all(h.correct is None for h in queries.text_queries[0].hits)  # a free query has no known answer


def test_strip_with_captions_ranks_own_captions(tmp_path):
    from tests.eval_helpers import color_image

    for i, c in enumerate(["red", "green", "blue"]):
        color_image(c, seed=i).save(tmp_path / f"{i}.png")
    (tmp_path / "caps.csv").write_text("path,caption\n0.png,a red square\n1.png,a green field\n2.png,the blue sea\n")
    strip = build_strip(color_model(), build_dataset(f"csv:{tmp_path / 'caps.csv'}"), "color")
    assert strip.captions == ["a red square", "a green field", "the blue sea"]
    assert [q.text for q in strip.text_queries] == strip.captions
    assert all(q.hits[0].index == i and q.hits[0].correct for i, q in enumerate(strip.text_queries))
    assert all(strip.captions[q.hits[0].index] == strip.captions[q.image] for q in strip.image_queries)
    assert strip.zeroshot is None  # no labels


def test_strip_in_page_from_a_real_export(tmp_path):
    run = write_run(tmp_path / "run")
    export_tiny(run)
    folder = write_color_folder(tmp_path / "colors", per_class=2, misplaced=0)
    out = write_run_report([run], dataset=f"folder:{folder}")
    assert out == run / "report.html"
    page = parse(out.read_text())
    text = out.read_text()
    assert text.count('class="strip text-query"') == 3 and text.count('class="strip image-query"') == 4
    assert len([i for i in page.images if i["src"].startswith("data:image/jpeg")]) >= 6  # thumbnails
    # no zero-shot result JSON: the confusion matrix comes from the strip's own sample, and says so
    assert "zero-shot on the 6 sampled images" in text and sum(i.get("data-chart") == "confusion"
                                                               for i in page.images) == 1


def test_known_dataset_that_fails_is_a_note(tmp_path):
    run = write_run(tmp_path / "run", extra_config={"zeroshot_data": f"folder:{tmp_path / 'gone'}"})
    export_tiny(run)
    text = write_run_report([run]).read_text()
    assert "retrieval strip skipped: eval set folder:" in text and "no such directory" in text


@pytest.mark.parametrize("case", ["missing_dir", "no_metrics", "empty_metrics", "bad_line", "bad_result",
                                  "not_a_result", "missing_result", "bad_config"])
def test_errors(case, tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run")
    args = [run]
    expect = {
        "missing_dir": "no such run directory", "no_metrics": "metrics.jsonl: missing",
        "empty_metrics": "no metrics (empty file)", "bad_line": "metrics.jsonl:3: malformed JSON",
        "bad_result": "zs.json: malformed JSON (line 1", "not_a_result": "not a result file",
        "missing_result": "no such result file", "bad_config": "config.yaml: malformed YAML",
    }[case]
    if case == "missing_dir":
        args = [tmp_path / "nope"]
    elif case == "no_metrics":
        (run / "metrics.jsonl").unlink()
    elif case == "empty_metrics":
        (run / "metrics.jsonl").write_text("\n")
    elif case == "bad_line":
        lines = (run / "metrics.jsonl").read_text().splitlines()
        lines[2] = lines[2][:-5]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    elif case == "bad_result":
        (tmp_path / "zs.json").write_text('{"dataset": ')
        args.append(tmp_path / "zs.json")
    elif case == "not_a_result":
        (tmp_path / "zs.json").write_text(json.dumps({"acc1": 1}))
        args.append(tmp_path / "zs.json")
    elif case == "missing_result":
        args.append(tmp_path / "zs.json")
    elif case == "bad_config":
        (run / "config.yaml").write_text("model: [unclosed\n")
    code, out, err = run_cli(args + ["-o", tmp_path / "r.html"], monkeypatch, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert not (tmp_path / "r.html").exists()


def test_after_training_never_raises(tmp_path, caplog):
    run = write_run(tmp_path / "run")
    (run / "metrics.jsonl").write_text("{not json\n")
    with caplog.at_level(logging.WARNING, logger="clipkit.report"):
        assert write_report_after_training(run) is None
    assert "could not write the run report" in caplog.text and "malformed JSON" in caplog.text
    good = write_run(tmp_path / "good")
    assert write_report_after_training(good) == good / "report.html"


@pytest.mark.slow
def test_training_run_writes_its_report(tmp_path):
    from clipkit.synthetic import write_train_shards
    from tests._train import run_train

    paths = write_train_shards(tmp_path / "shards", n=2 * 32, per_shard=32, seed=0, size=32)
    spec = f"{tmp_path / 'shards'}/{{00000..{len(paths) - 1:05d}}}.tar"
    folder = write_color_folder(tmp_path / "colors", per_class=2, misplaced=0)
    common = ["--model", "clipkit-tiny", "--train-data", spec, "--batch-size", "8", "--steps", "4", "--warmup", "1",
              "--workers", "1", "--shuffle-buffer", "0"]
    run_train(common + ["--output-dir", str(tmp_path / "run"), "--zeroshot-data", f"folder:{folder}",
                        "--zeroshot-every", "2"], report=True)
    text = (tmp_path / "run" / "report.html").read_text()
    page = parse(text)
    charts = {i.get("data-chart") for i in page.images}
    assert {"loss", "lr", "logit_scale", "samples_per_s", "zeroshot", "confusion", "recall"} <= charts
    assert table_dicts(page.tables["overview-table"])[0]["steps"] == "4"
    assert text.count('class="strip text-query"') == 3  # the run's --zeroshot-data gave the strip
    run_train(common + ["--output-dir", str(tmp_path / "quiet"), "--no-report"])
    assert (tmp_path / "quiet" / "summary.json").exists() and not (tmp_path / "quiet" / "report.html").exists()
