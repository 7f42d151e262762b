"""Sparse coding speed: ``sparsecode.sparse_encode`` against scikit-learn and SPAMS, side by side.

What it measures
----------------
Codes for 20,000 mean-removed 8x8 patches of ``skimage.data.camera()`` over an overcomplete 2-D
DCT dictionary with 256 unit-norm atoms (``sparsecode.datasets``), on 2 CPU threads, for

1. OMP with 8 non-zero coefficients -- quality: relative reconstruction error
   ``||X - Z D||_F / ||X||_F``;
2. Lasso with ``alpha = 0.05`` -- quality: mean over samples of
   ``0.5 ||x - z D||^2 + alpha ||z||_1``.

Methods: scikit-learn's ``sparse_encode`` (omp; lasso_cd and lasso_lars), SPAMS (``spams.omp`` and
``spams.lasso``, float64 only) and ours (omp; lasso_cd, lasso_lars and fista), each in float64
and float32 where the library supports it. Times are medians over several calls with
``time.perf_counter`` (our solver and SPAMS get one untimed warm-up call first); the quality is
computed in float64 from the first timed call's codes. Input conversions (e.g. to the Fortran
arrays SPAMS wants) are done before timing.

Speed ratios are per-sample times: ``x sklearn`` is the scikit-learn reference algorithm (omp for
OMP, lasso_cd for Lasso) in the same dtype divided by the method's time, ``x SPAMS`` the SPAMS
float64 time divided by the method's time; above 1 means the method is faster. The targets
(OMP >= 20x sklearn with error within 0.5%, Lasso >= 10x sklearn lasso_cd with objective within
1e-3, both relative; aim >= 1x SPAMS) are checked conservatively: against the faster of sklearn's
float64 and float32 runs, and the quality of its float64 run.

How to run
----------
    python benchmarks/bench_encode.py            # full run, a few minutes
    python benchmarks/bench_encode.py --quick    # smoke test: 2,000 patches, 1 repeat

(``pip install -e .[bench]`` provides scikit-image and SPAMS; without SPAMS its rows are skipped.)
The table is printed and also written, with versions and all numbers, to
``benchmarks/results/encode-<cpu>-<threads>t.json`` and ``.md`` (``-quick`` added for --quick).
"""

# ruff: noqa: E402  (thread counts must be set in the environment before numpy is imported)

import os

from common import pin_threads, threads_from_argv

N_THREADS = pin_threads(threads_from_argv())

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

import argparse
import inspect
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from common import (
    cpu_name,
    device_tag,
    format_table,
    git_commit,
    load_image,
    now_iso,
    package_versions,
    time_median,
    tree_digest,
    write_json,
)
from sklearn.decomposition import sparse_encode as sklearn_sparse_encode
from threadpoolctl import threadpool_info, threadpool_limits

import sparsecode
from sparsecode.datasets import image_patches, overcomplete_dct

try:
    import spams
except ImportError:  # optional peer: its rows are skipped
    spams = None

OMP_K = 8
ALPHA = 0.05
N_ATOMS = 256
PATCH_SIZE = 8
TARGETS = {
    "omp_speedup": 20.0,  # ours >= 20x sklearn omp ...
    "omp_error_rel": 5e-3,  # ... with a reconstruction error at most 0.5% above sklearn's
    "lasso_speedup": 10.0,  # ours >= 10x sklearn lasso_cd ...
    "lasso_objective_rel": 1e-3,  # ... with a mean objective at most 1e-3 (relative) above it
    "spams_ratio": 1.0,  # aim: at least as fast as SPAMS
}


# --------------------------------------------------------------------------------------------
# The encoders. Each `make_*` returns `prepare(X, D) -> args` (untimed input conversion) and
# `call(*args) -> raw codes` (the timed library call); `to_dense` turns raw codes into an
# (n_samples, n_atoms) float64 array for the quality measures.
# --------------------------------------------------------------------------------------------


def make_sklearn(algorithm, **params):
    def prepare(X, D):
        return X, D

    def call(X, D):
        return sklearn_sparse_encode(X, D, algorithm=algorithm, **params)

    return prepare, call


def make_spams(task):
    def prepare(X, D):  # SPAMS: float64 Fortran arrays, signals and atoms as columns
        return np.asfortranarray(X.T, dtype=np.float64), np.asfortranarray(D.T, dtype=np.float64)

    def call(Xf, Df):
        if task == "omp":
            return spams.omp(Xf, Df, L=OMP_K, numThreads=N_THREADS)
        return spams.lasso(Xf, D=Df, lambda1=ALPHA, mode=2, numThreads=N_THREADS)

    return prepare, call


def make_ours(algorithm, device=None, **params):
    if device is not None and "device" in inspect.signature(sparsecode.sparse_encode).parameters:
        params["device"] = device  # pin the CPU: the default "auto" would pick a GPU if present

    def prepare(X, D):
        return X, D

    def call(X, D):
        return sparsecode.sparse_encode(X, D, algorithm=algorithm, **params)

    return prepare, call


def to_dense(codes, n_samples):
    """Raw codes of any library -> dense float64 (n_samples, n_atoms)."""
    if hasattr(codes, "toarray"):  # SPAMS: scipy CSC, (n_atoms, n_samples)
        codes = codes.toarray()
        if codes.shape == (N_ATOMS, n_samples) and n_samples != N_ATOMS:
            codes = codes.T
    elif isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes, dtype=np.float64)
    if codes.shape != (n_samples, N_ATOMS):
        raise ValueError(f"codes have shape {codes.shape}, expected {(n_samples, N_ATOMS)}")
    return codes


def per_sample_quality(task, X, D, Z):
    """OMP: squared residual per sample; Lasso: objective per sample (both in float64)."""
    sq_res = ((X - Z @ D) ** 2).sum(axis=1)
    if task == "omp":
        return sq_res
    return 0.5 * sq_res + ALPHA * np.abs(Z).sum(axis=1)


# --------------------------------------------------------------------------------------------
# One benchmark row
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    task: str  # "omp" | "lasso"
    library: str  # "sklearn" | "SPAMS" | "sparsecode"
    algorithm: str
    dtype: str  # input dtype
    n_samples: int
    repeats: int  # asked for; len(times_s) were made (see --budget)
    time_s: float | None = None  # median
    times_s: list = field(default_factory=list)
    quality: float | None = None  # OMP: relative error; Lasso: mean objective
    delta_quality: float | None = None  # OMP: vs sklearn omp; Lasso: vs best objective
    vs_sklearn: float | None = None  # speed ratio (>1: faster than sklearn's reference)
    vs_spams: float | None = None  # speed ratio (>1: faster than SPAMS)
    nnz_per_sample: float | None = None
    out_dtype: str | None = None
    warnings: dict = field(default_factory=dict)  # category -> count, first timed call
    note: str = ""
    error: str | None = None
    per_sample: np.ndarray | None = field(default=None, repr=False)  # not written to JSON

    @property
    def label(self):
        return f"{self.library} {self.algorithm}"


def run_row(row, make, X, D, warmup, budget_s):
    """Time one method on the first `row.n_samples` patches and measure its codes."""
    X_in = X[: row.n_samples].astype(row.dtype)
    D_in = D.astype(row.dtype)
    prepare, call = make
    caught = []

    def timed():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = call(*args)
        counts = {}
        for item in w:
            counts[item.category.__name__] = counts.get(item.category.__name__, 0) + 1
        caught.append(counts)
        return out

    try:
        args = prepare(X_in, D_in)
        row.time_s, row.times_s, raw = time_median(timed, row.repeats, warmup, budget_s)
        row.warnings = caught[1 if warmup else 0]  # warnings of the first timed call
        row.out_dtype = str(getattr(raw, "dtype", type(raw).__name__))
        Z = to_dense(raw, row.n_samples)
    except Exception as exc:  # keep going: one broken method must not lose the others
        row.error = f"{type(exc).__name__}: {exc}"
        print(f"  !! {row.label} {row.dtype} failed: {row.error}", flush=True)
        return row
    row.per_sample = per_sample_quality(row.task, X[: row.n_samples], D, Z)
    row.nnz_per_sample = float((Z != 0).sum(axis=1).mean())
    print(f"  {row.label:<26} {row.dtype:<8} {row.time_s:8.3f} s  (runs: "
          + ", ".join(f"{t:.3f}" for t in row.times_s) + ")", flush=True)
    return row


# --------------------------------------------------------------------------------------------
# Quality measures and speed ratios across rows
# --------------------------------------------------------------------------------------------


def find(rows, task, library, algorithm, dtype):
    for r in rows:
        if (r.task, r.library, r.algorithm, r.dtype) == (task, library, algorithm, dtype):
            if r.error is None:
                return r
    return None


def omp_rel_error(r, X, n):
    """Relative reconstruction error of row r on the first n samples."""
    return float(np.sqrt(r.per_sample[:n].sum() / (X[:n] ** 2).sum()))


def fill_in_comparisons(rows, X):
    ok = [r for r in rows if r.error is None]
    for r in ok:
        n = r.n_samples
        sk_alg = "omp" if r.task == "omp" else "lasso_cd"
        sk = find(rows, r.task, "sklearn", sk_alg, r.dtype) or find(
            rows, r.task, "sklearn", sk_alg, "float64")
        sp = find(rows, r.task, "SPAMS", "omp" if r.task == "omp" else "lasso", "float64")
        # speed ratios on per-sample times (some rows may use a subset)
        if sk is not None:
            r.vs_sklearn = (sk.time_s / sk.n_samples) / (r.time_s / n)
        if sp is not None:
            r.vs_spams = (sp.time_s / sp.n_samples) / (r.time_s / n)
        # quality, on the same samples for every method being compared
        peers = [p for p in ok if p.task == r.task and p.n_samples >= n]
        if r.task == "omp":
            r.quality = omp_rel_error(r, X, n)
            if sk is not None and sk.n_samples >= n:
                r.delta_quality = r.quality / omp_rel_error(sk, X, n) - 1.0
        else:
            r.quality = float(r.per_sample.mean())
            best = min(float(p.per_sample[:n].mean()) for p in peers)
            r.delta_quality = r.quality / best - 1.0


def check_targets(rows, X):
    """One check per (our method, dtype): speed-up and quality against the targets.

    Conservative: the speed-up is against the faster of sklearn's float64 and float32 runs of the
    reference algorithm, the quality against its float64 run.
    """
    checks = []
    for r in rows:
        if r.library != "sparsecode" or r.error is not None:
            continue
        sk_alg = "omp" if r.task == "omp" else "lasso_cd"
        sk_runs = [s for s in (find(rows, r.task, "sklearn", sk_alg, dt)
                               for dt in ("float64", "float32")) if s is not None]
        check = {"task": r.task, "method": r.label, "dtype": r.dtype,
                 "ratio_vs_spams": r.vs_spams}
        if not sk_runs:
            check.update(met=None, text=f"sklearn {sk_alg} missing: cannot check")
            checks.append(check)
            continue
        fastest = min(sk_runs, key=lambda s: s.time_s / s.n_samples)
        sk_q = sk_runs[0]  # float64 when it ran
        speedup = (fastest.time_s / fastest.n_samples) / (r.time_s / r.n_samples)
        n = min(r.n_samples, sk_q.n_samples)
        if r.task == "omp":
            need_speed, tol = TARGETS["omp_speedup"], TARGETS["omp_error_rel"]
            rel = omp_rel_error(r, X, n) / omp_rel_error(sk_q, X, n) - 1.0
            what = "error"
        else:
            need_speed, tol = TARGETS["lasso_speedup"], TARGETS["lasso_objective_rel"]
            rel = float(r.per_sample[:n].mean() / sk_q.per_sample[:n].mean()) - 1.0
            what = "objective"
        met = speedup >= need_speed and rel <= tol
        spams_txt = ("SPAMS n/a" if r.vs_spams is None else
                     f"{r.vs_spams:.2f}x SPAMS ({'aim met' if r.vs_spams >= 1 else 'aim not met'})")
        check.update(
            speedup_vs_sklearn=speedup, speed_reference=f"sklearn {sk_alg} {fastest.dtype}",
            quality_rel_vs_sklearn=rel, quality_reference=f"sklearn {sk_alg} {sk_q.dtype}",
            met=met, text=(
                f"{speedup:6.1f}x sklearn {sk_alg} {fastest.dtype} (need >= {need_speed:g}x), "
                f"{what} {rel:+.2e} rel. to sklearn {sk_q.dtype} (need <= {tol:g}), {spams_txt}"))
        checks.append(check)
    return checks


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

HEADERS = ["task", "method", "dtype", "n", "time [s]", "quality", "d quality",
           "x sklearn", "x SPAMS", "nnz", "notes"]


def table_rows(rows):
    out = []
    for r in rows:
        if r.error is not None:
            out.append([r.task, r.label, r.dtype, str(r.n_samples), "FAILED", "", "", "", "",
                        "", r.error[:80]])
            continue
        if r.delta_quality is None:
            dq = ""
        elif r.task == "omp":
            dq = f"{100 * r.delta_quality:+.3f}%"
        else:
            dq = f"{r.delta_quality:+.2e}"
        notes = [r.note] if r.note else []
        notes += [f"{count} {name}s" for name, count in r.warnings.items()]
        if r.out_dtype and r.library != "SPAMS" and r.out_dtype != r.dtype:
            notes.append(f"returns {r.out_dtype}")
        out.append([
            r.task, r.label, r.dtype, str(r.n_samples), f"{r.time_s:.4g}",
            f"{r.quality:.5f}" if r.task == "omp" else f"{r.quality:.7f}", dq,
            "" if r.vs_sklearn is None else f"{r.vs_sklearn:.2f}x",
            "" if r.vs_spams is None else f"{r.vs_spams:.2f}x",
            f"{r.nnz_per_sample:.2f}", "; ".join(notes),
        ])
    return out


LEGEND = (
    "quality: OMP relative error ||X - ZD||_F/||X||_F, Lasso mean objective (lower is better).\n"
    "d quality: OMP relative difference to sklearn omp's error (same dtype); Lasso relative\n"
    "difference to the best mean objective any method reached on the same samples.\n"
    "x sklearn / x SPAMS: per-sample time of sklearn's reference (omp / lasso_cd, same dtype) or\n"
    "of SPAMS float64, divided by this method's; > 1 means this method is faster. The targets\n"
    "below use the faster of sklearn's float64/float32 runs and the error/objective of float64.\n"
    "nnz: mean number of non-zero coefficients per sample."
)


def target_lines(checks):
    lines = []
    for c in checks:
        status = {True: "MET", False: "NOT MET", None: "n/a"}[c["met"]]
        lines.append(f"[{status:^7}] {c['method']:<24} {c['dtype']:<8} {c['text']}")
    return lines


def write_markdown(path, meta, rows, checks, notes):
    v = meta["versions"]
    text = [
        f"# Sparse coding benchmark: {meta['device']}",
        "",
        f"- date: {meta['date']}; CPU: {meta['cpu']} ({meta['n_cpus']} cores); threads: "
        f"{meta['threads']}; load average (1 min) at start/end: "
        f"{meta['loadavg_1_5_15min']['start'][0]:.2f}/{meta['loadavg_1_5_15min']['end'][0]:.2f}",
        f"- versions: python {v['python']}, torch {v['torch']}, scikit-learn {v['scikit-learn']},"
        f" spams-bin {v['spams-bin']}, numpy {v['numpy']}, sparsecode {v['sparsecode']}"
        f" (git {meta['git']}, source sha256 {meta['sparsecode_source_sha256']})",
        f"- data: {meta['config']['n_patches']} mean-removed {PATCH_SIZE}x{PATCH_SIZE} patches of "
        f"skimage camera, overcomplete DCT with {N_ATOMS} atoms; OMP k={OMP_K}, "
        f"Lasso alpha={ALPHA}",
        "- timing: median of "
        + ", ".join(f"{k} {v}" for k, v in meta["config"]["repeats"].items())
        + " calls per method (one untimed warm-up call first for sparsecode and SPAMS)",
        f"- command: `{meta['command']}`",
        "",
        format_table(HEADERS, table_rows(rows), markdown=True),
        "",
        "\n".join("> " + line for line in LEGEND.splitlines()),
        "",
        "## Targets",
        "",
        "OMP: >= 20x sklearn omp with error within 0.5%; Lasso: >= 10x sklearn lasso_cd with "
        "objective within 1e-3 (relative); aim: ratio vs SPAMS >= 1.0.",
        "",
        *(f"- `{line}`" for line in target_lines(checks)),
        "",
        "## Notes",
        "",
        *(f"- {n}" for n in notes),
        "",
    ]
    path.write_text("\n".join(text))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2,000 patches and 1 repeat (unless given explicitly)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per method (default: 5 for sparsecode and SPAMS, "
                        "3 for scikit-learn)")
    p.add_argument("--n-patches", type=int, default=None, help="number of patches (20,000)")
    p.add_argument("--lars-subset", type=int, default=None,
                   help="run sklearn lasso_lars (slow) on only the first N patches")
    p.add_argument("--budget", type=float, default=120.0,
                   help="seconds of timed calls per method after which no more repeats are "
                        "started (default 120; at least one call is always timed)")
    p.add_argument("--device", default="cpu",
                   help="torch device for sparsecode (default cpu, to compare on 2 CPU threads)")
    p.add_argument("--out", type=Path, default=HERE / "results",
                   help="folder for the JSON and Markdown results (benchmarks/results)")
    p.add_argument("--image", default="camera",
                   help="scikit-image sample image (a skimage.data function; colour images are "
                        "turned grey), default camera")
    p.add_argument("--tasks", default="omp,lasso", help="omp, lasso or both (default)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    n = args.n_patches or (2_000 if args.quick else 20_000)
    if args.repeats is not None:
        reps = {"sparsecode": args.repeats, "SPAMS": args.repeats, "sklearn": args.repeats}
    elif args.quick:
        reps = {"sparsecode": 1, "SPAMS": 1, "sklearn": 1}
    else:
        reps = {"sparsecode": 5, "SPAMS": 5, "sklearn": 3}
    n_lars = min(n, args.lars_subset or n)

    torch.set_num_threads(N_THREADS)
    threadpool_limits(N_THREADS)  # belt and braces on top of the environment variables

    load_start = os.getloadavg()  # other processes on the machine make timings noisy
    X = image_patches(load_image(args.image), patch_size=PATCH_SIZE, n_patches=n)  # float64
    D = overcomplete_dct(PATCH_SIZE, N_ATOMS)  # (256, 64), unit-norm rows

    has_ours = hasattr(sparsecode, "sparse_encode")
    notes = []
    if spams is None:
        notes.append("SPAMS skipped: `import spams` failed (pip install spams-bin).")
    if not has_ours:
        notes.append("sparsecode skipped: `sparsecode.sparse_encode` does not exist yet.")

    # (task, library, algorithm, dtypes, encoder, n_samples, note)
    plan = [
        ("omp", "sklearn", "omp", ("float64", "float32"),
         make_sklearn("omp", n_nonzero_coefs=OMP_K), n, ""),
        ("omp", "SPAMS", "omp", ("float64",), make_spams("omp") if spams else None, n,
         "OLS-type selection"),
        ("omp", "sparsecode", "omp", ("float64", "float32"),
         make_ours("omp", args.device, n_nonzero_coefs=OMP_K) if has_ours else None, n, ""),
        ("lasso", "sklearn", "lasso_cd", ("float64", "float32"),
         make_sklearn("lasso_cd", alpha=ALPHA), n, ""),
        ("lasso", "sklearn", "lasso_lars", ("float64", "float32"),
         make_sklearn("lasso_lars", alpha=ALPHA), n_lars,
         f"first {n_lars} patches only" if n_lars < n else ""),
        ("lasso", "SPAMS", "lasso", ("float64",), make_spams("lasso") if spams else None, n,
         "LARS, mode=2"),
    ] + [
        ("lasso", "sparsecode", alg, ("float64", "float32"),
         make_ours(alg, args.device, alpha=ALPHA) if has_ours else None, n, "")
        for alg in ("lasso_cd", "lasso_lars", "fista")
    ]

    print(f"Sparse coding benchmark: {n} patches, {N_ATOMS} atoms, {N_THREADS} threads, "
          f"{device_tag(N_THREADS)}, load average {load_start[0]:.2f}", flush=True)
    rows = []
    for task, lib, alg, dtypes, make, n_rows, note in plan:
        if make is None or task not in args.tasks.split(","):
            continue
        for dtype in dtypes:
            row = Row(task, lib, alg, dtype, n_rows, reps[lib], note=note)
            rows.append(run_row(row, make, X, D, warmup=lib != "sklearn",
                                budget_s=args.budget))

    fill_in_comparisons(rows, X)
    checks = check_targets(rows, X)

    for r in rows:
        n_conv = r.warnings.get("ConvergenceWarning", 0)
        if n_conv and r.library == "sklearn":
            notes.append(f"sklearn {r.algorithm} {r.dtype}: {n_conv} of {r.n_samples} samples "
                         "raised ConvergenceWarning (not converged in max_iter=1000).")
        if r.library == "sparsecode" and r.out_dtype and r.out_dtype != r.dtype:
            notes.append(f"{r.label} {r.dtype} returned {r.out_dtype}.")
    load_end = os.getloadavg()
    if max(load_start[0], load_end[0] - N_THREADS) > 1.0:  # about one other busy core
        notes.append(f"The machine was busy (1-min load average {load_start[0]:.2f} at start, "
                     f"{load_end[0]:.2f} at end, {os.cpu_count()} cores): timings are noisy.")
    spams_omp = find(rows, "omp", "SPAMS", "omp", "float64")
    sk_omp = find(rows, "omp", "sklearn", "omp", "float64")
    if spams_omp and sk_omp:
        notes.append(
            f"SPAMS `omp` selects each atom by the largest decrease of the residual after "
            f"re-projection (orthogonal least squares / ORMP), not by the largest correlation as "
            f"classical OMP (sklearn) does, so its error is lower "
            f"({100 * spams_omp.delta_quality:+.2f}% vs sklearn): the OMP quality target is "
            f"against sklearn only.")

    print()
    print(format_table(HEADERS, table_rows(rows)))
    print()
    print(LEGEND)
    print()
    print("Targets (OMP: >= 20x sklearn omp, error within 0.5%; Lasso: >= 10x sklearn lasso_cd, "
          "objective within 1e-3; aim: >= 1.0x SPAMS)")
    for line in target_lines(checks) or ["(nothing to check: sparsecode not measured)"]:
        print("  " + line)
    if notes:
        print("\nNotes:")
        for note in notes:
            print("  - " + note)

    # ---- results files
    versions = package_versions("torch", "scikit-learn", "spams-bin", "numpy", "scipy",
                                "scikit-image", "sparsecode")
    if versions["sparsecode"] is None:
        versions["sparsecode"] = getattr(sparsecode, "__version__", None)
    device = device_tag(N_THREADS) + ("-quick" if args.quick else "") + (
        "" if args.image == "camera" else f"-{args.image}")
    meta = {
        "date": now_iso(),
        "device": device,
        "cpu": cpu_name(),
        "threads": N_THREADS,
        "n_cpus": os.cpu_count(),
        "loadavg_1_5_15min": {"start": load_start, "end": load_end},
        "sparsecode_device": args.device,
        "versions": versions,
        "git": git_commit(HERE.parent),
        "sparsecode_source_sha256": tree_digest(Path(sparsecode.__file__).parent),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": {"image": args.image, "tasks": args.tasks, "n_patches": n,
                   "n_atoms": N_ATOMS, "patch_size": PATCH_SIZE,
                   "omp_n_nonzero_coefs": OMP_K, "lasso_alpha": ALPHA, "repeats": reps,
                   "lars_subset": n_lars, "targets": TARGETS},
        "threadpools": [{k: d.get(k) for k in ("user_api", "internal_api", "num_threads")}
                        for d in threadpool_info()],
    }
    results = [{k: v for k, v in asdict(r).items() if k != "per_sample"} for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"encode-{device}.json"
    md_path = args.out / f"encode-{device}.md"
    write_json(json_path, {**meta, "results": results, "targets": checks, "notes": notes})
    write_markdown(md_path, meta, rows, checks, notes)
    print(f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
