"""Binary probing tasks derived offline from text (for :mod:`sae.evals.sparse_probing`).

Token-level tasks label each token of any text (the built-in text or the user's):

* ``code``: the token starts inside a code example (a line starting with ``>>>`` / ``...`` or
  indented 3+ spaces deeper than the document's prose) rather than prose;
* ``digit``: the token holds a digit; ``capitalised``: it starts with a capital letter;
  ``punctuation``: it is punctuation only.

Document-level tasks label windows of documents of the built-in text:

* ``pydoc_topic``: a window of a ``pydoc`` help topic rather than of a module docstring;
* ``package:<name>``: a module, class or function docstring of standard-library package
  ``<name>`` rather than of another package (one-vs-rest over the packages with at least
  ``min_docs`` docstrings in ``min_files`` files; a document is a source file).

Every task keeps each document whole on one side of the 80/20 train/test split.
"""

from __future__ import annotations

import ast
import re
import string
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["TOKEN_TASKS", "code_mask", "package_docstrings", "token_labels"]

_SKIP_PACKAGES = frozenset({"test", "idlelib", "tkinter", "encodings", "lib2to3", "turtledemo"})
_CODE_START = re.compile(r"\s*(>>>|\.\.\.)( |$)")


def code_mask(doc: str) -> list[bool]:
    """Per character of ``doc``: inside a code line (see the module)."""
    lines = doc.splitlines(keepends=True)
    indents = [len(s) - len(s.lstrip(" ")) for s in lines[1:] if s.strip()]
    base = min(indents) if indents else 0
    out: list[bool] = []
    for i, line in enumerate(lines):
        indent = len(line) - len(line.lstrip(" "))
        code = bool(line.strip()) and (bool(_CODE_START.match(line)) or
                                       (i > 0 and indent >= base + 3))
        out += [code] * len(line)
    return out


def _punct(s: str) -> bool:
    s = s.strip()
    return bool(s) and all(c in string.punctuation for c in s)


#: Token-level tasks: ``name -> label(token text, starts in code)``.
TOKEN_TASKS: dict[str, Callable[[str, bool], bool]] = {
    "code": lambda s, code: code,
    "digit": lambda s, code: any(c.isdigit() for c in s),
    "capitalised": lambda s, code: s.strip()[:1].isupper(),
    "punctuation": lambda s, code: _punct(s),
}


def token_labels(doc: str, offsets: list[tuple[int, int]]) -> dict[str, list[bool]]:
    """Each token task's label for the tokens of ``doc`` at character ``offsets``."""
    code = code_mask(doc)
    out: dict[str, list[bool]] = {name: [] for name in TOKEN_TASKS}
    for start, end in offsets:
        text = doc[start:end]
        in_code = start < len(code) and code[start]
        for name, label in TOKEN_TASKS.items():
            out[name].append(bool(label(text, in_code)))
    return out


def package_docstrings(min_docs: int = 100, min_files: int = 10, min_chars: int = 40
                       ) -> dict[str, list[tuple[str, str]]]:
    """``(file, docstring)`` of every module, class and function docstring (at least
    ``min_chars`` long) in the source files of each standard-library package, for packages with
    at least ``min_docs`` of them from ``min_files`` files; read with :mod:`ast`, nothing
    imported. Test suites, GUI toolkits and codec tables are left out."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    out: dict[str, list[tuple[str, str]]] = {}
    for name in sorted(sys.stdlib_module_names):
        pkg = root / name
        if name.startswith("_") or name in _SKIP_PACKAGES or not pkg.is_dir():
            continue
        docs = []
        for path in sorted(pkg.rglob("*.py")):
            if {"test", "tests"} & set(path.relative_to(pkg).parts):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
                continue
            rel = str(path.relative_to(root))
            docs += [(rel, d) for node in ast.walk(tree) if isinstance(node, kinds)
                     if (d := ast.get_docstring(node, clean=True)) and len(d) >= min_chars]
        if len(docs) >= min_docs and len({f for f, _ in docs}) >= min_files:
            out[name] = docs
    return out
