"""A run at a glance: the HTML report (read by a parser and rendered by headless Chromium),
the TensorBoard logs, and the arrays behind the example reconstructions and codebook atlas.
One tiny run goes through every command that feeds the report."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import sys
from dataclasses import MISSING, fields, replace
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from mri_vqvae.cli.main import main
from mri_vqvae.data.dataset import list_slices, load_split
from mri_vqvae.plots import code_patch_strip
from mri_vqvae.records.evaluation import (
    EvaluationSummary,
    PowerSpectra,
    ReconstructionTwoSample,
)
from mri_vqvae.records.measures import TwoSampleTest
from mri_vqvae.train.tensorboard import image_rows_grid, scalar_tag
from mri_vqvae.trained import TrainedVQVAE
from tests.helpers import TINY_PRIOR, fit_vqvae, train_args

REPO = Path(__file__).resolve().parents[1]
CPU = ["--device", "cpu"]


@pytest.fixture(scope="module")
def full_run(phantom_root: Path, tmp_path_factory) -> SimpleNamespace:
    """train (with its report and TensorBoard logs), evaluate, train-prior, sample and
    evaluate-samples, all inside one run folder, as the README lays a run out."""
    run = tmp_path_factory.mktemp("report") / "run"
    with pytest.MonkeyPatch.context() as patch:  # never the user's cache
        patch.setenv("MRI_VQVAE_CACHE", str(tmp_path_factory.mktemp("cache")))
        assert main(train_args(phantom_root, run, "--tensorboard", report=True)) == 0
        report = run / "report.html"
        report_after_training = report.read_text()
        # Every later command brings a report it finds up to date (a few seconds each); here
        # only the last one finds it.
        report.rename(run / "put-aside.html")
        vqvae = str(run / "best.pt")
        data = ["--data", str(phantom_root), *CPU]
        evaluation = ["--out", str(run / "evaluation"), *data]
        assert main(["-q", "evaluate", "--checkpoint", vqvae, *evaluation]) == 0
        prior = ["-q", "train-prior", "--vqvae", vqvae, "--out", str(run / "prior"), *data]
        assert main([*prior, "--epochs", "2", "--tensorboard", *TINY_PRIOR]) == 0
        sample = ["-q", "sample", "--vqvae", vqvae, "--prior", str(run / "prior" / "best.pt")]
        assert main([*sample, "--n", "8", "--out", str(run / "samples"), *CPU]) == 0
        assert not report.exists()
        (run / "put-aside.html").rename(report)
        judge = ["-q", "evaluate-samples", "--samples", str(run / "samples"), *data]
        assert main([*judge, "--reference-slices", "32"]) == 0
        assert report.read_text() != report_after_training
    return SimpleNamespace(run=run, data=phantom_root, report_after_training=report_after_training)


class PageParts(HTMLParser):
    """The parts of a page a test reads: images, links, scripts, tables' body rows, text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.images: list[dict] = []
        self.references: list[str] = []
        self.scripts = 0
        self.tables: list[dict] = []  # {"class": ..., "rows": body rows}
        self._open_tables: list[dict] = []
        self._in_body = False
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag in ("script", "link", "iframe", "object", "embed"):
            self.scripts += 1
        for name in ("href", "src"):
            if name in attrs and tag != "img":
                self.references.append(attrs[name])
        if tag == "table":
            table = {"class": attrs.get("class", ""), "rows": 0}
            self.tables.append(table)
            self._open_tables.append(table)
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._open_tables:
            self._open_tables[-1]["rows"] += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._open_tables.pop()
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        self.text.append(data)

    def rows(self, css_class: str) -> list[int]:
        return [t["rows"] for t in self.tables if css_class in t["class"].split()]


def test_training_ends_with_a_validation_evaluation_and_its_report(full_run):
    validation = full_run.run / "validation"
    summary = json.loads((validation / "metrics.json").read_text())
    assert summary["split"] == "val" and summary["n_images"] == 8
    for name in (
        "ssim_scores_val_set.png",
        "examples.npz",
        "codebook.npz",
        "worst_image.png",
        "power_spectrum.png",
    ):
        assert (validation / name).is_file(), name
    # Whether reconstructions pass for the real slices: the frozen two-sample classifier with
    # its null, and the power spectra (one value per ring up to Nyquist, 64x32 slices: 16).
    # 8 validation slices: halves of 4 are too few for the classifier's 5 folds, so the test
    # is left out with its reason (tests/evaluate covers it on a larger split).
    two_sample = summary["two_sample"]
    assert two_sample["protocol"] == "frozen-v3"
    assert "fewer than the classifier's 5 folds" in two_sample["skipped"]
    spectrum = summary["power_spectrum"]
    assert len(spectrum["frequencies"]) == len(spectrum["real"]) == 16
    assert spectrum["largest_gap_db_up_to_half_nyquist"] >= 0
    page = PageParts(full_run.report_after_training)
    text = " ".join(page.text)
    assert "the best checkpoint on the val split" in text
    assert "No prior in this run folder" in text and "No samples in this run folder" in text
    assert page.rows("examples") == [4, 4, 4]
    assert "Do reconstructions pass for real slices?" in text
    assert "was left out: 8 slices" in text
    assert any("power spectra" in image["alt"] for image in page.images)


def test_the_report_holds_every_section_and_needs_nothing_else(full_run):
    run = full_run.run
    page = PageParts((run / "report.html").read_text())

    # Self-contained: every picture is an embedded PNG, nothing is fetched, nothing runs.
    assert page.scripts == 0
    assert all(reference.startswith("#") for reference in page.references), page.references
    assert len(page.images) > 20
    for image in page.images:
        assert image["src"].startswith("data:image/png;base64,"), image["alt"]
        assert base64.b64decode(image["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        assert image["alt"]

    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert page.rows("epochs") == [len(history)] == [2]
    test_metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    # 14 rows, and 4 of the acquisition texture the run fitted after training.
    assert page.rows("metrics") == [18]
    # The test evaluation, not the validation one, once there is one.
    text = " ".join(page.text)
    assert f"{test_metrics['textured_psnr_mean']:.2f}" in text
    assert "the best checkpoint on the test split" in text
    assert f"{test_metrics['ssim_mean']:.4f} / {test_metrics['ssim_min']:.4f}" in text
    assert page.rows("examples") == [4, 4, 4]  # best, worst and random
    counts = np.load(run / "evaluation" / "codebook.npz")["counts"]
    assert page.rows("atlas") == [min(16, int((counts > 0).sum()))]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert page.rows("config") == [sum(len(section) for section in config.values())]
    assert page.rows("prior") == [7]
    assert page.rows("samples") == [8]
    assert "added (fitted to" in text  # the samples carry the acquisition texture
    assert page.rows("sample-metrics")[0] >= 9
    assert "two-sample accuracy, samples vs training reconstructions" in text
    assert "null: two halves of training reconstructions" in text
    assert "KID (autoencoder) / its null level" in text


def test_the_report_command_escapes_names_and_refuses_what_is_not_a_run(
    full_run, tmp_path: Path, capsys
):
    odd = tmp_path / 'run <b>"&'
    shutil.copytree(full_run.run, odd, ignore=shutil.ignore_patterns("*.pt", "tensorboard"))
    out = tmp_path / "page.html"
    assert main(["-q", "report", str(odd), "--out", str(out)]) == 0
    html = out.read_text()
    assert "run <b>" not in html and "run &lt;b&gt;&#34;&amp;" in html
    assert str(out) in capsys.readouterr().out

    assert main(["-q", "report", str(tmp_path / "nothing")]) == 2
    assert "not a training run folder" in capsys.readouterr().err
    # A file the tool did not write: its section says so, and the rest of the page is written.
    (odd / "evaluation" / "metrics.json").write_text("{}")  # not what evaluate writes
    (odd / "prior" / "prior_summary.json").write_bytes(b"\xff\xfe not text")
    assert main(["-q", "report", str(odd)]) == 0
    html = (odd / "report.html").read_text()
    assert "Cannot show the evaluation:" in html and "metrics.json: split: missing" in html
    assert "Cannot show the prior:" in html and "not UTF-8 text" in html
    assert "Cannot show the samples:" not in html and "samples.png" not in capsys.readouterr().err
    assert PageParts(html).rows("sample-metrics")[0] >= 9  # the sections that could be read
    assert main(["-q", "report", str(odd), "--prior", str(tmp_path)]) == 2
    assert "prior_summary.json" in capsys.readouterr().err


# Every image decoded with a size, every table with body rows: what a reader would miss.
PAGE_CHECK = """
return {
  images: Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0]),
  tables: Array.from(document.querySelectorAll('table')).map(
    t => [t.className, t.tBodies.length ? t.tBodies[0].rows.length : 0]),
  fetched: performance.getEntriesByType('resource').map(r => r.name)
};
"""


@pytest.fixture
def artifacts() -> Path:
    """Where a test keeps what a person should look at (CI can publish the folder)."""
    folder = Path(os.environ.get("MRI_VQVAE_TEST_ARTIFACTS", REPO / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium(full_run, tmp_path: Path, artifacts: Path):
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("Debian's chromium and chromium-driver are missing (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root in CI
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",  # this machine has no network to offer it
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        driver.get((full_run.run / "report.html").as_uri())
        page = driver.execute_script(PAGE_CHECK)
        assert len(page["images"]) == len(
            PageParts((full_run.run / "report.html").read_text()).images
        )
        assert [alt for alt, loaded in page["images"] if not loaded] == []
        assert len(page["tables"]) >= 9
        assert [name for name, rows in page["tables"] if rows == 0] == []
        assert [name for name in page["fetched"] if not name.startswith("data:")] == []

        size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {
                    "x": 0,
                    "y": 0,
                    "width": size["width"],
                    "height": size["height"],
                    "scale": 1,
                },
            },
        )
        (artifacts / "report.png").write_bytes(base64.b64decode(shot["data"]))

        # The check sees a picture that does not decode.
        driver.execute_script(
            "const i = document.createElement('img'); i.alt = 'broken';"
            "i.src = 'data:image/png;base64,AAAA'; document.body.appendChild(i);"
        )
        driver.execute_async_script("setTimeout(arguments[0], 200)")
        broken = driver.execute_script(PAGE_CHECK)
        assert [alt for alt, loaded in broken["images"] if not loaded] == ["broken"]
    finally:
        driver.quit()
    assert (artifacts / "report.png").stat().st_size > 50_000


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_logs_the_metrics_and_preview_grids(full_run):
    board = events(full_run.run / "tensorboard")
    history = [
        json.loads(line) for line in (full_run.run / "metrics.jsonl").read_text().splitlines()
    ]
    tags = board.Tags()["scalars"]
    settings = yaml.safe_load((full_run.run / "config.yaml").read_text())["train"]
    previews = settings["num_preview_images"]
    for column in (
        "train_loss",
        "val_ssim",
        "val_psnr",
        "val_codebook_usage",
        "val_perplexity",
        "lr",
    ):
        values = board.Scalars(scalar_tag(column))
        assert [v.step for v in values] == [row["global_step"] for row in history], column
        np.testing.assert_allclose(
            [v.value for v in values], [row[column] for row in history], rtol=1e-6
        )
    assert "train/batch_reconstruction_loss" in tags
    assert len(board.Scalars("train/batch_reconstruction_loss")) == history[-1]["global_step"]
    for split in ("train", "val"):
        grids = board.Images(f"reconstructions/{split}")
        assert [grid.step for grid in grids] == [row["global_step"] for row in history]
        # the preview slices of 64x32 side by side, inputs above reconstructions
        assert (grids[0].height, grids[0].width) == (2 * 64, previews * 32)

    prior_board = events(full_run.run / "prior" / "tensorboard")
    prior_history = [
        json.loads(line)
        for line in (full_run.run / "prior" / "metrics.jsonl").read_text().splitlines()
    ]
    nll = prior_board.Scalars("val/nll_bits")
    np.testing.assert_allclose(
        [v.value for v in nll], [row["val_nll_bits"] for row in prior_history], rtol=1e-6
    )
    assert len(prior_board.Images("samples")) == 1  # sampled after the last epoch


def test_a_resumed_run_drops_what_a_crashed_run_logged_after_its_checkpoint(
    phantom_root: Path, tmp_path: Path
):
    run = tmp_path / "run"
    args = train_args(phantom_root, run, "--tensorboard")
    assert main([*args, "--epochs", "1"]) == 0
    shutil.copy(run / "last.pt", tmp_path / "epoch_1.pt")
    assert main([*args, "--resume"]) == 0
    # As if the run had died after logging epoch 2 and before its checkpoint was written.
    shutil.copy(tmp_path / "epoch_1.pt", run / "last.pt")
    assert main([*args, "--resume"]) == 0
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [value.step for value in events(run / "tensorboard").Scalars("val/loss")]
    assert steps == [row["global_step"] for row in history] and len(steps) == 2


def test_tensorboard_without_its_package_is_refused_before_any_work(
    phantom_root: Path, tmp_path: Path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    assert main(train_args(phantom_root, tmp_path / "run", "--tensorboard")) == 2
    assert "pip install 'mri-vqvae[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_atlas_shows_each_code_where_it_occurs(full_run):
    run = full_run.run
    vqvae = TrainedVQVAE.load(run / "best.pt")
    model = vqvae.model
    test = load_split(list_slices(full_run.data / "keras_slices_test"), vqvae.config.data)
    atlas = dict(np.load(run / "evaluation" / "codebook.npz"))
    with torch.no_grad():
        indices = model.encode_to_indices(test.batch(slice(0, len(test))))  # (N, h, w)
    counts = torch.bincount(indices.flatten(), minlength=model.num_embeddings).numpy()
    np.testing.assert_array_equal(atlas["counts"], counts)
    top = atlas["top_codes"]
    assert list(top) == sorted(top, key=lambda code: -counts[code])[: len(top)]
    assert (counts[top] > 0).all() and len(top) == min(16, (counts > 0).sum())
    cell_h, cell_w = atlas["cell_size"]
    assert (cell_h, cell_w) == (64 // indices.shape[1], 32 // indices.shape[2]) == (4, 4)
    checked = 0
    for row, code in enumerate(top):
        for column, (image, grid_row, grid_column) in enumerate(atlas["patch_sources"][row]):
            patch = atlas["patches"][row, column].astype(np.float32)
            if image < 0:
                assert np.isnan(patch).all()
                continue
            assert indices[image, grid_row, grid_column] == code
            pixels = test.batch([int(image)])[0, 0].numpy()
            top_edge, left_edge = grid_row * cell_h, grid_column * cell_w
            own_cell = patch[cell_h // 2 : cell_h // 2 + cell_h, cell_w // 2 : cell_w // 2 + cell_w]
            expected = pixels[top_edge : top_edge + cell_h, left_edge : left_edge + cell_w]
            np.testing.assert_allclose(own_cell, expected, atol=1e-3)
            checked += 1
    assert checked >= len(top)


def test_the_examples_are_the_best_worst_and_random_reconstructions(full_run):
    evaluation = full_run.run / "evaluation"
    examples = dict(np.load(evaluation / "examples.npz"))
    with open(evaluation / "per_image_metrics.csv", newline="") as handle:
        ssim = {row["file"]: float(row["ssim"]) for row in csv.DictReader(handle)}
    ranked = sorted(ssim, key=ssim.get)
    kinds = list(examples["kind"])
    assert kinds == ["best"] * 4 + ["worst"] * 4 + ["random"] * 4
    assert list(examples["names"][:4]) == ranked[::-1][:4]
    assert list(examples["names"][4:8]) == ranked[:4]
    np.testing.assert_allclose(
        examples["ssim"], [ssim[name] for name in examples["names"]], atol=1e-6
    )
    config = TrainedVQVAE.load(full_run.run / "best.pt").config
    test = load_split(list_slices(full_run.data / "keras_slices_test"), config.data, label="test")
    first = test.names.index(examples["names"][0])
    np.testing.assert_allclose(
        examples["images"][0].astype(np.float32), test.batch([first])[0, 0].numpy(), atol=1e-3
    )


def test_a_code_patch_strip_outlines_the_cell_and_leaves_missing_patches_white():
    patches = np.full((2, 8, 8), np.nan, dtype=np.float16)
    patches[0] = 0.0  # mid grey
    strip = code_patch_strip(patches, (4, 4), gap=2)
    assert strip.shape == (8, 18, 3)
    orange = np.array([1.0, 0.55, 0.0])
    np.testing.assert_allclose(strip[1, 1], orange)  # the outline, just outside the cell
    np.testing.assert_allclose(strip[6, 6], orange)
    np.testing.assert_allclose(strip[2:6, 2:6], 0.5)  # the cell's own pixels, uncovered
    np.testing.assert_allclose(strip[0, 0], [0.5, 0.5, 0.5])  # context around it
    np.testing.assert_allclose(strip[:, 8:], 1.0)  # the gap and the missing patch
    with pytest.raises(ValueError, match="no room"):
        code_patch_strip(patches, (8, 8))


def test_image_rows_grid_stacks_rows_and_fills_short_ones():
    first = torch.full((3, 1, 4, 2), 1.0)
    second = torch.full((2, 1, 4, 2), -1.0)
    grid = image_rows_grid([first, second])
    assert grid.shape == (1, 8, 6)
    torch.testing.assert_close(grid[:, :4], torch.ones(1, 4, 6))
    torch.testing.assert_close(grid[:, 4:], torch.zeros(1, 4, 6))
    assert scalar_tag("val_ssim") == "val/ssim" and scalar_tag("lr") == "run/lr"


def test_a_report_that_cannot_be_written_leaves_the_finished_run_whole(
    phantom_root: Path, tmp_path: Path, monkeypatch, caplog
):
    import errno

    from mri_vqvae import workflows
    from mri_vqvae.config import DataConfig
    from mri_vqvae.data.dataset import load_splits, resolve_split_files
    from mri_vqvae.model import VQVAE
    from tests.helpers import TINY_SIZE, tiny_config

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(workflows, "write_report", disk_full)
    data = load_splits(resolve_split_files(phantom_root), DataConfig(image_size=TINY_SIZE))
    config = tiny_config(epochs=1, report=True)
    model = VQVAE.from_config(config.model)
    cpu = torch.device("cpu")
    result = fit_vqvae(model, data, config, tmp_path)  # fmt: skip
    report = workflows.write_validation_report(
        tmp_path, val_set=data["val"], config=config, device=cpu
    )
    assert report is None
    assert len(result.history) == 1 and result.best_checkpoint.is_file()
    assert "No space left on device" in caplog.text and "mri-vqvae report" in caplog.text
    assert not (tmp_path / "report.html").exists()


def summary_with(figure: TwoSampleTest, null: float, textured: TwoSampleTest | None = None):
    """An evaluation summary around one two-sample ``figure`` (the rest made up)."""
    null_test = replace(figure, accuracy=null, halvings=1, accuracy_range=None)
    two_sample = ReconstructionTwoSample(
        features="random_cnn",
        protocol="frozen-v3",
        reconstructions_vs_real=figure,
        textured_reconstructions_vs_real=textured,
        null_real_halves=null_test,
        trustworthy=True,
    )
    spectra = PowerSpectra(
        frequencies=(0.1, 0.2),
        real=(1.0, 1.0),
        reconstructions=(1.0, 0.5),
        largest_gap_db_up_to_half_nyquist=3.0,
    )
    figures = dict.fromkeys(
        (f.name for f in fields(EvaluationSummary) if f.type == "float" and f.default is MISSING),
        0.5,
    )
    return EvaluationSummary(
        split="test",
        n_images=40,
        images_without_foreground=0,
        codes_used=8,
        best_image="a",
        worst_image="b",
        two_sample=two_sample,
        power_spectrum=spectra,
        **figures,
    )


def test_the_realism_paragraph_gives_the_textured_figure_when_there_is_one():
    from mri_vqvae.report.sections import _realism

    figure = TwoSampleTest(0.969, 0.9, 1.0, images_per_set=32, train_accuracy=1.0)
    assert _realism(summary_with(figure, 0.516))["textured_accuracy"] is None
    textured = replace(figure, accuracy=0.641)
    assert _realism(summary_with(figure, 0.516, textured))["textured_accuracy"] == "0.641"


def test_the_realism_figure_says_how_many_halvings_it_averages_and_their_range():
    from mri_vqvae.report.sections import _realism

    single = TwoSampleTest(0.8, 0.64, 0.91, images_per_set=20, train_accuracy=1.0)
    # An evaluation written before the averaging: one halving, no word of it.
    assert _realism(summary_with(single, 0.6))["realism_accuracy"] == (
        "0.800 (95% interval 0.640-0.910, 20 slices each)"
    )
    averaged = replace(single, accuracy=0.7275, halvings=10, accuracy_range=(0.6, 0.875))
    assert _realism(summary_with(averaged, 0.6))["realism_accuracy"] == (
        "0.728 (the mean of 10 random halvings, which ranged 0.600-0.875; one halving's 95% "
        "interval 0.640-0.910, 20 slices each)"
    )


def test_a_users_own_report_html_in_a_run_is_never_replaced_unasked(full_run, tmp_path: Path):
    from mri_vqvae.files import OutputError
    from mri_vqvae.report.page import refresh_report, write_run_report

    run = tmp_path / "run"
    shutil.copytree(full_run.run, run, ignore=shutil.ignore_patterns(".mri-vqvae.lock"))
    mine = "<html>my notes on this run</html>"
    (run / "report.html").write_text(mine)
    # A command that brings the run's report up to date (sample, evaluate ...) leaves it.
    assert refresh_report(run / "best.pt") is None
    with pytest.raises(OutputError, match="not a report page mri-vqvae wrote"):
        write_run_report(run)
    assert (run / "report.html").read_text() == mine
    write_run_report(run, overwrite=True)  # asked to: replaced
    assert "mri-vqvae" in (run / "report.html").read_text()
