"""Writes ``docs/api.md``, the API reference, from the package itself.

Run ``python docs/make_api.py`` after changing a public name or a docstring (``--check``
exits with status 1 instead when the page is out of date). Every name in
``unlearnlens.__all__`` and in the ``__all__`` of ``unlearnlens.toy``, ``unlearnlens.metrics``
and ``unlearnlens.trainers`` is documented once, under the module that defines it, with its
signature (:func:`inspect.signature`), the summary of its docstring and the docstring's
Google-style sections (``Args``, ``Returns``, ``Raises``, ...) as written. Classes also list
their fields (with the string written under each field, when the docstring has no
``Attributes`` section) and their public methods and properties. Constants and type aliases
are documented by the string literal that follows their assignment in the source.

The output depends only on the package's code, so regenerating it gives the same text: the
tests check that the committed page is up to date (``tests/test_docs.py``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import importlib
import inspect
import itertools
import re
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DOCUMENTED_MODULES",
    "Entry",
    "attribute_docstring",
    "collect",
    "docstring_of",
    "main",
    "render",
    "signature_text",
]

DOCUMENTED_MODULES = (
    "unlearnlens",
    "unlearnlens.toy",
    "unlearnlens.metrics",
    "unlearnlens.trainers",
)
"""The modules whose ``__all__`` make up the public API."""

API_PATH = Path(__file__).with_name("api.md")
"""Where the page is written."""

SECTIONS = (
    "Args",
    "Arguments",
    "Attributes",
    "Class attributes",
    "Returns",
    "Yields",
    "Raises",
    "Warns",
)
"""The docstring sections copied into the page, in the order they are written."""

_ITEM_SECTIONS = {"Args", "Arguments", "Attributes", "Class attributes", "Raises", "Warns"}
_HEADER = re.compile(r"^([A-Z][A-Za-z ]*):\s*$")
_ITEM = re.compile(r"^(\*{0,2}[\w.\[\], |*]+?)(\s*\([^)]*\))?:\s*(.*)$")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_WIDTH = 88


# ----------------------------------------------------------------------------- collecting


@dataclass(frozen=True)
class Entry:
    """One documented public name.

    Attributes:
        name: The name as exported.
        obj: The object.
        module: The module that defines it (where it is documented).
        public: Every public path it is reachable under (``unlearnlens.unlearn``,
            ``unlearnlens.trainers.unlearn``).
    """

    name: str
    obj: Any
    module: str
    public: tuple[str, ...]


def _is_private(module_name: str) -> bool:
    return any(part.startswith("_") for part in module_name.split("."))


def _source_module(name: str, obj: Any, exporter: str) -> str:
    """The module whose source defines ``obj`` (classes, functions) or assigns ``name``."""
    if inspect.isclass(obj) or inspect.isroutine(obj):
        module = getattr(inspect.unwrap(obj), "__module__", None) or exporter
        return module if module.startswith("unlearnlens") else exporter
    for module_name in sorted(m for m in sys.modules if m.startswith("unlearnlens")):
        module = sys.modules[module_name]
        if getattr(module, name, None) is obj and _assigned_in(module, name):
            return module_name
    return exporter


def _defining_module(name: str, obj: Any, exporter: str) -> str:
    """Where a name is documented: its source module, made public if need be.

    A name defined in a private module (``unlearnlens._architectures``) is documented under
    the most specific public module that exports it.
    """
    module = _source_module(name, obj, exporter)
    if not _is_private(module):
        return module
    exporters = [
        m
        for m in sorted(sys.modules)
        if m.startswith("unlearnlens")
        and not _is_private(m)
        and name in getattr(sys.modules[m], "__all__", ())
        and getattr(sys.modules[m], name, None) is obj
    ]
    return max(exporters, key=lambda m: (m.count("."), m), default=exporter)


def _module_tree(module: types.ModuleType) -> ast.Module | None:
    try:
        return ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
        return None


def _assigned_in(module: types.ModuleType, name: str) -> bool:
    tree = _module_tree(module)
    return tree is not None and any(_assigned_names(node) & {name} for node in tree.body)


def _assigned_names(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    return set()


def _following_strings(body: list[ast.stmt]) -> dict[str, str]:
    """``{name: docstring}`` for every assignment in ``body`` followed by a string literal."""
    out: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        names = _assigned_names(node)
        if (
            names
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            for n in names:
                out[n] = inspect.cleandoc(after.value.value)
    return out


def _assignment_text(module_name: str, name: str) -> str:
    """``NAME = value`` as written in the source when short, else ``NAME: annotation``."""
    module = importlib.import_module(module_name)
    tree = _module_tree(module)
    if tree is not None:
        source = inspect.getsource(module)
        for node in tree.body:
            if name not in _assigned_names(node) or node.value is None:
                continue
            value = ast.get_source_segment(source, node.value) or ""
            annotation = (
                f": {ast.get_source_segment(source, node.annotation)}"
                if isinstance(node, ast.AnnAssign)
                else ""
            )
            text = f"{name}{annotation} = {value}"
            if "\n" not in value and len(text) <= _WIDTH:
                return text
            return f"{name}{annotation}" if annotation else f"{name} = ..."
    return f"{name} = ..."


def attribute_docstring(module_name: str, name: str) -> str:
    """The string literal written under ``name = ...`` at the top level of a module ('' if none)."""
    tree = _module_tree(importlib.import_module(module_name))
    return "" if tree is None else _following_strings(tree.body).get(name, "")


def collect(modules: tuple[str, ...] = DOCUMENTED_MODULES) -> dict[str, list[Entry]]:
    """Every public name of ``modules``, grouped by defining module, both sorted by name.

    Submodules listed in an ``__all__`` (``unlearnlens.toy``) are not entries themselves:
    their own ``__all__`` is documented when they are among ``modules``.
    """
    found: dict[object, tuple[str, Any, str, list[str]]] = {}
    for exporter in modules:
        module = importlib.import_module(exporter)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                continue
            key: object = id(obj) if _is_unique(obj) else (exporter, name)
            if key not in found:
                found[key] = (name, obj, _defining_module(name, obj, exporter), [])
            found[key][3].append(f"{exporter}.{name}")
    groups: dict[str, list[Entry]] = {}
    for name, obj, module, public in found.values():
        groups.setdefault(module, []).append(Entry(name, obj, module, tuple(public)))
    return {m: sorted(groups[m], key=lambda e: (e.name.lower(), e.name)) for m in sorted(groups)}


def _is_unique(obj: Any) -> bool:
    """Whether ``obj`` is a distinct object, so that two exports of it are one entry.

    Small numbers and strings may be shared between unrelated names.
    """
    return not isinstance(obj, (str, int, float, bool, type(None)))


# ----------------------------------------------------------------------------- docstrings


def _own_doc(obj: Any) -> str:
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return ""
    doc = inspect.cleandoc(doc)
    if (
        inspect.isclass(obj)
        and dataclasses.is_dataclass(obj)
        and doc.startswith(f"{obj.__name__}(")
    ):
        return ""  # the signature dataclasses write when a class has no docstring
    return doc


def docstring_of(entry: Entry) -> str:
    """The docstring of a public name ('' when there is none).

    Classes and functions have their own ``__doc__``; constants and aliases have the string
    literal that follows their assignment in the source.
    """
    obj = entry.obj
    if inspect.isclass(obj) or inspect.isroutine(obj) or isinstance(obj, property):
        return _own_doc(obj)
    return attribute_docstring(_source_module(entry.name, obj, entry.module), entry.name)


_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|exc|obj|const):`(~?)([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def _markdown(text: str) -> str:
    """ReST inline markup to Markdown: ``:func:`~a.b``` to `` `b` ``, double to single backticks."""
    text = _ROLE.sub(
        lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text
    )
    return _LITERAL.sub(lambda m: f"`{m.group(1)}`", text)


def _split_doc(doc: str) -> tuple[str, dict[str, list[str]]]:
    """The summary (first paragraph) and the Google-style sections, each as its lines."""
    lines = doc.splitlines()
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _HEADER.match(line):
            break
        summary.append(line.strip())
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        header = _HEADER.match(line)
        if header and header.group(1) in SECTIONS:
            current = sections.setdefault(header.group(1), [])
        elif current is not None:
            if line.strip() and not line.startswith((" ", "\t")):
                current = None  # the section ended: unindented text follows
            else:
                current.append(line)
    return _markdown(" ".join(summary)), {
        k: _markdown(textwrap.dedent("\n".join(v)).strip("\n")).splitlines()
        for k, v in sections.items()
    }


def _items(lines: list[str]) -> list[str]:
    """``name: text`` entries of an Args-like section, one bullet each, continuations joined."""
    bullets: list[list[str]] = []
    for line in lines:
        if not line.strip():
            continue
        if not line.startswith((" ", "\t")) or not bullets:
            m = _ITEM.match(line.strip())
            if m:
                kind = f" {m.group(2).strip()}" if m.group(2) else ""
                bullets.append([f"- `{m.group(1)}`{kind}: {m.group(3)}".rstrip()])
                continue
            bullets.append([f"- {line.strip()}"])
        else:
            bullets[-1].append(line.strip())
    return [" ".join(b) for b in bullets]


def _render_sections(sections: dict[str, list[str]]) -> list[str]:
    out: list[str] = []
    for name in SECTIONS:
        if name not in sections or not any(s.strip() for s in sections[name]):
            continue
        out += [f"**{name}**", ""]
        if name in _ITEM_SECTIONS:
            out += _items(sections[name])
        else:
            out += [" ".join(s.strip() for s in sections[name] if s.strip())]
        out.append("")
    return out


# ----------------------------------------------------------------------------- signatures


def _annotation(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    return inspect.formatannotation(annotation)


def _parameter(param: inspect.Parameter) -> str:
    text = param.name
    if param.kind is param.VAR_POSITIONAL:
        text = f"*{text}"
    elif param.kind is param.VAR_KEYWORD:
        text = f"**{text}"
    if param.annotation is not param.empty:
        text += f": {_annotation(param.annotation)}"
    if param.default is not param.empty:
        default = param.default
        shown = (
            default.__name__
            if inspect.isroutine(default) or inspect.isclass(default)
            else repr(default)
        )
        if isinstance(default, enum.Enum):
            shown = f"{type(default).__name__}.{default.name}"
        text += f" = {shown}" if param.annotation is not param.empty else f"={shown}"
    return text


def _parameters(sig: inspect.Signature) -> list[str]:
    parts: list[str] = []
    kinds = [p.kind for p in sig.parameters.values()]
    star_done = False
    for i, param in enumerate(sig.parameters.values()):
        if param.kind is param.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if param.kind is param.VAR_POSITIONAL:
            star_done = True
        parts.append(_parameter(param))
        if param.kind is param.POSITIONAL_ONLY and (
            i + 1 == len(kinds) or kinds[i + 1] is not param.POSITIONAL_ONLY
        ):
            parts.append("/")
    return parts


def signature_text(name: str, obj: Callable[..., Any], *, drop_self: bool = False) -> str:
    """``name(params) -> return``, one parameter per line when it does not fit in 88 columns."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{name}(...)"
    if drop_self and sig.parameters:
        first = next(iter(sig.parameters))
        if first in ("self", "cls"):
            sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    params = _parameters(sig)
    ret = ""
    if sig.return_annotation is not sig.empty and not inspect.isclass(obj):
        ret = f" -> {_annotation(sig.return_annotation)}"
    one_line = f"{name}({', '.join(params)}){ret}"
    if len(one_line) <= _WIDTH:
        text = one_line
    else:
        text = f"{name}(\n" + "".join(f"    {p},\n" for p in params) + f"){ret}"
    return _ADDRESS.sub("", text)


# ----------------------------------------------------------------------------- classes


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field in the class body, for the class and its bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("unlearnlens"):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        node = tree.body[0]
        if isinstance(node, ast.ClassDef):
            out.update(_following_strings(node.body))
    return out


def _fields(cls: type) -> list[str]:
    if not dataclasses.is_dataclass(cls):
        return []
    docs = _field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        kind = f" ({_annotation(f.type)})" if f.type is not None else ""
        doc = _markdown(" ".join(docs.get(f.name, "").split()))
        lines.append(f"- `{f.name}`{kind}: {doc}".rstrip(": ").rstrip())
    return lines


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            yield name, getattr(cls, name)
        elif isinstance(value, property) or inspect.isfunction(value):
            yield name, value


def _render_class(entry: Entry) -> list[str]:
    cls = entry.obj
    out: list[str] = []
    doc = docstring_of(entry)
    _, sections = _split_doc(doc)
    fields = _fields(cls)
    if fields and "Attributes" not in sections and "Class attributes" not in sections:
        out += ["**Fields**", "", *fields, ""]
    members = list(_members(cls))
    if members:
        out += ["**Members**", ""]
        for name, value in members:
            if isinstance(value, property):
                label = f"`{name}` (property)"
                summary = _split_doc(_own_doc(value))[0]
            else:
                label = f"`{signature_text(name, value, drop_self=True)}`"
                label = " ".join(label.split()).replace("( ", "(").replace(", )", ")")
                summary = _split_doc(_own_doc(value))[0]
            out.append(f"- {label}" + (f": {summary}" if summary else ""))
        out.append("")
    return out


# ----------------------------------------------------------------------------- page


def _kind(obj: Any) -> str:
    if inspect.isclass(obj):
        if issubclass(obj, BaseException):
            return "exception"
        return "class"
    if inspect.isroutine(obj):
        return "function"
    return "data"


def _anchor(text: str) -> str:
    """GitHub's heading anchor for ``text``."""
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _module_summary(module_name: str) -> str:
    doc = importlib.import_module(module_name).__doc__ or ""
    return _split_doc(inspect.cleandoc(doc))[0]


def _render_entry(entry: Entry) -> list[str]:
    obj = entry.obj
    kind = _kind(obj)
    out = [f"### `{entry.name}`", ""]
    out += [f"*{kind}* — " + ", ".join(f"`{p}`" for p in entry.public), ""]
    if kind == "exception":
        bases = ", ".join(b.__name__ for b in obj.__bases__)
        out += ["```python", f"class {entry.name}({bases})", "```", ""]
    elif kind in ("class", "function"):
        out += ["```python", signature_text(entry.name, obj), "```", ""]
    else:
        out += [
            "```python",
            _assignment_text(_source_module(entry.name, obj, entry.module), entry.name),
            "```",
            "",
        ]
    doc = docstring_of(entry)
    summary, sections = _split_doc(doc)
    if summary:
        out += [summary, ""]
    out += _render_sections(sections)
    if inspect.isclass(obj) and kind == "class":
        out += _render_class(entry)
    return out


def _anchors(groups: dict[str, list[Entry]]) -> dict[tuple[str, str], str]:
    """GitHub's anchor of every heading, in page order (repeats get ``-1``, ``-2``, ...)."""
    seen: dict[str, int] = {"api-reference": 1, "modules": 1}
    out: dict[tuple[str, str], str] = {}

    def anchor(text: str) -> str:
        base = _anchor(text)
        n = seen.get(base, 0)
        seen[base] = n + 1
        return base if n == 0 else f"{base}-{n}"

    for module, entries in groups.items():
        out[(module, "")] = anchor(module)
        for entry in entries:
            out[(module, entry.name)] = anchor(entry.name)
    return out


def render(modules: tuple[str, ...] = DOCUMENTED_MODULES) -> str:
    """The whole page as Markdown text."""
    groups = collect(modules)
    anchors = _anchors(groups)
    lines = [
        "# API reference",
        "",
        "Generated from the package's docstrings by `docs/make_api.py` (run "
        "`python docs/make_api.py` to refresh it). Import the package as "
        "`import unlearnlens as ul`; each entry lists the public paths it is reachable under.",
        "",
        "## Modules",
        "",
    ]
    for module in groups:
        heading = f"`{module}`"
        summary = _module_summary(module)
        lines.append(
            f"- [{heading}](#{anchors[(module, '')]})" + (f": {summary}" if summary else "")
        )
    lines.append("")
    for module, entries in groups.items():
        lines += [f"## `{module}`", ""]
        summary = _module_summary(module)
        if summary:
            lines += [summary, ""]
        lines += ["| name | kind | summary |", "| --- | --- | --- |"]
        for entry in entries:
            short = _split_doc(docstring_of(entry))[0].replace("|", "\\|")
            link = f"[`{entry.name}`](#{anchors[(module, entry.name)]})"
            lines.append(f"| {link} | {_kind(entry.obj)} | {short} |")
        lines.append("")
        for entry in entries:
            lines += _render_entry(entry)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Writes ``docs/api.md`` (or, with ``--check``, reports whether it is up to date)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if api.md is out of date")
    parser.add_argument("--out", type=Path, default=API_PATH, help="where to write the page")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is out of date: run python docs/make_api.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
