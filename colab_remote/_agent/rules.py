"""What a two-way sync leaves alone, and what the runtime may never write on the laptop.

- :class:`Rules`: the default ignores (``.venv``, ``__pycache__``, ``node_modules``,
  ``.ipynb_checkpoints``, ``*.pyc``), the user's ``exclude`` patterns and the ``.gitignore`` files
  (git's syntax for all of them: ``!`` negation, ``/`` anchoring, ``dir/`` for folders only, ``**``),
  our own names (trash, temporary names, the sync marker) and git's lock files.
- :func:`protected`: paths whose content decides what runs on the laptop without anyone running
  the project (git's config and hooks, editor task and settings folders): the runtime's versions
  of these are never applied on the laptop.
- :func:`git_phase`: git's refs, HEAD and index are written after the objects they name.

Runs on both sides (the runtime's peer gets this file's source over ssh): standard library only,
Python >= 3.6, no import from the package.
"""

import re
from typing import Dict, Iterable, List, Optional, Tuple

DEFAULT_IGNORES = (".venv", "__pycache__", "node_modules", ".ipynb_checkpoints", "*.pyc")
TRASH = ".colab-remote-trash"       # _agent.TRASH: what was replaced or deleted, by time
MARKER = ".colab-remote-sync"       # in the runtime's folder: which sync filled it
TMP_INFIX = ".colab-remote-tmp."    # _agent.TMP_INFIX: the trees' temporary names
CONFLICT_INFIX = ".conflict-runtime-"

# Under a .git folder: written by git after everything they name (objects first).
_GIT_LAST = ("HEAD", "index", "packed-refs", "ORIG_HEAD", "FETCH_HEAD", "MERGE_HEAD",
             "CHERRY_PICK_HEAD", "REVERT_HEAD", "shallow")
_GIT_LAST_FOLDERS = ("refs", "logs")
# Under a .git folder: what git runs or trusts (a hook, core.fsmonitor, core.sshCommand, an
# alternates path): never taken from the runtime.
_GIT_CONFIG = ("config", "config.worktree")
# Editor folders that can name programs the editor runs on opening the project.
_EDITOR_FOLDERS = (".vscode", ".idea", ".devcontainer")


def _glob_regex(pattern: str) -> str:
    """A gitignore glob as a regular expression over '/'-separated paths (``*`` and ``?`` stay
    within one name, ``**`` crosses folders, ``[...]`` is a class, ``\\`` escapes)."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**/", i):
                out.append("(?:.*/)?")
                i += 3
                continue
            if pattern.startswith("**", i) and i + 2 == n:
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "^") else i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:end]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


class Rule:
    """One gitignore line, read relative to the folder ``base`` ('' for the top)."""

    __slots__ = ("base", "negate", "folders_only", "anchored", "match", "text")

    def __init__(self, line: str, base: str = "") -> None:
        self.text, self.base = line, base
        self.negate = line.startswith("!")
        if self.negate:
            line = line[1:]
        self.folders_only = line.endswith("/")
        line = line.rstrip("/")
        self.anchored = "/" in line
        regex = _glob_regex(line.lstrip("/"))
        self.match = re.compile(regex + r"\Z", re.S).match

    def hits(self, rel: str, is_dir: bool) -> bool:
        if self.folders_only and not is_dir:
            return False
        if self.base:
            if not rel.startswith(self.base + "/"):
                return False
            rel = rel[len(self.base) + 1:]
        return bool(self.match(rel if self.anchored else rel.rpartition("/")[2]))


def parse_lines(text: str) -> List[str]:
    """The patterns of a .gitignore file (comments, blank lines and trailing spaces dropped)."""
    found = []
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        if line.endswith("\\ "):
            line = line.rstrip(" ") + " "
        else:
            line = line.rstrip(" ")
        if not line or line.startswith("#"):
            continue
        if line.startswith("\\#") or line.startswith("\\!"):
            line = line[1:] if line.startswith("\\#") else line
        found.append(line)
    return found


def check_pattern(pattern: object) -> str:
    """``pattern`` when it is a usable gitignore-style pattern, else ValueError saying why."""
    if not isinstance(pattern, str):
        raise TypeError("an exclude pattern must be a str such as '*.log' or 'data/', got %r" % (pattern,))
    if not pattern.strip("/!") or "\n" in pattern or "\0" in pattern:
        raise ValueError("exclude pattern %r must be a non-empty glob such as '*.log' or 'data/' "
                         "(gitignore syntax)" % pattern)
    return pattern


class Rules:
    """Which paths a sync skips: the same decisions on the laptop and in the runtime.

    ``patterns`` (the defaults and ``exclude``) and ``gitignores`` (``{folder: [lines]}`` read from
    the laptop's ``.gitignore`` files) are gitignore lines; the last one that matches decides, and a
    folder that is skipped skips everything in it. ``root`` lets watchers hand absolute paths.

    >>> r = Rules(["*.log", "!keep.log", "build/"])
    >>> r.excluded("a/x.log"), r.excluded("keep.log"), r.excluded("build", True), r.excluded(".git/HEAD")
    (True, False, True, False)
    """

    def __init__(self, patterns: Iterable[str] = DEFAULT_IGNORES,
                 gitignores: Optional[Dict[str, List[str]]] = None, root: str = "") -> None:
        self.patterns = list(patterns)
        self.gitignores = dict(gitignores or {})
        self.root = root.rstrip("/")
        rules = [Rule(p) for p in self.patterns]
        for base in sorted(self.gitignores, key=lambda b: (b.count("/") + bool(b), b)):
            rules += [Rule(line, base) for line in self.gitignores[base]]
        self.rules = rules
        self._folders: Dict[str, bool] = {}

    def to_json(self) -> dict:
        return {"patterns": self.patterns, "gitignores": self.gitignores}

    @classmethod
    def from_json(cls, data: dict, root: str = "") -> "Rules":
        return cls(data.get("patterns", DEFAULT_IGNORES), data.get("gitignores") or {}, root)

    def _own(self, rel: str, name: str) -> bool:
        """Names a sync never carries, whatever the rules say."""
        if rel == TRASH or rel.startswith(TRASH + "/") or TMP_INFIX in name:
            return True
        if rel == MARKER or rel.startswith("." + MARKER + "."):  # the marker and its temporary name
            return True
        return name.endswith(".lock") and (rel.startswith(".git/") or "/.git/" in rel)

    def excluded(self, rel: str, is_dir: bool = False) -> bool:
        """True when ``rel`` (relative to the top, '/'-separated) is not synced; ``is_dir``: it is
        a folder (for patterns that end in '/')."""
        folder, _, name = rel.rpartition("/")
        if self._own(rel, name):
            return True
        if folder:
            hit = self._folders.get(folder)
            if hit is None:
                hit = self.excluded(folder, True)
                if len(self._folders) >= 4096:
                    self._folders.clear()
                self._folders[folder] = hit
            if hit:
                return True
        ignored = False
        for rule in self.rules:
            if ignored == rule.negate and rule.hits(rel, is_dir):
                ignored = not rule.negate
        return ignored

    def relative(self, path: str) -> Optional[str]:
        """``path`` relative to ``root``, or None when it is the root or outside it."""
        if not path.startswith(self.root + "/"):
            return None
        return path[len(self.root) + 1:]


def protected(rel: str, extra: Tuple[Rule, ...] = ()) -> bool:
    """True for a path whose runtime version is never applied on the laptop: a ``.git`` entry
    itself (a link or a ``gitdir:`` file points git elsewhere), git's config, hooks and alternates
    in any repository of the tree (submodules too), editor folders that can name programs to run,
    and ``extra`` rules (``protect=``)."""
    parts = rel.split("/")
    if parts[0] in _EDITOR_FOLDERS or parts[-1] == ".git":
        return True
    if ".git" in parts:
        rest = parts[parts.index(".git") + 1:]
        if rest[-1] in _GIT_CONFIG or "hooks" in rest or rest[-3:] == ["objects", "info", "alternates"]:
            return True
    return any(rule.hits(rel, False) for rule in extra)


def git_phase(rel: str) -> int:
    """1 for what git writes last (refs, HEAD, index, packed-refs, logs of a repository in the
    tree): sent in a batch after the one with the objects they name; 0 for everything else."""
    parts = rel.split("/")
    for i, part in enumerate(parts[:-1]):
        if part == ".git":
            rest = parts[i + 1:]
            if len(rest) == 1 and rest[0] in _GIT_LAST or rest[0] in _GIT_LAST_FOLDERS:
                return 1
    return 0


def conflict_name(rel: str, stamp: str, side: str = "runtime") -> str:
    """``dir/name.conflict-runtime-<stamp>.ext``: where the runtime's version of a conflict goes,
    beside the laptop's (``conflict-laptop-``: the laptop's version, beside the runtime's, when
    the sync runs in the runtime)."""
    folder, _, name = rel.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    if not stem or stem.startswith(".") and "." not in stem[1:] and not ext:
        stem, dot, ext = name, "", ""
    new = stem + CONFLICT_INFIX.replace("runtime", side) + stamp + (dot + ext if dot else "")
    return folder + "/" + new if folder else new


def link_inside(rel: str, target: bytes) -> bool:
    """True when a link at ``rel`` pointing at ``target`` stays inside the synced folder (relative,
    never climbing above the top): the only links the laptop takes from the runtime."""
    if not target or target.startswith(b"/") or b"\0" in target:
        return False
    depth = rel.count("/")
    for part in target.split(b"/"):
        if part == b"..":
            depth -= 1
            if depth < 0:
                return False
        elif part not in (b"", b"."):
            depth += 1
    return True
