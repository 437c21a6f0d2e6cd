"""Every research script runs (--smoke: a handful of steps) and writes its page; the recorded pages are whole."""

import os
import re
import runpy

import pytest
from conftest import ROOT

EXPERIMENTS = os.path.join(ROOT, "experiments")
# The research scripts with a results page (custom_model.py is the README's example and writes none).
SCRIPTS = ["attention_trick", "attention_lookup", "tokenizers", "lecture_ladder", "scaling", "reproduce",
           "frameworks", "scaling_out", "data_scale"]


def _run(script, argv, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    ns = runpy.run_path(os.path.join(EXPERIMENTS, f"{script}.py"), run_name=f"smoke_{script}")
    ns["run"](argv)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_smoke_run_writes_its_page(script, shakespeare, tmp_path, monkeypatch):
    out = tmp_path / "results"
    _run(script, ["--smoke", f"--input={shakespeare}", f"--out={out}"], monkeypatch, tmp_path)
    page = (out / f"{script}.md").read_text()
    assert f"Command: `python experiments/{script}.py --smoke --input=" in page and "Mode: smoke" in page
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", page)
    assert images and all((out / img).is_file() for img in images), images


def test_custom_model_example_runs_and_is_the_readme_example(shakespeare, tmp_path, monkeypatch, capsys):
    _run("custom_model", ["--smoke", f"--input={shakespeare}"], monkeypatch, tmp_path)
    printed = capsys.readouterr().out
    assert "'bits_per_char'" in printed and (tmp_path / "out-one-head" / "loss.png").is_file()
    with open(os.path.join(EXPERIMENTS, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(EXPERIMENTS, "custom_model.py")) as f:
        assert f"```python\n{f.read().rstrip()}\n```" in readme


@pytest.mark.parametrize("script", SCRIPTS)
def test_recorded_page_is_a_full_run_indexed_with_its_figures(script):
    path = os.path.join(EXPERIMENTS, "results", f"{script}.md")
    with open(path) as f:
        page = f.read()
    assert re.search(rf"Command: `python experiments/{script}\.py[^`]*`", page) and "Mode: full" in page
    for img in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", page):
        assert os.path.isfile(os.path.join(EXPERIMENTS, "results", img)), img
    with open(os.path.join(EXPERIMENTS, "README.md")) as f:
        assert f"(results/{script}.md)" in f.read()
