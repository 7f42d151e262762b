"""Reliability of training runs: integrity (corrupt checkpoints, divergence, metrics.json), the
checkpoint protocol (stop signals at step boundaries, crashes between renames, SIGKILL loops) and
the run folder protocol (lock, --resume / --force, leftovers, changed settings)."""

import json
import os
import random
import shutil
import signal
import time

import numpy as np
import pytest
import safetensors.torch as st
import torch

from sae import checkpoint
from sae.cli import main
from sae.data import ArrayActivations
from sae.io import load
from sae.models import SAE, SAEConfig
from sae.synthetic import planted_features
from sae.train import TrainConfig, Trainer, TrainingDiverged

ARGS = ["--d-sae", "32", "--k", "3", "--batch-size", "128", "--holdout", "400",
        "--no-progress", "--matmul-dtype", "float32"]


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    X, _ = planted_features(3000, 16, 32, l0=3, seed=0)
    path = tmp_path_factory.mktemp("acts") / "acts.npy"
    np.save(path, X.numpy())
    return path


def train(acts, out, *extra, tokens=2560):
    return main(["train", "--activations", str(acts), "--out", str(out), "--tokens", str(tokens),
                 *ARGS, *extra])


def user_error(match, *argv_or_call):
    """Run ``main`` (argv) expecting one clean ``error:`` line and status 2."""
    with pytest.raises(SystemExit, match=match) as err:
        main(list(argv_or_call))
    assert err.value.code == 2 and str(err.value).startswith("error: ")
    return str(err.value)


def same_weights(a, b):
    sa, sb = load(a).state_dict(), load(b).state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def strict_json(path):
    def refuse(token):
        raise ValueError(f"{path} holds {token}: not valid JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def reference(acts, tmp_path_factory):
    """The uninterrupted run every recovered run must equal bit for bit."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert train(acts, out) == 0
    return out


def interrupted(acts, out, at_step, *extra):
    """A run stopped (as by Ctrl-C) at ``at_step``, its checkpoint kept."""
    from sae import train as train_mod

    orig = train_mod.Trainer._train_step

    def step(self, batch):
        if self.step == at_step - 1:
            self.request_stop()
        return orig(self, batch)

    train_mod.Trainer._train_step = step
    try:
        assert train(acts, out, *extra) == 130
    finally:
        train_mod.Trainer._train_step = orig
    return out / "checkpoint"


# ------------------------------------------------------------------------------ integrity
def test_corrupted_checkpoint_is_refused_and_kept(acts, tmp_path):
    ckpt = interrupted(acts, tmp_path / "run", 7)
    state = ckpt / "state.safetensors"
    raw = bytearray(state.read_bytes())
    raw[-64:-48] = b"\xff" * 16  # a few bytes of the last tensors: NaN / garbage
    state.write_bytes(bytes(raw))
    user_error("does not match the checksum", "train", "--activations", str(acts), "--out",
               str(tmp_path / "run"), "--tokens", "2560", *ARGS, "--resume")
    assert state.exists() and not (tmp_path / "run" / "topk").exists()


def test_non_finite_checkpoint_weights_are_refused_even_with_a_matching_checksum(acts, tmp_path):
    ckpt = interrupted(acts, tmp_path / "run", 5)
    tensors = st.load_file(str(ckpt / "state.safetensors"))
    tensors["sae/topk/W_dec"][3, :4] = float("nan")
    st.save_file(tensors, str(ckpt / "state.safetensors"))
    meta = json.loads((ckpt / "trainer.json").read_text())
    meta["sha256"]["state.safetensors"] = checkpoint.sha256(ckpt / "state.safetensors")
    (ckpt / "trainer.json").write_text(json.dumps(meta))
    user_error("W_dec holds 4 non-finite", "train", "--activations", str(acts), "--out",
               str(tmp_path / "run"), "--tokens", "2560", *ARGS, "--resume")


def test_truncated_checkpoint_names_the_file(acts, tmp_path):
    ckpt = interrupted(acts, tmp_path / "run", 5)
    state = ckpt / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    meta = json.loads((ckpt / "trainer.json").read_text())
    del meta["sha256"]  # as a checkpoint from before checksums
    (ckpt / "trainer.json").write_text(json.dumps(meta))
    user_error("state.safetensors is not a readable safetensors file", "train",
               "--activations", str(acts), "--out", str(tmp_path / "run"), "--tokens", "2560",
               *ARGS, "--resume")


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(acts, tmp_path):
    out = tmp_path / "run"
    msg = user_error("training diverged at step", "train", "--activations", str(acts),
                     "--out", str(out), "--tokens", "2560", *ARGS, "--lr", "1e6",
                     "--checkpoint-every", "1")
    assert "--lr" in msg and "checkpoint" in msg
    assert not (out / "topk").exists() and not (out / "metrics.json").exists()
    tensors, meta = checkpoint.read(out / "checkpoint")  # verified: finite, checksum matches
    assert meta["step"] >= 1


def test_divergence_guard_in_the_library():
    X, _ = planted_features(2000, 16, 32, l0=3, seed=1)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=3))
    trainer = Trainer({"topk": sae}, ArrayActivations(X, batch_size=128, epochs=None),
                      TrainConfig(total_tokens=2000, lr=1e6, progress=False))
    with pytest.raises(TrainingDiverged, match="SAE 'topk' has"):
        trainer.fit()


def test_metrics_json_is_always_strict_json(acts, tmp_path):
    from sae.cli import _json_safe

    out = tmp_path / "run"
    assert train(acts, out) == 0
    summary = strict_json(out / "metrics.json")
    assert summary["topk"]["fvu"] < 1
    strict_json(out / "topk" / "metrics.json")
    assert _json_safe({"a": [float("nan"), 1.0], "b": float("inf")}) == {"a": [None, 1.0],
                                                                         "b": None}


# ------------------------------------------------------------------------------ signals
@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGINT),
                                     (signal.SIGTERM, signal.SIGINT)])
def test_double_signal_checkpoints_a_whole_step(acts, tmp_path, reference, signals):
    """Two signals during one step (and one more while the checkpoint is written) stop the
    run at the step boundary; the resumed run equals the uninterrupted one bit for bit."""
    from sae import train as train_mod

    orig_step, orig_write = train_mod.Trainer._train_step, checkpoint.write

    def step(self, batch):
        if self.step == 6:
            os.kill(os.getpid(), signals[0])
            out = orig_step(self, batch)
            os.kill(os.getpid(), signals[1])  # between the update and the step count
            return out
        return orig_step(self, batch)

    def write(path, tensors, meta):
        os.kill(os.getpid(), signal.SIGINT)  # a signal during the write changes nothing
        return orig_write(path, tensors, meta)

    train_mod.Trainer._train_step = step
    checkpoint.write = write
    try:
        assert train(acts, tmp_path / "run") == 130
    finally:
        train_mod.Trainer._train_step, checkpoint.write = orig_step, orig_write
    assert json.loads((tmp_path / "run/checkpoint/trainer.json").read_text())["step"] == 7
    assert train(acts, tmp_path / "run", "--resume") == 0
    same_weights(reference / "topk", tmp_path / "run" / "topk")


# ------------------------------------------------------------------------------ crashes
def _leftover(ckpt, name):
    target = ckpt.parent / name
    shutil.copytree(ckpt, target)
    return target


@pytest.mark.parametrize("point", ["between_renames", "while_writing_tmp", "before_cleanup"])
def test_crash_at_each_point_of_a_checkpoint_write_resumes(acts, tmp_path, reference, point):
    """The folder states a crash leaves at each point of an atomic checkpoint write: resume
    finds the newest complete checkpoint and ends bit-identical to the uninterrupted run."""
    out = tmp_path / "run"
    older = _leftover(interrupted(acts, out, 4), ".older")
    shutil.rmtree(out / "checkpoint")
    newer = interrupted(acts, out, 9, "--force")
    if point == "between_renames":  # checkpoint -> .old done, .tmp -> checkpoint not yet
        os.rename(older, out / ".checkpoint.1a2b3c4d.old")
        os.rename(newer, out / ".checkpoint.x9y8z7.tmp")
    elif point == "while_writing_tmp":  # the new folder is incomplete: no trainer.json
        partial = _leftover(newer, ".checkpoint.p1q2r3.tmp")
        (partial / "trainer.json").unlink()
        shutil.rmtree(older)
    else:  # the new folder is in place, the old one not yet deleted
        os.rename(older, out / ".checkpoint.1a2b3c4d.old")
    assert train(acts, out, "--resume") == 0
    same_weights(reference / "topk", out / "topk")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".checkpoint")) == []


def test_no_intact_checkpoint_is_a_clear_error(acts, tmp_path):
    out = tmp_path / "run"
    ckpt = interrupted(acts, out, 3)
    (ckpt / "trainer.json").write_text("{not json")
    user_error("no intact checkpoint.*not valid JSON", "train", "--activations", str(acts),
               "--out", str(out), "--tokens", "2560", *ARGS, "--resume")


def test_random_sigkills_resume_bit_identically(acts, tmp_path):
    """At least 10 SIGKILLs at random times (mid-step, mid-checkpoint write, mid-save), each
    followed by a resume: the final SAE equals the uninterrupted run's bit for bit."""
    out = tmp_path / "run"
    rng = random.Random(0)
    kills = 0
    # children train on one thread: a forked child must not enter OpenMP parallel regions
    # (after numba or torch ran parallel code in this process they can hang), so the
    # reference is trained the same way, in a child of its own
    assert _forked_train(acts, tmp_path / "ref") == 0
    for _ in range(60):
        flags = []
        if checkpoint.has_checkpoint(out):
            try:
                checkpoint.recover(out)
                flags = ["--resume"]
            except ValueError:  # killed before any checkpoint was complete
                flags = ["--force"]
        pid = _fork_train(acts, out, "--checkpoint-every", "1", *flags)
        if kills < 10:  # kill at a random time; after 10 kills let the last resume finish
            time.sleep(rng.uniform(0.0, 0.25))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            kills += 1
            continue
        assert os.WEXITSTATUS(status) == 0, os.WEXITSTATUS(status)
        if kills >= 10:
            break
        shutil.rmtree(out)  # finished before 10 kills: start over
    assert kills >= 10
    same_weights(tmp_path / "ref" / "topk", out / "topk")
    strict_json(out / "metrics.json")


def _fork_train(acts, out, *extra) -> int:
    """Pid of a forked child running ``train`` on one thread (exit status 0 on success)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)
            code = train(acts, out, *extra)
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    return pid


def _forked_train(acts, out, *extra) -> int:
    _, status = os.waitpid(_fork_train(acts, out, *extra), 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1


# ------------------------------------------------------------------------------ run folder
def test_a_second_writer_is_refused_while_the_folder_is_locked(acts, tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345\n")
        held.flush()
        user_error("in use by another `sae train`", "train", "--activations", str(acts),
                   "--out", str(out), "--tokens", "2560", *ARGS)
    assert train(acts, out) == 0  # released (as when the holder exits or is killed)


def test_a_checkpoint_is_never_discarded_silently(acts, tmp_path, reference):
    out = tmp_path / "run"
    interrupted(acts, out, 5)
    user_error("holds the checkpoint of an unfinished run: continue it with --resume", "train",
               "--activations", str(acts), "--out", str(out), "--tokens", "2560", *ARGS)
    assert (out / "checkpoint").exists()
    user_error("choose one", "train", "--activations", str(acts), "--out", str(out),
               "--tokens", "2560", *ARGS, "--resume", "--force")
    assert train(acts, out, "--force") == 0
    same_weights(reference / "topk", out / "topk")
    assert not (out / "checkpoint").exists()


def test_resume_with_other_settings_names_them(acts, tmp_path):
    out = tmp_path / "run"
    interrupted(acts, out, 5)
    msg = user_error("other settings", "train", "--activations", str(acts), "--out", str(out),
                     "--tokens", "5000", *ARGS, "--lr", "0.01", "--aux-coefficient", "0.1",
                     "--resume")
    assert "--tokens 2560" in msg and "--lr None" in msg and "--aux-coefficient" in msg
    user_error("--batch-size 128", "train", "--activations", str(acts), "--out", str(out),
               "--tokens", "2560", *ARGS, "--batch-size", "64", "--resume")
    # bookkeeping flags may change
    assert train(acts, out, "--resume", "--log-every", "3", "--checkpoint-every", "2") == 0


def test_orphaned_temp_folders_are_never_read_as_saes_and_are_cleaned(acts, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(acts, out) == 0
    orphan = out / ".topk.k3j4h5.tmp"
    shutil.copytree(out / "topk", orphan)
    capsys.readouterr()
    assert main(["eval", str(out), "--activations", str(acts), "--json", "--device", "cpu"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"topk"}
    user_error("leftover of an interrupted write", "eval", str(orphan), "--activations",
               str(acts), "--device", "cpu")
    with pytest.raises(ValueError, match="leftover"):
        load(orphan)
    assert train(acts, out) == 0
    assert not orphan.exists()


def test_saved_folders_follow_the_umask(acts, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert train(acts, out) == 0
    finally:
        os.umask(old)
    for p in [out / "topk", *(out / "topk").iterdir(), out / "metrics.json"]:
        mode = p.stat().st_mode & 0o777
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))
