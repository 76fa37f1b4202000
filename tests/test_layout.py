"""The package's shape (issue 14): no import cycle, one concept per module, one module for processes.

Read from the source with ``ast``: the imports inside functions count too (a lazy import is still a
dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import colab_remote

PACKAGE = Path(colab_remote.__file__).resolve().parent
MAX_LINES = 620
SERVER_HALF = "colab_remote._agent"  # runs on the server, shipped as one zip (see its __init__)


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base in known:
                found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
    found.discard(name)
    return found


def test_no_import_cycle() -> None:
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    # a package's __init__ importing its own modules is how a package is made, not a cycle
    for name in graph:
        graph[name] = {m for m in graph[name] if not (name.startswith(m + ".") and
                                                      mods[m].name == "__init__.py")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_mirror_and_tunnel_do_not_import_each_other() -> None:
    mods = modules()
    known = set(mods)
    tunnel = {"colab_remote.reverse", "colab_remote._supervisor"}
    mirror = {m for m in known if m.startswith("colab_remote._mirror")} | {"colab_remote.mirror"}
    for name in tunnel:
        assert not imports_of(name, mods[name], known) & mirror, name
    for name in mirror:
        assert not imports_of(name, mods[name], known) & tunnel, name


def test_one_concept_per_module() -> None:
    too_long = {name: n for name, path in modules().items()
                if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concept): {too_long}"


def test_only_proc_starts_or_signals_processes() -> None:
    """STYLE.md: one private module starts, signals and waits on processes (the server half runs on
    the server and kills only its own dead sessions; the mirror process's first lines start its
    login before any of the package is imported, as _proc.spawn_pty would: see _mirror/boot.py)."""
    calls = ("subprocess.Popen(", "subprocess.run(", "pexpect.spawn(", "os.kill(", "os.killpg(",
             "os.waitpid(", ".send_signal(", "check_output(")
    for name, path in modules().items():
        if name == "colab_remote._proc" or name.startswith(SERVER_HALF + "."):
            continue
        text = path.read_text()
        if name == "colab_remote._mirror.boot":
            assert [c for c in calls if c in text] == ["pexpect.spawn("] and text.count("spawn(") == 1
            continue
        found = [c for c in calls if c in text and not (c == ".send_signal(" and "_proc.send_signal(" in text
                                                       and text.count(c) == text.count("_proc.send_signal("))]
        assert not found, f"{name} starts or signals a process itself: {found}"


def test_the_server_half_stands_alone() -> None:
    """Inside the zip the server runs, the agent's package has another name and nothing else of
    colab_remote is there: its modules import the standard library and each other (relatively)."""
    import sys

    for name, path in modules().items():
        if name != SERVER_HALF and not name.startswith(SERVER_HALF + "."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                outside = [a.name for a in node.names
                           if a.name.split(".")[0] not in sys.stdlib_module_names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                outside = [] if (node.module or "").split(".")[0] in sys.stdlib_module_names \
                    else [node.module or ""]
            else:
                continue
            assert not outside, f"{name} imports {outside}: the server has only the standard library"
