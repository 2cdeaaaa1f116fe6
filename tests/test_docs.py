"""The documentation: the API page is generated from the package and kept up to date, every
public name is documented, and the docs' links point at files that exist."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def make_api() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_api", DOCS / "make_api.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_api"] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def _public_names() -> list[tuple[str, str, object]]:
    """``(module, name, object)`` for every non-module name in the documented ``__all__``s."""
    out = []
    for module_name in (
        "unlearnlens",
        "unlearnlens.toy",
        "unlearnlens.metrics",
        "unlearnlens.trainers",
    ):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if not inspect.ismodule(obj):
                out.append((module_name, name, obj))
    return out


# ------------------------------------------------------------------------------ the page


def test_api_page_is_up_to_date(make_api: ModuleType) -> None:
    committed = (DOCS / "api.md").read_text(encoding="utf-8")
    assert make_api.render() == committed, "docs/api.md is out of date: run python docs/make_api.py"


def test_rendering_is_deterministic(make_api: ModuleType) -> None:
    assert make_api.render() == make_api.render()
    assert not re.search(r" at 0x[0-9a-f]+", make_api.render()), "an object address leaked in"


def test_every_public_name_has_an_entry_on_the_page() -> None:
    page = (DOCS / "api.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^### `([^`]+)`$", page, flags=re.M))
    missing = sorted({f"{m}.{n}" for m, n, _ in _public_names() if n not in headings})
    assert missing == []
    for module, name, _ in _public_names():
        assert f"`{module}.{name}`" in page, f"{module}.{name} is not listed as a public path"


def test_every_public_name_has_a_docstring(make_api: ModuleType) -> None:
    undocumented = []
    for module, entries in make_api.collect().items():
        for entry in entries:
            if not make_api.docstring_of(entry).strip():
                undocumented.append(f"{module}.{entry.name}")
    assert undocumented == []
    # Independently of the generator: classes and functions carry their own __doc__.
    for module, name, obj in _public_names():
        if inspect.isclass(obj) or inspect.isroutine(obj):
            doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
            assert isinstance(doc, str) and doc.strip(), f"{module}.{name} has no docstring"
            assert not doc.startswith(f"{name}("), f"{module}.{name} has only the dataclass stub"


def test_documented_arguments_exist() -> None:
    """Every ``Args:`` entry of a public function or class names one of its parameters."""
    item = re.compile(r"^    (\*{0,2}\w+)(?: \([^)]*\))?:")
    stale = []
    for module, name, obj in _public_names():
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            continue
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()):
            continue  # documented arguments may travel through *args / **kwargs
        doc = inspect.getdoc(obj) or ""
        in_args = False
        for line in doc.splitlines():
            if line.strip() in ("Args:", "Arguments:"):
                in_args = True
            elif line and not line.startswith(" "):
                in_args = False
            elif in_args and (m := item.match(line)) and m.group(1).lstrip("*") not in params:
                stale.append(f"{module}.{name}: {m.group(1)}")
    assert stale == []


def test_each_module_section_lists_its_entries(make_api: ModuleType) -> None:
    page = make_api.render()
    for module, entries in make_api.collect().items():
        section = page.split(f"## `{module}`\n", 1)[1].split("\n## ", 1)[0]
        for entry in entries:
            assert f"### `{entry.name}`" in section


# ------------------------------------------------------------------------------ the generator


def _sample(a: int, /, b, c: float = 1.5, *args: str, d: str = "x", **kw: bool) -> list[int]:
    """Sums things.

    A longer description that is not copied.

    Args:
        a: The first.
        b: The second, whose text
            goes on here.

    Returns:
        A list.

    Raises:
        ValueError: When it must.
    """
    return []


def test_signature_text_matches_python(make_api: ModuleType) -> None:
    assert (
        make_api.signature_text("_sample", _sample)
        == f"_sample{inspect.signature(_sample, eval_str=True)}"
    )


def test_long_signatures_put_one_parameter_per_line(make_api: ModuleType) -> None:
    def f(
        first_long_parameter_name: int,
        second_long_parameter_name: str = "default",
        *,
        third_long_parameter_name: float = 0.5,
    ) -> None: ...

    text = make_api.signature_text("f", f)
    assert text.splitlines() == [
        "f(",
        "    first_long_parameter_name: int,",
        "    second_long_parameter_name: str = 'default',",
        "    *,",
        "    third_long_parameter_name: float = 0.5,",
        ") -> None",
    ]


def test_entry_copies_summary_and_sections(make_api: ModuleType) -> None:
    entry = make_api.Entry("_sample", _sample, "tests", ("tests._sample",))
    text = "\n".join(make_api._render_entry(entry))
    assert "Sums things." in text
    assert "A longer description" not in text
    assert "- `a`: The first." in text
    assert "- `b`: The second, whose text goes on here." in text
    assert "**Returns**\n\nA list." in text
    assert "- `ValueError`: When it must." in text


def test_check_mode_reports_a_stale_page(make_api: ModuleType, tmp_path: Path) -> None:
    page = tmp_path / "api.md"
    page.write_text("stale\n", encoding="utf-8")
    assert make_api.main(["--check", "--out", str(page)]) == 1
    assert make_api.main(["--out", str(page)]) == 0
    assert make_api.main(["--check", "--out", str(page)]) == 0


# ------------------------------------------------------------------------------ links


@pytest.mark.parametrize("page", ["docs/index.md", "README.md"])
def test_relative_links_point_at_files(page: str) -> None:
    path = ROOT / page
    text = path.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, f"{page} links nowhere"
    missing = [t for t in local if not (path.parent / t).exists()]
    assert missing == []
