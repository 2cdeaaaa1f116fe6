from __future__ import annotations

import json
from html.parser import HTMLParser

import matplotlib
import pytest

from conftest import PAIRS, build_model, perturbed
from unlearnlens.report import write_report
from unlearnlens.study import StudyResult, dissect


class _Sources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.src: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        self.src += [v for k, v in attrs if k == "src"]
        self.tables += tag == "table"


@pytest.fixture(scope="module")
def study():
    base = build_model("gpt2", seed=1)
    unlearned = {"a": perturbed(base, 0.1, seed=2), "b/odd name": perturbed(base, 0.25, seed=3)}
    return dissect(
        base,
        unlearned,
        PAIRS,
        unrelated=PAIRS[:2],
        capability=["Tolo eats bread fish"],
        window=3,
        eval_max_new_tokens=2,
        progress=False,
        analyses=[
            "behaviour",
            "patch_mlp",
            "patch_resid",
            "restore_w_out",
            "coefficients",
            "logit_lens",
        ],
    )


def test_report_holds_the_page_its_figures_and_the_results(study, tmp_path):
    backend = matplotlib.get_backend()
    index = write_report(study, tmp_path / "rep")
    assert index == tmp_path / "rep" / "index.html"
    page = index.read_text(encoding="utf-8")
    parser = _Sources()
    parser.feed(page)
    assert len(parser.src) == 4  # KRS curves, residual heatmaps, logit lens, coefficients
    for src in parser.src:
        path = index.parent / src
        assert path.is_file(), src
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "/" not in src and not src.startswith("http")
    assert parser.tables >= 2 + len(study.methods)  # summary, behaviour, top neurons per method
    assert "KRS 0" in page and "1 means the base model" in page
    assert "b/odd name" in page
    assert "<script" not in page
    # standard JSON (no NaN literals) that loads back into an equal study
    text = (index.parent / "results.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert StudyResult.load(index.parent) == study
    assert StudyResult.from_json(index.parent / "results.json") == study
    assert matplotlib.get_backend() == backend  # pyplot's global state is left alone


def test_study_report_method_and_rewrite(study, tmp_path):
    first = study.report(tmp_path)
    second = study.report(tmp_path)  # overwriting a report is fine
    assert first == second
    assert StudyResult.load(tmp_path) == study


def test_report_of_a_study_with_only_one_sweep(tmp_path):
    base = build_model("llama", seed=1)
    result = dissect(
        base,
        perturbed(base, 0.2, seed=5),
        PAIRS,
        analyses=["restore_w_out"],
        window=1,
        progress=False,
    )
    index = result.report(tmp_path)
    parser = _Sources()
    parser.feed(index.read_text())
    assert parser.src == ["krs_by_layer.png"]
    assert StudyResult.load(tmp_path) == result
