"""Ground-truth recovery on a synthetic model (SynthSAEBench style), ours against SAELens.

The model is SAELens' own synthetic machinery (``sae_lens.synthetic.SyntheticModel``: Zipfian
firing probabilities, a feature hierarchy, low-rank correlations, varying magnitudes), CPU-sized:
256 dimensions, 4,096 features. For each architecture (``batchtopk``, ``matryoshka``, ``mp``):

* ours: ``sae train --activations`` on samples of the model written to a ``.npy`` file (one
  process each, our defaults, ``k`` = the model's mean L0);
* SAELens: its own training SAE of the same architecture (``BatchTopKTrainingSAE``,
  ``MatryoshkaBatchTopKTrainingSAE``, ``MatchingPursuitTrainingSAE``) trained by
  ``sae_lens.synthetic.train_toy_sae`` with its defaults, on the same samples (its loop's
  generator is replaced by the rows of the ``.npy``, so data generation is not in its time);

and both are scored by SAELens' evaluator (``eval_sae_on_synthetic_data``: F1 of latents as
feature detectors, MCC of decoder and true features, uniqueness, explained variance, L0, dead
latents), ours read through SAELens' loader from the folder ``sae train`` wrote. Also scored:
``online_dl`` (ours only; nobody else has it), coded by matching pursuit and by non-negative OMP
(``--online-pursuits``; SAELens' loader would encode the latter with mp, so it is scored through
ours), and the pursuit encoders on our trained decoders (``sae.encoders`` at the trained
encoder's L0). Tokens/s: samples / wall time of the training
call (ours: the trainer's own figure; SAELens: ``train_toy_sae``).

Targets (issue 19): each of our architectures at least matches SAELens' on F1 and MCC (within
0.01) at the same L0, and trains at least 2x faster in tokens/s.

    python benchmarks/bench_synthetic.py                 # ~25 min on 2 CPU cores
    python benchmarks/bench_synthetic.py --quick         # smoke test
    python benchmarks/bench_synthetic.py --archs online_dl --online-pursuits nnomp
"""

# ruff: noqa: E402  (thread counts must be set in the environment before numpy/torch import)

from common import pin_threads, threads_from_argv

N_THREADS = pin_threads(threads_from_argv())

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import (
    cpu_name,
    device_tag,
    format_table,
    git_commit,
    now_iso,
    package_versions,
    write_results,
)

HERE = Path(__file__).resolve().parent
ARCHS = ("batchtopk", "matryoshka", "mp")


def synthetic_model(args):
    from sae_lens.synthetic import (
        HierarchyConfig,
        SyntheticModel,
        ZipfianFiringProbabilityConfig,
    )
    from sae_lens.synthetic.synthetic_model import LowRankCorrelationConfig, SyntheticModelConfig

    cfg = SyntheticModelConfig(
        num_features=args.features, hidden_dim=args.hidden,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4,
                                                          min_prob=5e-4),
        hierarchy=HierarchyConfig(total_root_nodes=args.features // 32, branching_factor=4,
                                  max_depth=2, mutually_exclusive_portion=0.5),
        correlation=LowRankCorrelationConfig(rank=16, correlation_scale=0.1, seed=args.seed),
        std_firing_magnitudes=0.2, mean_firing_magnitudes=1.0, seed=args.seed)
    return SyntheticModel(cfg, device="cpu")


def write_samples(model, n: int, path: Path, chunk: int = 8192) -> float:
    """``n`` samples of the model into a float32 ``.npy``; returns the mean true L0."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                    shape=(n, model.cfg.hidden_dim))
    l0 = 0.0
    with torch.no_grad():
        for a in range(0, n, chunk):
            feats = model.activation_generator.sample(min(chunk, n - a))
            l0 += float((feats != 0).sum())
            arr[a : a + feats.shape[0]] = model.feature_dict(feats).numpy()
    arr.flush()
    return l0 / n


def train_ours(arch: str, acts: Path, out: Path, args, k: int, pursuit: str = "mp") -> dict:
    cmd = [sys.executable, "-m", "sae", "train", "--activations", str(acts), "--arch", arch,
           "--pursuit", pursuit, "--k", str(k), "--d-sae", str(args.width),
           "--tokens", str(args.samples),
           "--batch-size", str(args.batch_size), "--holdout", "8192", "--out", str(out),
           "--no-progress", "--matmul-dtype", "float32", "--device", "cpu"]
    env = {"PYTHONPATH": str(HERE.parent)}
    subprocess.run(cmd, check=True, capture_output=not args.verbose,
                   env={**__import__("os").environ, **env})
    return json.loads((out / "metrics.json").read_text())[arch]


class _ArrayBatches:
    """Batches of rows of an array, in order, cycling: what SAELens trains on here, the same
    samples ours trains on (its own loop would generate fresh ones, inside its timing)."""

    def __init__(self, arr: np.ndarray, batch_size: int):
        self.arr, self.batch_size, self.pos = arr, batch_size, 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.arr):
            self.pos = 0
        batch = self.arr[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return torch.from_numpy(np.array(batch))


def train_saelens(arch: str, model, args, k: int, acts: Path):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matching_pursuit_sae import (
        MatchingPursuitTrainingSAE,
        MatchingPursuitTrainingSAEConfig,
    )
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.synthetic import training

    common = dict(d_in=args.hidden, d_sae=args.width, device="cpu")
    if arch == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=k, **common))
    elif arch == "matryoshka":
        w = args.width
        widths = [w // 16, w // 8, w // 4, w // 2, w]
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            k=k, matryoshka_widths=widths, **common))
    else:
        sae = MatchingPursuitTrainingSAE(MatchingPursuitTrainingSAEConfig(
            max_iterations=k, residual_threshold=0.0, **common))
    arr = np.load(acts, mmap_mode="r")[: args.samples]
    original = training.SyntheticActivationIterator
    training.SyntheticActivationIterator = lambda *a, **kw: _ArrayBatches(arr, args.batch_size)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            training.train_toy_sae(sae, model.feature_dict, model.activation_generator,
                                   training_samples=args.samples, batch_size=args.batch_size)
    finally:
        training.SyntheticActivationIterator = original
    return sae, args.samples / (time.perf_counter() - t0)


class _Pursuit:
    """Our SAE seen through a pursuit encoder, with the interface SAELens' evaluator calls."""

    def __init__(self, sae, encoder: str, k: int):
        from sae.encoders import Encoded

        self.view = Encoded(sae, encoder, k=k)
        self.W_dec = sae.W_dec.detach()

    def eval(self):
        return self

    def encode(self, x):
        with torch.no_grad():
            return self.view.encode(x)

    def decode(self, z):
        with torch.no_grad():
            return self.view.decode(z)


def score(sae, model, args) -> dict:
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    torch.manual_seed(args.seed + 1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = eval_sae_on_synthetic_data(sae, model.feature_dict, model.activation_generator,
                                       num_samples=args.eval_samples, batch_size=4096)
    return {"f1": r.classification.f1_score, "mcc": r.mcc, "uniqueness": r.uniqueness,
            "explained_variance": r.explained_variance, "l0": r.sae_l0,
            "dead_latents": r.dead_latents, "true_l0": r.true_l0}


def run(args) -> list[dict]:
    from sae_lens import SAE as SaeLensSAE

    from sae.io import load

    torch.manual_seed(args.seed)
    model = synthetic_model(args)
    work = Path(tempfile.mkdtemp(prefix="bench-synthetic-"))
    acts = HERE / "data" / (f"synthetic-{args.features}x{args.hidden}-{args.samples}"
                            f"-s{args.seed}.npy")
    info = acts.with_suffix(".json")
    if info.exists() and acts.exists():  # the samples of a previous run (same model, seed)
        true_l0 = json.loads(info.read_text())["true_l0"]
    else:
        acts.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(args.seed)
        true_l0 = write_samples(model, args.samples + 8192, acts)
        info.write_text(json.dumps({"true_l0": true_l0}))
    k = max(1, round(true_l0))
    print(f"synthetic model: {args.features} features in {args.hidden} dims, mean L0 "
          f"{true_l0:.2f} -> k={k}; {args.samples:,} training samples", flush=True)
    rows = []
    runs = [(a, "mp") for a in args.archs if a != "online_dl"]
    runs += [("online_dl", p) for p in args.online_pursuits if "online_dl" in args.archs]
    for arch, pursuit in runs:
        m = train_ours(arch, acts, work / f"{arch}-{pursuit}", args, k, pursuit)
        folder = Path(m["path"])
        ours = load(folder)
        if pursuit == "mp":  # scored through SAELens' loader (which encodes with mp)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                view = SaeLensSAE.load_from_disk(folder)
        else:
            view = _Pursuit(ours, "trained", k)
        library = "ours" if pursuit == "mp" else f"ours, {pursuit} coding"
        rows.append({"arch": arch, "library": library, "tokens_per_s": m["tokens_per_s"],
                     **score(view, model, args)})
        print(rows[-1], flush=True)
        for enc in args.encoders:
            rows.append({"arch": arch, "library": f"ours + {enc}", "tokens_per_s": None,
                         **score(_Pursuit(ours, enc, k), model, args)})
            print(rows[-1], flush=True)
        if arch in ARCHS:
            sae, tps = train_saelens(arch, model, args, k, acts)
            rows.append({"arch": arch, "library": "SAELens", "tokens_per_s": tps,
                         **score(sae, model, args)})
            print(rows[-1], flush=True)
    return rows


def targets(rows: list[dict]) -> list[str]:
    out = []
    for arch in ARCHS:
        ours = next((r for r in rows if r["arch"] == arch and r["library"] == "ours"), None)
        ref = next((r for r in rows if r["arch"] == arch and r["library"] == "SAELens"), None)
        if ours is None or ref is None:
            continue
        speed = ours["tokens_per_s"] / ref["tokens_per_s"]
        ok = (ours["f1"] >= ref["f1"] - 0.01 and ours["mcc"] >= ref["mcc"] - 0.01
              and speed >= 2.0)
        out.append(f"[{'  MET  ' if ok else 'NOT MET'}] {arch}: F1 {ours['f1']:.3f} vs "
                   f"{ref['f1']:.3f}, MCC {ours['mcc']:.3f} vs {ref['mcc']:.3f} (need >= -0.01), "
                   f"L0 {ours['l0']:.2f} vs {ref['l0']:.2f}, {speed:.2f}x SAELens tokens/s "
                   "(need >= 2x)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--samples", type=int, default=2_000_000)
    p.add_argument("--eval-samples", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--archs", default=",".join((*ARCHS, "online_dl")))
    p.add_argument("--online-pursuits", default="mp,nnomp",
                   help="online_dl: one run per coding pursuit")
    p.add_argument("--encoders", default="omp,mp", help="pursuits scored on our decoders")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    args.encoders = [e for e in args.encoders.split(",") if e]
    args.archs = [a for a in args.archs.split(",") if a]
    args.online_pursuits = [p for p in args.online_pursuits.split(",") if p]
    if args.quick:
        args.features, args.hidden, args.width = 512, 64, 256
        args.samples, args.eval_samples = 50_000, 10_000
    torch.set_num_threads(N_THREADS)
    t0 = time.time()
    rows = run(args)
    cols = ["arch", "library", "tokens_per_s", "f1", "mcc", "uniqueness", "explained_variance",
            "l0", "dead_latents"]

    def cell(v):
        return "" if v is None else f"{v:,.0f}" if isinstance(v, float) and v > 100 else (
            f"{v:.3f}" if isinstance(v, float) else str(v))

    table = format_table(cols, [[cell(r[c]) for c in cols] for r in rows], markdown=True)
    tag = device_tag(N_THREADS) + ("-quick" if args.quick else "")
    lines = [f"# Synthetic ground-truth recovery: {tag}", "",
             f"- date: {now_iso()}; CPU: {cpu_name()}; threads: {N_THREADS}; "
             f"{time.time() - t0:.0f} s in all",
             f"- versions: {package_versions('torch', 'sae-lens')}; git {git_commit(HERE.parent)}",
             f"- model: {args.features} features, {args.hidden} dims (SAELens SyntheticModel: "
             "Zipfian firing, hierarchy, low-rank correlations); SAE width "
             f"{args.width}; {args.samples:,} training samples, batch {args.batch_size}; "
             f"scored on {args.eval_samples:,} fresh samples by SAELens' evaluator",
             f"- command: `{' '.join(['bench_synthetic.py', *(argv or sys.argv[1:])])}`", "",
             table, "", "## Targets", "", *[f"- `{t}`" for t in targets(rows)]]
    write_results(args.out, f"synthetic-{tag}", lines, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
