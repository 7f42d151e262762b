"""Fuzzing ``sae train`` / ``sae eval`` with random flag values (hypothesis; bounded examples,
derandomised so CI is reproducible; ``SAE_FUZZ_EXAMPLES`` / ``SAE_FUZZ_RANDOM`` fuzz longer):
every run ends either with status 0 and a usable model (finite weights, strict-JSON metrics,
finite FVU) or with a clean usage error (status 2), never a traceback."""

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sae.cli import main  # noqa: E402
from sae.io import load  # noqa: E402
from sae.synthetic import planted_features  # noqa: E402

NUMBERS = st.sampled_from(["0", "-1", "1e-3", "0.5", "1", "3", "nan", "inf", "-inf", "1e30",
                           "-0.0", "abc", ""])
COUNTS = st.sampled_from(["-1", "0", "1", "2", "5", "16", "64", "2.5", "x", "1e3"])
FLAGS = {
    "--d-sae": COUNTS,
    "--expansion-factor": COUNTS,
    "--k": st.sampled_from(["1", "3", "0", "-2", "3,3", "2,4", "99", "2.5", ",", "7"]),
    "--arch": st.sampled_from(["topk", "batchtopk", "relu", "jumprelu", "matryoshka",
                               "topk,topk", "gated", "topk,relu", "", "mp"]),
    "--batch-size": st.sampled_from(["-1", "0", "1", "50", "128", "100000"]),
    "--tokens": st.sampled_from(["-5", "0", "1", "64", "300"]),
    "--holdout": st.sampled_from(["-1", "0", "1", "100", "100000"]),
    "--lr": NUMBERS,
    "--l1-coefficient": NUMBERS,
    "--l0-coefficient": NUMBERS,
    "--aux-coefficient": NUMBERS,
    "--bandwidth": NUMBERS,
    "--threshold-rate": NUMBERS,
    "--grad-clip": NUMBERS,
    "--decay-fraction": NUMBERS,
    "--divergence-factor": NUMBERS,
    "--warmup-steps": COUNTS,
    "--checkpoint-every": COUNTS,
    "--eval-every": COUNTS,
    "--log-every": COUNTS,
    "--device": st.sampled_from(["cpu", "meta", "bogus", "cuda:7", "auto"]),
    "--matmul-dtype": st.sampled_from(["float32", "bfloat16", "int8"]),
}
TOGGLES = ["--resume", "--force", "--keep-checkpoint", "--no-normalize-input"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    X, _ = planted_features(1500, 8, 16, l0=2, seed=0)
    np.save(folder / "acts.npy", X.numpy())
    np.save(folder / "zeros.npy", np.zeros((500, 8), dtype=np.float32))
    np.save(folder / "ints.npy", np.ones((500, 8), dtype=np.int16))
    (folder / "text.npy").write_text("not an array")
    return folder


def _outcome(argv: list[str]) -> int:
    """``main``'s status; a usage error must be status 2 with an ``error:`` message."""
    try:
        return main(argv)
    except SystemExit as e:
        assert e.code == 2, (argv, e.code, str(e))
        return 2


def _usable(out: Path) -> None:
    def refuse(token):
        raise AssertionError(f"{out}/metrics.json holds {token}")

    summary = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)
    for name, m in summary.items():
        assert math.isfinite(m["fvu"]) and m["fvu"] < 1e6, (name, m["fvu"])
        for key, t in load(out / name).state_dict().items():
            if t.is_floating_point():
                assert bool(torch.isfinite(t).all()), (name, key)


#: Examples per CI run (SAE_FUZZ_EXAMPLES=2000 SAE_FUZZ_RANDOM=1 to fuzz for longer, afresh).
EXAMPLES = int(os.environ.get("SAE_FUZZ_EXAMPLES", "40"))


@settings(max_examples=EXAMPLES, deadline=None,
          derandomize=not os.environ.get("SAE_FUZZ_RANDOM"), database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(flags=st.dictionaries(st.sampled_from(sorted(FLAGS)), st.just(None), max_size=5)
       .flatmap(lambda d: st.fixed_dictionaries({k: FLAGS[k] for k in d})),
       toggles=st.lists(st.sampled_from(TOGGLES), max_size=2, unique=True),
       source=st.sampled_from(["acts.npy"] * 4 + ["zeros.npy", "ints.npy", "text.npy",
                                                  "missing.npy"]))
def test_fuzzed_train_and_eval_never_crash(data, flags, toggles, source):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        base = {"--d-sae": "16", "--k": "2", "--batch-size": "100", "--tokens": "300",
                "--holdout": "100", "--device": "cpu"}
        argv = ["train", "--activations", str(data / source), "--out", str(out), "--no-progress"]
        for flag, value in {**base, **flags}.items():
            argv += [f"{flag}={value}"]
        argv += toggles
        status = _outcome(argv)
        assert status in (0, 2)
        if status == 0:
            _usable(out)
            assert _outcome(["eval", str(out), "--activations", str(data / source), "--json",
                             "--device", "cpu"]) == 0
