"""Small helpers shared by the benchmark scripts in ``benchmarks/`` (standard library only).

Import it from a script in this folder with ``from common import ...`` (the script's own folder
is on ``sys.path`` when it is run as ``python benchmarks/<script>.py``); importing it also puts
the repository on ``sys.path``, so the scripts measure this checkout's packages. Every script
starts with the same preamble, before numpy or torch is imported::

    from common import pin_threads, threads_from_argv

    N_THREADS = pin_threads(threads_from_argv())  # --threads N, default 2
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                   "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def threads_from_argv(argv: list[str] | None = None, default: int = 2) -> int:
    """The ``--threads N`` (or ``--threads=N``) of the command line, else ``default``: read
    before argparse runs, because the thread pools must be sized before numpy / torch start."""
    argv = sys.argv[1:] if argv is None else argv
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return default


def pin_threads(n: int) -> int:
    """Run on ``n`` threads: every BLAS / OpenMP pool (environment variables, read when numpy,
    torch or SPAMS start) and torch's own pool if torch is imported already. Returns ``n``."""
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n


def time_median(fn, repeats: int = 3, warmup: bool = False, budget_s: float | None = None):
    """Call ``fn()`` ``repeats`` times; return ``(median seconds, all times, first result)``.

    With ``warmup`` one extra untimed call is made first (JIT, allocator and thread-pool start-up).
    With ``budget_s`` no further call is started once the timed calls have taken that long (at
    least one call is always timed), so a very slow method cannot stall a whole benchmark.
    """
    if warmup:
        fn()
    times, first = [], None
    for i in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if i == 0:
            first = out
        if budget_s is not None and sum(times) >= budget_s:
            break
    return statistics.median(times), times, first


def cpu_name() -> str:
    """The CPU "model name" from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def device_tag(n_threads: int) -> str:
    """Short file-name-safe device name, e.g. ``intel-xeon-e5-2690-v4-2t`` for 2 threads."""
    name = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|\bProcessor\b|@.*$", " ", cpu_name())
    name = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cpu"
    return f"{name}-{n_threads}t"


def package_versions(*dists: str) -> dict[str, str | None]:
    """Installed versions of the given distributions (``None`` where not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_commit(repo: Path) -> str | None:
    """Short hash of HEAD in ``repo`` (``None`` outside git), with ``+dirty`` if modified."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, check=True,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def tree_digest(folder: Path, pattern: str = "*.py") -> str:
    """Short sha256 of the matching files under ``folder``: which source a result came from."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob(pattern)):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def format_table(headers: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """Render rows of strings as an aligned plain-text table, or as a Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in lines)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_results(out: Path, stem: str, lines: list[str], data) -> None:
    """``out/stem.md`` (the report's lines) and ``out/stem.json`` (``data``), and the report
    printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    write_json(out / f"{stem}.json", data)
    print("\n".join(lines))


def load_image(name: str):
    """A scikit-image sample image (a ``skimage.data`` function name) as a grey float array in
    [0, 255] (colour images through ``rgb2gray``)."""
    from skimage import color, data

    img = getattr(data, name)()
    return color.rgb2gray(img) * 255 if img.ndim == 3 else img


def lm_contexts(tokenizer, seq_len: int, n_calib: int):
    """``(calibration, held_out)`` token contexts of ``seq_len`` for the language-model benchmarks:
    ``n_calib`` contexts drawn with a seeded permutation from the training part of the built-in
    text, and every context of its held-out part (``split_texts(builtin_texts(), seed=0)``:
    disjoint at the document level)."""
    import torch

    from sparsecode.text import builtin_texts, pack_tokens, split_texts

    train, held = split_texts(builtin_texts(), seed=0)
    calib_all = pack_tokens(tokenizer, train, seq_len)
    gen = torch.Generator().manual_seed(0)
    calib = calib_all[torch.randperm(len(calib_all), generator=gen)[:n_calib]]
    return calib, pack_tokens(tokenizer, held, seq_len)
