"""Text for activation harvesting: sources, a held-out split, and fixed-length token contexts.

Everything runs offline by default: :func:`builtin_texts` is English that ships with every
CPython, and files or folders are read from disk. Hugging Face datasets are used only when named.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.util
import io
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["builtin_texts", "load_texts", "pack_tokens", "split_texts"]

#: Standard-library modules left out of :func:`builtin_texts`: test suites, GUI toolkits and
#: modules whose import prints, opens windows or a web browser, or touches the terminal.
_SKIP_MODULES = frozenset(
    {"test", "idlelib", "tkinter", "turtle", "turtledemo", "this", "antigravity", "readline"}
)
_TEXT_SUFFIXES = (".txt", ".md")


def _module_docstring(name: str) -> str | None:
    """A module's docstring: parsed from its source when it has one, imported otherwise.

    Parsing the source gives the same string as ``module.__doc__`` without running the module
    (no side effects); built-in and extension modules are imported quietly (output and warnings
    suppressed). Failures give ``None``.
    """
    try:
        spec = importlib.util.find_spec(name)
    except Exception:
        return None
    if spec is None:
        return None
    origin = spec.origin or ""
    if origin.endswith(".py"):
        try:
            tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            return None
        return ast.get_docstring(tree, clean=False)
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        with contextlib.redirect_stderr(sink):
            try:
                module = importlib.import_module(name)
            except BaseException:  # a module may call sys.exit or raise anything on import
                return None
    doc = getattr(module, "__doc__", None)
    return doc if isinstance(doc, str) else None


@functools.lru_cache(maxsize=1)
def _builtin_texts() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        doc = _module_docstring(name)
        if doc and doc.strip():
            texts.append(doc)
    return tuple(t for t in texts if t.strip())


def builtin_texts() -> list[str]:
    """English text that ships with CPython, one document per entry; offline and deterministic.

    The ``pydoc_data.topics`` help topics (sorted by key), then the module docstrings of the
    top-level standard-library modules (``sys.stdlib_module_names``, sorted; private modules,
    test suites, GUI toolkits and modules with import side effects left out). Pure-Python
    modules are read with :mod:`ast` rather than imported. On CPython 3.11 this is 254
    documents, 602,133 characters (79 help topics with 464,970, 175 docstrings with 137,163),
    147,641 tokens with SmolLM2's tokenizer (1,164 contexts of 128 from :func:`pack_tokens`).
    Cached after the first call (about 1 s).

    >>> texts = builtin_texts()
    >>> len(texts) > 200 and sum(map(len, texts)) > 500_000
    True
    """
    return list(_builtin_texts())


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _hf_dataset(
    name: str, text_column: str, split: str, config: str | None, allow_download: bool
) -> list[str]:
    if importlib.util.find_spec("datasets") is None:
        raise ModuleNotFoundError(
            f"{name!r} is not a file or folder, and loading it as a Hugging Face dataset needs the "
            "'datasets' package: pip install datasets"
        )
    if not allow_download:
        # read before `datasets` (and huggingface_hub) are first imported; later imports keep it
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:
        hint = "" if allow_download else " (offline: pass allow_download=True to fetch it)"
        raise ValueError(
            f"{name!r} is neither a file, a folder nor a loadable Hugging Face dataset{hint}: {err}"
        ) from err
    if text_column not in ds.column_names:
        raise ValueError(
            f"dataset {name!r} has no column {text_column!r}; columns: {ds.column_names}"
        )
    return [t for t in ds[text_column] if isinstance(t, str)]


def load_texts(
    source: str | Path | Sequence[str],
    *,
    text_column: str = "text",
    split: str = "train",
    config: str | None = None,
    allow_download: bool = False,
) -> list[str]:
    """Documents from ``source``.

    * ``"builtin"``: :func:`builtin_texts`;
    * a ``.txt`` / ``.md`` file: one document;
    * a folder: every ``.txt`` / ``.md`` file below it (recursively, sorted by path), one
      document each;
    * a sequence of strings: the documents themselves;
    * any other string: a Hugging Face dataset name (``datasets.load_dataset(source, config,
      split=split)``, column ``text_column``); offline (local cache only) unless
      ``allow_download=True``.

    A path that does not exist (a ``Path``, or a string that looks like a path: it ends in
    ``.txt``/``.md`` or starts with ``/``, ``.`` or ``~``) raises ``FileNotFoundError``; no
    non-empty document raises ``ValueError``.

    >>> load_texts(["first document", "second"])
    ['first document', 'second']
    """
    if isinstance(source, (str, Path)):
        texts = _load_named(source, text_column, split, config, allow_download)
    else:
        texts = list(source)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"load_texts takes a sequence of str; found {bad[0]} items")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"no non-empty text found in {_describe(source)}")
    return texts


def _describe(source: Any) -> str:
    return repr(str(source)) if isinstance(source, (str, Path)) else "the given sequence"


def _load_named(
    source: str | Path, text_column: str, split: str, config: str | None, allow_download: bool
) -> list[str]:
    if isinstance(source, str) and source == "builtin":
        return builtin_texts()
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in _TEXT_SUFFIXES:
            raise ValueError(f"{str(path)!r} is not a .txt or .md file")
        return [_read_text(path)]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES
        )
        if not files:
            raise ValueError(f"no .txt or .md files under {str(path)!r}")
        return [_read_text(p) for p in files]
    text = str(source)
    looks_like_path = (
        isinstance(source, Path)
        or text.lower().endswith(_TEXT_SUFFIXES)
        or text.startswith(("/", ".", "~"))
        or "\\" in text
    )
    if looks_like_path:
        raise FileNotFoundError(f"no such file or folder: {text!r}")
    return _hf_dataset(text, text_column, split, config, allow_download)


def split_texts(
    texts: Sequence[str], holdout_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split documents into ``(train, heldout)``, deterministically and by whole document.

    ``round(holdout_fraction * n)`` documents (at least one when the fraction is positive)
    are chosen by a permutation seeded with ``seed`` and held out; both parts keep the input
    order. Evaluation text is thus disjoint from training text at the document level. A single
    document (e.g. one ``.txt`` file) is instead cut in two at the paragraph break (else line
    break, else character) nearest to ``1 - holdout_fraction`` of its length, the tail held out.

    >>> train, held = split_texts([f"doc {i}" for i in range(10)], 0.2)
    >>> len(train), len(held), set(train).isdisjoint(held)
    (8, 2, True)
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    n = len(texts)
    if n == 1 and holdout_fraction > 0:
        return _split_one(texts[0], holdout_fraction)
    n_held = 0 if holdout_fraction == 0 else max(1, round(holdout_fraction * n))
    if n_held >= n:
        raise ValueError(
            f"cannot hold out {n_held} of {n} documents and keep some for training; pass more "
            "documents (e.g. a folder of files) or a smaller holdout_fraction"
        )
    held = np.random.default_rng(seed).permutation(n)[:n_held]
    is_held = np.zeros(n, dtype=bool)
    is_held[held] = True
    train = [t for t, h in zip(texts, is_held, strict=True) if not h]
    heldout = [t for t, h in zip(texts, is_held, strict=True) if h]
    return train, heldout


def _split_one(text: str, holdout_fraction: float) -> tuple[list[str], list[str]]:
    """Cut one document into a training head and a held-out tail at a natural break."""
    target = round(len(text) * (1 - holdout_fraction))
    for sep in ("\n\n", "\n"):
        cuts = [i + len(sep) for i in _find_all(text, sep) if 0 < i + len(sep) < len(text)]
        cuts = [c for c in cuts if text[:c].strip() and text[c:].strip()]
        if cuts:
            cut = min(cuts, key=lambda c: abs(c - target))
            break
    else:
        cut = min(max(target, 1), len(text) - 1)
    head, tail = text[:cut], text[cut:]
    if not head.strip() or not tail.strip():
        raise ValueError("cannot split a single short document; pass more text to hold some out")
    return [head], [tail]


def _find_all(text: str, sep: str) -> list[int]:
    out, i = [], text.find(sep)
    while i >= 0:
        out.append(i)
        i = text.find(sep, i + 1)
    return out


def pack_tokens(
    tokenizer: Any,
    texts: Sequence[str],
    context_size: int = 128,
    *,
    bos: bool = True,
    batch_size: int = 256,
) -> torch.Tensor:
    """Tokenise documents into a ``(n_contexts, context_size)`` ``LongTensor`` of contexts.

    Each document is tokenised without special tokens and followed by
    ``tokenizer.eos_token_id`` (when the tokenizer has one); the resulting stream is cut into
    consecutive contexts. With ``bos=True`` each context starts with ``tokenizer.bos_token_id``
    followed by ``context_size - 1`` stream tokens (no BOS when the tokenizer has none). The
    last partial context is dropped. Documents are tokenised ``batch_size`` at a time (fast
    tokenizers run a batch in parallel).
    """
    if context_size < 2:
        raise ValueError(f"context_size must be >= 2, got {context_size}")
    if isinstance(texts, str):
        raise TypeError("pack_tokens takes a sequence of documents, not a single string")
    bos_id = getattr(tokenizer, "bos_token_id", None) if bos else None
    eos_id = getattr(tokenizer, "eos_token_id", None)
    pieces: list[np.ndarray] = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for doc in ids:
            pieces.append(np.asarray(doc, dtype=np.int64))
            if eos_id is not None:
                pieces.append(np.asarray([eos_id], dtype=np.int64))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    body = context_size - (1 if bos_id is not None else 0)
    n = len(stream) // body
    contexts = stream[: n * body].reshape(n, body)
    if bos_id is not None:
        contexts = np.concatenate([np.full((n, 1), bos_id, dtype=np.int64), contexts], axis=1)
    return torch.from_numpy(np.ascontiguousarray(contexts))
