"""The MLflow UI in a real browser: headless Chromium from Debian's packages, driven by Playwright, over a store
made by two tiny trainings that differ in their learning rate, served by ``pipelines.experiments ui``.

From the pages as a researcher sees them: the link ``ui`` prints opens the experiment on its runs (the
model-training workspace, not the GenAI one), with the key metric, the final loss and the varied param as
columns, best run first; a run's charts start with the key curves; the compare page shows both runs' params.
Screenshots and the order of the chart sections are kept in ``$TEST_ARTIFACTS/mlflow_ui/`` (default
``tests/artifacts/``). ``make test`` installs Chromium (apt-get install chromium) when it is absent; without it the
test fails under ``CI=true`` and is skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest

from tests.conftest import (
    REPO_ROOT,
    free_port,
    new_store,
    prerequisite_missing,
    run_bundle,
    server_answers,
    start_experiments_ui,
)
from tests.test_experiments import TINY, TRAIN

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", REPO_ROOT / "tests" / "artifacts")) / "mlflow_ui"
RATES = ("0.001", "0.004")
PAGE_TIMEOUT_MS = 90_000


def require_chromium() -> str:
    if CHROMIUM is None:
        reason = "chromium is absent, so the MLflow UI cannot be checked: `make test` installs it"
        reason += " (apt-get install chromium)"
        prerequisite_missing(reason)
    return CHROMIUM


@pytest.fixture(scope="module")
def served_store(tmp_path_factory, tiny_oct_dir):
    """Two tiny trainings in a fresh store, and ``experiments ui`` serving it: (client, links printed, server)."""
    require_chromium()
    root = tmp_path_factory.mktemp("mlflow_ui")
    uri = new_store(root / "mlruns" / "mlflow.db")
    for rate in RATES:
        # typed first, as by a person comparing learning rates: the run names list the settings in typed order
        overrides = {"learning_rate": rate, **TINY, "train#trainer#max_epochs": 2}
        run_bundle("training", TRAIN, {**overrides, "dataset_dir": tiny_oct_dir, "bundle_root": root / "bundle"},
                   env={"MLFLOW_TRACKING_URI": uri})  # fmt: skip
    port = free_port()
    server = start_experiments_ui(uri, port, stderr=subprocess.DEVNULL)
    links = [server.stdout.readline() for _ in range(2)]
    assert server_answers(f"http://127.0.0.1:{port}", server, 120), "the MLflow UI did not start"
    try:
        yield mlflow.MlflowClient(uri), links, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.fixture(scope="module")
def browser(served_store):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-dev-shm-usage"],  # root, small /dev/shm
        )
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser, url: str, wait_for: str):
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(url)
    page.get_by_text(wait_for, exact=True).first.wait_for(timeout=PAGE_TIMEOUT_MS)
    page.wait_for_timeout(1500)  # the table and charts fill in after their first element
    return page


def shot(page, name: str, full_page: bool = False) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=full_page)
    return path


def training_runs(client):
    experiment = client.get_experiment_by_name("oct_layers")
    runs = client.search_runs([experiment.experiment_id], "tags.workflow = 'train'")
    assert len(runs) == 2
    return experiment, sorted(runs, key=lambda r: r.data.metrics["0_key/val_mean_dice"], reverse=True)


def test_the_experiment_opens_on_its_runs_with_the_key_metric(served_store, browser):
    client, links, server = served_store
    experiment, (best, other) = training_runs(client)
    link = next(line.split(": ", 1)[1].strip() for line in links if line.strip().startswith("oct_layers:"))
    assert link.startswith(f"{server}/#/experiments/{experiment.experiment_id}/runs?")
    page = open_page(browser, link, best.info.run_name)
    shot(page, "experiment.png")
    text = page.inner_text("body")
    assert "Detect Issues" not in text and "Token Usage" not in text, "the GenAI workspace opened"
    for column in ("0_key/val_mean_dice", "0_key/train_loss", "learning_rate", "batch_size", "network_channels"):
        assert column in text, f"column {column} is not shown"
    assert "dataset_dir" not in text, "where the data lies is no column to compare"
    for run in (best, other):  # the names tell the runs apart, before any column is read
        assert f"learning_rate={run.data.params['learning_rate']}" in run.info.run_name, run.info.run_name
        assert run.info.run_name.startswith(f"oct_layers train: learning_rate={run.data.params['learning_rate']}")
        assert run.info.run_name in text
    # best run first: the runs view is sorted by the key metric
    assert text.index(best.info.run_name) < text.index(other.info.run_name)
    for run in (best, other):
        dice = run.data.metrics["0_key/val_mean_dice"]
        assert re.search(re.escape(f"{dice:.6f}"[:6]), text), f"{run.info.run_name}'s key metric {dice} is not shown"
        assert run.data.params["learning_rate"] in text
    page.close()


def test_a_runs_charts_start_with_the_key_curves(served_store, browser):
    client, _, server = served_store
    experiment, (best, _) = training_runs(client)
    base = f"{server}/#/experiments/{experiment.experiment_id}/runs/{best.info.run_id}"
    page = open_page(browser, f"{base}?workflowType=machine_learning", best.info.run_name)
    shot(page, "run.png")
    overview = page.inner_text("body")
    assert "python -m monai.bundle run training --config_file" in overview, "the command as typed"
    assert f"learning_rate={best.data.params['learning_rate']}" in overview, "the description says what differs"
    page.close()

    page = open_page(browser, f"{base}/model-metrics?workflowType=machine_learning", "0_key")
    shot(page, "run_charts.png", full_page=True)
    lines = [line.strip() for line in page.inner_text("body").splitlines() if line.strip()]
    lines = lines[lines.index("Artifacts") + 1 :]  # below the run's tabs (Overview, Model metrics, ...)
    known = {"0_key", "1_validation", "Model metrics"} | {line for line in lines if line.endswith(" by class")}
    sections = [line for line in lines if line in known]
    (ARTIFACTS / "chart_sections.json").write_text(json.dumps(sections, indent=1))
    assert sections[0] == "0_key" and sections[1] == "1_validation", sections
    assert "val_mean_dice by class" in sections
    if "Model metrics" in sections:  # the UI's section of metrics without a prefix: empty, since every one has one
        assert lines[lines.index("Model metrics") + 1] == "(0)", lines[lines.index("Model metrics") :][:8]
    first = lines[lines.index("0_key") : lines.index("1_validation")]
    for chart in ("train_loss", "learning_rate", "val_mean_dice"):
        assert chart in first, f"{chart} is not among the first charts: {first}"
    page.close()


def test_the_compare_page_shows_both_runs(served_store, browser):
    client, _, server = served_store
    experiment, runs = training_runs(client)
    ids = urllib.parse.quote(json.dumps([r.info.run_id for r in runs]))
    experiments = urllib.parse.quote(json.dumps([experiment.experiment_id]))
    url = f"{server}/#/compare-runs?runs={ids}&experiments={experiments}&workflowType=machine_learning"
    page = open_page(browser, url, runs[0].info.run_name)
    shot(page, "compare.png", full_page=True)
    text = page.inner_text("body")
    assert runs[1].info.run_name in text and "learning_rate" in text
    assert all(rate in text for rate in RATES)
    page.close()
