"""The documentation against the code: docs/api.md cannot drift from the signatures, and the README
(rendered on PyPI, where relative links break) links only absolutely. Pure tests: no root, no sshd."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import colab_remote

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"
REPO = "https://github.com/colab-remote/colab-remote"


def sections(text: str) -> dict[str, str]:
    """``### heading`` -> its body (up to the next ``##``/``###`` heading)."""
    found: dict[str, str] = {}
    heading = None
    for line in text.splitlines():
        if line.startswith(("### ", "## ")):
            heading = line[4:].strip() if line.startswith("### ") else None
            if heading is not None:
                found[heading] = ""
        elif heading is not None:
            found[heading] += line + "\n"
    return found


def _default(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def rendered(name: str, func: object, *, method: bool = False) -> str:
    """``name(a, *, b=1) -> T`` as the docs write it: no annotations, strings in double quotes."""
    sig = inspect.signature(func)  # type: ignore[arg-type]
    parts: list[str] = []
    star = False
    for p in sig.parameters.values():
        if method and p.name == "self":
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        parts.append(p.name if p.default is p.empty else f"{p.name}={_default(p.default)}")
    text = f"{name}({', '.join(parts)})"
    if not method and sig.return_annotation is not sig.empty:
        text += f" -> {sig.return_annotation}"
    return text


def rows(body: str) -> list[tuple[str, str]]:
    """(first cell, whole row) of each table row."""
    found = []
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and not set(cells[0]) <= {"-", ":"}:
            found.append((cells[0], line))
    return found


def public_api() -> list[tuple[str, object]]:
    return [(name, getattr(colab_remote, name)) for name in colab_remote.__all__]


def own_members(cls: type) -> tuple[dict[str, object], list[str]]:
    """Public methods and properties a class defines itself (dataclass fields come as init args)."""
    methods, props = {}, []
    for klass in reversed([k for k in cls.__mro__ if k.__module__.startswith("colab_remote")]):
        for name, value in vars(klass).items():
            if name.startswith("_"):
                continue
            if isinstance(value, property):
                props.append(name)
            elif inspect.isfunction(value):
                methods[name] = value
    return methods, props


API_TEXT = API.read_text()
SECTIONS = sections(API_TEXT)


@pytest.mark.parametrize(("name", "obj"), [p for p in public_api() if not inspect.isclass(p[1])],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_every_function_is_documented_with_its_real_signature(name, obj) -> None:
    heading = f"`{rendered(name, obj)}`"
    (body,) = [b for h, b in SECTIONS.items() if heading in h] or [None]
    assert body is not None, f"docs/api.md has no section headed {heading}"
    documented = " ".join(first for first, _ in rows(body))
    for param in inspect.signature(obj).parameters:
        assert f"`{param}`" in documented, f"{name}: parameter {param} has no row in docs/api.md"


@pytest.mark.parametrize(("name", "obj"), [p for p in public_api() if inspect.isclass(p[1])],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_every_class_its_methods_and_attributes_are_documented(name, obj) -> None:
    (body,) = [b for h, b in SECTIONS.items() if f"`{name}`" in h] or [None]
    assert body is not None, f"docs/api.md has no section with `{name}` in its heading"
    init = [p for p in inspect.signature(obj.__init__).parameters if p not in ("self", "run_dir")]
    for param in init:
        assert re.search(rf"`\.?{param}`", body), f"{name}: {param} is not in its docs/api.md section"
    methods, props = own_members(obj)
    table = rows(body)
    for method, func in methods.items():
        call = f"`.{rendered(method, func, method=True)}`"
        (row,) = [r for first, r in table if call in first] or [None]
        assert row is not None, f"{name}: no row for {call} in docs/api.md"
        meaning = row.split("|", 2)[2]
        for param in list(inspect.signature(func).parameters)[1:]:
            assert f"`{param}`" in meaning, f"{name}.{method}: its row does not say what {param} is"
    for prop in props:
        assert f"`.{prop}`" in body, f"{name}: property .{prop} is not in its docs/api.md section"


def test_the_readme_links_absolutely_and_sends_the_reference_to_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)", readme)
    relative = [link for link in links if not re.match(r"(https?://|#)", link)]
    assert not relative, f"PyPI renders the README: relative links break there: {relative}"
    for doc in ("docs/api.md", "docs/internals.md", "docs/measured.md"):
        assert (ROOT / doc).is_file()
        assert f"{REPO}/blob/main/{doc}" in readme, doc
    assert "| option | meaning |" not in readme  # the parameter tables live in docs/api.md
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'Source = "{REPO}"' in pyproject


def test_each_measured_figure_has_one_home() -> None:
    """Figures are in docs/measured.md only (the idle CPU once said 0.05 % and 0.07 %)."""
    measured = (ROOT / "docs" / "measured.md").read_text()
    assert "0.07 % of a core" in measured
    for other in ("README.md", "docs/api.md", "docs/internals.md"):
        text = (ROOT / other).read_text()
        assert not re.search(r"\d % of a core", text), other
