"""Interrupted, broken and hostile runs: every claim the trainer makes about them, proven on a tiny CPU config.

* kill -9 at any moment (startup, mid-training, in the middle of a checkpoint write) -> ``--resume auto``
  continues from the last complete checkpoint and ends exactly where an uninterrupted run ends;
* SIGTERM / SIGINT finish the step, write a mid-epoch ``_last.pth``, say how to resume, exit 128 + signum;
* resume is exact (weights, --model_ema's EMA and metrics) from a mid-epoch stop, an epoch boundary and a
  periodic save;
* non-finite losses skip the step on the device (weights untouched), are counted, and a streak stops the run
  with exit code 3 and the last good checkpoint intact;
* bad input of every kind: one stderr line, exit 2, no traceback, no code run, nothing overwritten;
* a batch too big for the GPU: one stderr line with what to change, exit 2, finished epochs kept;
* a checkpoint holds only plain data;
* tools/chaos_test.py (random SIGKILL/SIGTERM + resume until done) passes.

Signals and kill -9 need real processes; everything else runs in-process through train_mamba_baseline.main.
"""
import errno
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from conftest import TINY, after_setup, make_cifar

import train_mamba_baseline as cli
from training import data as data_mod
from training import engine
from training.checkpoint import FORMAT

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "train_mamba_baseline.py"
PREFIX = "train_mamba_baseline.py: error: "

EPOCHS, BATCH, N_TRAIN = 3, 8, 80
STEPS = N_TRAIN // BATCH            # 10 optimizer steps per epoch
# Mixup, CutMix and drop path stay on: the resumed run must reproduce their random draws too.
# One CPU thread (--num_workers 1): the same arithmetic in every process, and no thread oversubscription on a
# busy 2-core machine.
RECIPE = TINY + ["--no_use_randaugment", "--deterministic", "--epochs", str(EPOCHS), "--warmup_epochs", "1",
                 "--train_subset", str(N_TRAIN), "--num_workers", "1"]
METRIC_KEYS = ("epoch", "lr", "train_loss", "test_loss", "test_acc", "best_acc", "bad_steps")
LAST = "mamba_tiny_cifar10_last.pth"
TIMEOUT = 120  # seconds any one wait on a child process may take before the test fails (never hangs)


# ---- helpers -----------------------------------------------------------------------------------------------
def run_args(data, save_dir, log_dir, run_id, *extra):
    return RECIPE + ["--data_dir", str(data), "--save_dir", str(save_dir), "--log_dir", str(log_dir),
                     "--run_id", run_id, *extra]


def jsonl_of(log_dir, run_id):
    return Path(log_dir) / f"mamba_tiny_cifar10_baseline_{run_id}.jsonl"


def log_of(log_dir, run_id):
    return Path(log_dir) / f"mamba_tiny_cifar10_baseline_{run_id}.log"


def metrics(path):
    return [{k: r[k] for k in METRIC_KEYS} for r in map(json.loads, Path(path).read_text().splitlines())]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, where="state"):
    """Recursive equality; tensors bit for bit (torch.equal, same dtype and shape)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)), f"{where}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(ckpt_path, reference, jsonl=None):
    """The run in ckpt_path ended with the reference's weights, optimizer state, position and metrics."""
    got = load(ckpt_path)
    assert_same(got["model"], reference.ckpt["model"], "model")
    assert_same(got["optimizer"], reference.ckpt["optimizer"], "optimizer")
    for k in ("epoch", "step_in_epoch", "global_step", "best_acc", "best_epoch", "bad_steps"):
        assert got["position"][k] == reference.ckpt["position"][k], k
    strip = [{k: r[k] for k in METRIC_KEYS} for r in got["position"]["history"]]
    assert strip == reference.metrics
    if jsonl is not None:
        assert metrics(jsonl) == reference.metrics


def file_hashes(directory):
    """{name: sha256} of every file but the lock (whose content is the holder's pid)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())
            if p.is_file() and p.name != ".lock"}


def tmp_files(directory):
    return sorted(p.name for p in Path(directory).glob("*.tmp*"))


def assert_checkpoints_load(directory):
    """Every *.pth loads with weights_only=True, carries the format tag, and holds finite weights."""
    found = sorted(Path(directory).glob("*.pth"))
    for p in found:
        ck = load(p)
        assert ck["format"] == FORMAT, p
        assert all(torch.isfinite(t).all() for t in ck["model"].values() if t.is_floating_point()), p
    return found


def call_main(argv):
    """train_mamba_baseline.main in this process; restores what a --deterministic run changes process-wide, and
    checks that the run (finished, stopped or failed) gave back the SIGTERM/SIGINT handlers it found."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    det, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    autotune = torch.backends.cudnn.benchmark
    try:
        rc = cli.main([str(a) for a in argv])
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = autotune
    assert {s: signal.getsignal(s) for s in handlers} == handlers, "the run left its signal handlers installed"
    return rc


def one_error_line(capsys, *needles):
    """stdout/stderr of a refused run: exactly one stderr line, the CLI's prefix, no traceback."""
    out, err = capsys.readouterr()
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith(PREFIX), lines[0]
    assert "Traceback" not in out + err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


class Child:
    """The trainer (or a wrapper script around it) in its own process, output to a file."""
    live = []

    def __init__(self, argv, out_path, script=TRAINER):
        self.out_path = Path(out_path)
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, str(script), *map(str, argv)], cwd=REPO, stdout=out,
                                         stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        Child.live.append(self)

    def output(self):
        return self.out_path.read_text(errors="replace")

    def wait_for(self, cond, what, timeout=TIMEOUT, poll=0.01):
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                pytest.fail(f"the run exited (rc {self.proc.returncode}) before {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.output()}")
            time.sleep(poll)

    def wait_training(self, log_path, timeout=TIMEOUT):
        self.wait_for(lambda: log_path.exists() and "training epochs" in log_path.read_text(),
                      "training to start", timeout)

    def finish(self, timeout=TIMEOUT):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the run did not exit within {timeout}s:\n{self.output()}")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        assert self.finish() == -signal.SIGKILL


@pytest.fixture(autouse=True)
def _no_stray_children():
    yield
    while Child.live:
        c = Child.live.pop()
        if c.proc.poll() is None:
            c.proc.kill()  # only processes this file started, by their own handle
            c.proc.wait()


# ---- shared runs -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 100 images on disk, the first N_TRAIN used (--train_subset)
    return make_cifar(str(tmp_path_factory.mktemp("data")), "cifar10", n_train=100, n_test=16)


class Reference:
    pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """One uninterrupted run (epoch checkpoints kept: --save_freq 1) that every resumed run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    ref = Reference()
    ref.save_dir, ref.log_dir = root / "ckpt", root / "logs"
    assert call_main(run_args(data, ref.save_dir, ref.log_dir, "ref", "--save_freq", "1")) == 0
    ref.last = ref.save_dir / LAST
    ref.ckpt = load(ref.last)
    ref.metrics = metrics(jsonl_of(ref.log_dir, "ref"))
    assert [m["epoch"] for m in ref.metrics] == [1, 2, 3]
    assert ref.ckpt["position"]["global_step"] == EPOCHS * STEPS
    return ref


# ---- 1. kill -9 at any moment ------------------------------------------------------------------------------
SLOW_SAVE = """
import io, sys, time
sys.path.insert(0, {repo!r})
import torch
_save = torch.save

def slow_save(obj, f, *args, **kwargs):  # writes half, waits, writes the rest: a window to kill -9 in
    buf = io.BytesIO()
    _save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    time.sleep({pause})
    f.write(data[len(data) // 2:])

torch.save = slow_save
import train_mamba_baseline
sys.exit(train_mamba_baseline.main(sys.argv[1:]))
"""


def slow_save_trainer(tmp_path, pause):
    """A trainer script whose checkpoint writes take `pause` seconds more (same bytes)."""
    script = tmp_path / "slow_save_trainer.py"
    script.write_text(SLOW_SAVE.format(repo=str(REPO), pause=pause))
    return script


def test_sigkill_at_any_moment_then_resume_auto(tmp_path, data, reference):
    save, logs = tmp_path / "ckpt", tmp_path / "logs"
    last = save / LAST
    slow = slow_save_trainer(tmp_path, pause=2.0)

    def start(run_id, *extra, script=TRAINER):
        return Child(run_args(data, save, logs, run_id, "--resume", "auto", *extra), tmp_path / f"{run_id}.out",
                     script)

    # (a) early: the moment training starts, before any checkpoint
    c = start("k1")
    c.wait_training(log_of(logs, "k1"))
    c.kill9()
    assert_checkpoints_load(save)

    # (b) in the middle of writing the checkpoint that replaces an existing _last.pth (its first half is on disk)
    c = start("k2", script=slow)

    def half_written():
        try:
            return last.exists() and any(t.stat().st_size > 0 for t in save.glob(LAST + ".tmp*"))
        except FileNotFoundError:  # renamed in between
            return False

    c.wait_for(half_written, "a write over _last.pth")
    c.kill9()
    stale = list(save.glob(LAST + ".tmp*"))
    assert len(stale) == 1 and stale[0].stat().st_size > 0
    with pytest.raises(Exception):  # the kill landed mid-write: the temporary file is half a checkpoint
        load(stale[0])
    assert assert_checkpoints_load(save)
    pos = load(last)["position"]
    assert pos["epoch"] >= 1 and pos["step_in_epoch"] == 0  # the previous complete checkpoint

    # (c) mid-epoch, right after a periodic mid-epoch save (--save_every_minutes), after resuming from (b)'s
    # checkpoint; the resumed run removed the dead run's half-written file
    before = last.stat().st_mtime_ns
    c = start("k3", "--save_every_minutes", "0.0001")
    c.wait_training(log_of(logs, "k3"))
    assert f"resumed from {last}" in log_of(logs, "k3").read_text()
    assert not stale[0].exists()
    c.wait_for(lambda: last.stat().st_mtime_ns != before, "a mid-epoch save")
    c.kill9()
    assert assert_checkpoints_load(save)
    assert load(last)["position"]["step_in_epoch"] > 0  # the next resume starts mid-epoch

    # (d) resume until done: exactly the uninterrupted run
    assert call_main(run_args(data, save, logs, "k4", "--resume", "auto")) == 0
    assert tmp_files(save) == []
    assert_checkpoints_load(save)
    assert_same_run(last, reference, jsonl_of(logs, "k4"))


# ---- 2. SIGTERM / SIGINT: clean stop, resumable; a second run on the same save_dir is refused -------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_mid_epoch_and_resumes_exactly(sig, tmp_path, data, reference, capsys):
    save, logs = tmp_path / "ckpt", tmp_path / "logs"
    # slow checkpoint writes (2 s each, at least 2 per epoch) keep the tiny run alive long enough for the checks
    # below even on an idle machine, where its training steps take next to no time
    c = Child(run_args(data, save, logs, "first"), tmp_path / "first.out", slow_save_trainer(tmp_path, 2.0))
    c.wait_training(log_of(logs, "first"))
    if sig == signal.SIGTERM:
        # two runs on one save_dir: the second refuses, naming the holder; the first carries on
        assert call_main(run_args(data, save, tmp_path / "logs2", "second")) == 2
        one_error_line(capsys, f"pid {c.pid}", str(save))
        assert c.proc.poll() is None
        assert not (tmp_path / "logs2").exists()
    c.proc.send_signal(sig)
    assert c.finish() == 128 + sig
    pos = load(save / LAST)["position"]
    # stopped after a whole step: mid-epoch, or at an epoch boundary if the signal came in an epoch's last step
    assert 0 < pos["step_in_epoch"] < STEPS or (pos["step_in_epoch"] == 0 and 1 <= pos["epoch"] < EPOCHS), pos
    log = log_of(logs, "first").read_text()
    assert (f"stopped by {sig.name} at epoch {pos['epoch'] + 1}, step {pos['step_in_epoch']}; the last checkpoint "
            f"is {save / LAST}") in log
    assert "--resume auto" in log
    assert tmp_files(save) == []
    # the lock died with the process: resuming works and ends exactly where the uninterrupted run ends
    assert call_main(run_args(data, save, logs, "resumed", "--resume", "auto")) == 0
    assert f"resumed from {save / LAST}" in log_of(logs, "resumed").read_text()
    assert_same_run(save / LAST, reference, jsonl_of(logs, "resumed"))


# ---- 3. exact resume -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("at_step, stopped_at", [
    (STEPS + 3, (1, 4, 14)),          # during epoch 2's 4th step: a mid-epoch stop after that step
    (STEPS - 1, (1, 0, 10)),          # during epoch 1's last step: the epoch ends (eval, checkpoint), then stop
    (EPOCHS * STEPS - 1, None),       # during the run's very last step: the run simply finishes (exit 0)
], ids=["mid_epoch", "last_step_of_epoch", "last_step_of_run"])
def test_exact_resume_after_sigterm_at_a_chosen_step(at_step, stopped_at, tmp_path, data, reference, monkeypatch,
                                                      capsys):
    """A real SIGTERM delivered to this process during a chosen step: the step completes, the stop is clean,
    the RNG state and position are saved and restored, and the resumed run is exactly the uninterrupted one."""
    save, logs = tmp_path / "ckpt", tmp_path / "logs"

    def signal_during_step(run):
        train_step = run.step

        def step(micro_batches, lr):
            if run.pos.global_step == at_step:
                os.kill(os.getpid(), signal.SIGTERM)  # handled before the step runs; the step must still finish
            return train_step(micro_batches, lr)
        run.step = step

    after_setup(monkeypatch, signal_during_step)
    rc = call_main(run_args(data, save, logs, "a"))
    monkeypatch.undo()
    out = capsys.readouterr().out
    if stopped_at is None:
        assert rc == 0 and "stopped by" not in out
        assert_same_run(save / LAST, reference, jsonl_of(logs, "a"))
        return
    assert rc == 128 + signal.SIGTERM
    ck = load(save / LAST)
    epoch, step, global_step = stopped_at
    assert (ck["position"]["epoch"], ck["position"]["step_in_epoch"], ck["position"]["global_step"]) == stopped_at
    assert f"stopped by SIGTERM at epoch {epoch + 1}, step {step}; the last checkpoint is {save / LAST}" in out
    assert "Resume with the same command plus --resume auto" in out
    assert set(ck["rng"]) >= {"torch", "numpy", "python"}
    _walk(ck)  # a mid-epoch checkpoint (with its partial sums) is plain data too
    assert [m["epoch"] for m in metrics(jsonl_of(logs, "a"))] == [1]
    assert call_main(run_args(data, save, logs, "b", "--resume", "auto")) == 0
    assert_same_run(save / LAST, reference, jsonl_of(logs, "b"))


def test_exact_resume_from_epoch_boundary(tmp_path, data, reference):
    save = tmp_path / "ckpt"
    boundary = tmp_path / "epoch1.pth"
    shutil.copy(reference.save_dir / "mamba_tiny_cifar10_epoch1.pth", boundary)
    assert load(boundary)["position"]["step_in_epoch"] == 0
    assert call_main(run_args(data, save, tmp_path / "logs", "b", "--resume", boundary)) == 0
    assert_same_run(save / LAST, reference, jsonl_of(tmp_path / "logs", "b"))


def test_periodic_mid_epoch_saves_and_resume_from_one(tmp_path, data, reference, monkeypatch):
    """--save_every_minutes tiny: _last.pth is rewritten after (nearly) every step; the saves do not change the
    run, and a kill -9 right after one (simulated: resume from a copy of it) resumes exactly."""
    save, logs = tmp_path / "ckpt", tmp_path / "logs"
    real = engine.save_checkpoint
    seen = []
    snapshot = tmp_path / "mid_epoch.pth"

    def recording(state, path):
        real(state, path)
        p = state["position"]
        seen.append((p["epoch"], p["step_in_epoch"]))
        if (p["epoch"], p["step_in_epoch"]) == (1, 6) and not snapshot.exists():
            shutil.copy(path, snapshot)

    monkeypatch.setattr(engine, "save_checkpoint", recording)
    assert call_main(run_args(data, save, logs, "p", "--save_every_minutes", "0.0001")) == 0
    monkeypatch.undo()
    mid = [s for s in seen if s[1] > 0]
    assert len(mid) >= STEPS, seen  # many mid-epoch saves, in every epoch
    assert {e for e, _ in mid} == {0, 1, 2}
    assert snapshot.exists()
    assert_same_run(save / LAST, reference, jsonl_of(logs, "p"))

    save2 = tmp_path / "ckpt2"
    assert call_main(run_args(data, save2, logs, "r", "--resume", snapshot)) == 0
    assert_same_run(save2 / LAST, reference, jsonl_of(logs, "r"))


def test_ema_resumes_exactly_mid_epoch_and_can_be_switched_on_or_off(tmp_path, data, reference, monkeypatch):
    """--model_ema leaves training itself unchanged (the reference's weights, optimizer and metrics); a mid-epoch
    checkpoint resumes to the uninterrupted run's EMA bit for bit; an EMA checkpoint resumed without the flag
    drops the EMA, and a checkpoint without one resumed with the flag starts it, each with a warning line."""
    save, logs = tmp_path / "ckpt", tmp_path / "logs"
    real = engine.save_checkpoint
    snapshot = tmp_path / "mid_epoch.pth"

    def recording(state, path):
        real(state, path)
        if (state["position"]["epoch"], state["position"]["step_in_epoch"]) == (1, 6) and not snapshot.exists():
            shutil.copy(path, snapshot)

    monkeypatch.setattr(engine, "save_checkpoint", recording)
    ema = ["--model_ema", "--model_ema_decay", "0.9"]
    assert call_main(run_args(data, save, logs, "e", *ema, "--save_every_minutes", "0.0001", "--save_freq", "1")) == 0
    monkeypatch.undo()
    assert_same_run(save / LAST, reference, jsonl_of(logs, "e"))
    full = load(save / LAST)
    assert load(snapshot)["model_ema"] is not None

    save2 = tmp_path / "ckpt2"
    assert call_main(run_args(data, save2, logs, "r", *ema, "--resume", snapshot)) == 0
    assert_same_run(save2 / LAST, reference, jsonl_of(logs, "r"))
    assert_same(load(save2 / LAST)["model_ema"], full["model_ema"], "model_ema")
    pa, pb = dict(full["position"]), dict(load(save2 / LAST)["position"])  # best EMA and every record's EMA fields

    def untimed(history):
        return [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_s")} for r in history]
    assert untimed(pa.pop("history")) == untimed(pb.pop("history"))
    assert pa == pb

    save3 = tmp_path / "ckpt3"
    assert call_main(run_args(data, save3, logs, "off", "--resume", save / "mamba_tiny_cifar10_epoch1.pth")) == 0
    assert "warning: the checkpoint holds EMA weights but --model_ema is off: they are dropped" in \
        log_of(logs, "off").read_text()
    assert load(save3 / LAST)["model_ema"] is None
    assert_same_run(save3 / LAST, reference, jsonl_of(logs, "off"))

    save4 = tmp_path / "ckpt4"
    assert call_main(run_args(data, save4, logs, "on", *ema, "--resume",
                              reference.save_dir / "mamba_tiny_cifar10_epoch1.pth")) == 0
    assert (f"warning: --model_ema is on but the checkpoint holds no EMA weights: the EMA starts from the resumed "
            f"weights at step {STEPS}") in log_of(logs, "on").read_text()
    got = load(save4 / LAST)
    assert got["model_ema"].keys() == got["model"].keys()
    assert all(torch.isfinite(v).all() for v in got["model_ema"].values())
    assert [("ema_acc" in r) for r in got["position"]["history"]] == [False, True, True]
    assert_same_run(save4 / LAST, reference, jsonl_of(logs, "on"))


# ---- 4. non-finite losses ------------------------------------------------------------------------------------
def _inject_nan(monkeypatch, bad_steps, record=None):
    """The criterion returns NaN on the given global steps (0-based); record: global_step -> [before, after]."""
    def inject(run):
        criterion = run.step.criterion
        run.step.criterion = lambda out, y: criterion(out, y) * (float("nan") if run.pos.global_step in bad_steps
                                                                 else 1.0)
        if record is not None:
            def snap():
                return {k: v.detach().clone() for k, v in run.model.state_dict().items()}, \
                    [{k: v.clone() for k, v in s.items()} for s in run.optimizer.state.values()]
            run.optimizer.register_step_pre_hook(lambda *a: record.update({run.pos.global_step: [snap()]}))
            run.optimizer.register_step_post_hook(lambda *a: record[run.pos.global_step].append(snap()))

    after_setup(monkeypatch, inject)


def test_isolated_nonfinite_steps_are_skipped_and_counted(tmp_path, data, monkeypatch):
    save, logs = tmp_path / "ckpt", tmp_path / "logs"
    bad, record = {3, STEPS + 2, STEPS + 3}, {}
    _inject_nan(monkeypatch, bad, record)
    assert call_main(run_args(data, save, logs, "n", "--clip_grad", "1", "--max_bad_steps", "3")) == 0
    assert sorted(record) == list(range(EPOCHS * STEPS))
    for step, ((w0, s0), (w1, s1)) in record.items():
        if step in bad:  # neither the weights nor the optimizer's moments or step count moved
            assert_same(w1, w0, f"weights at skipped step {step}")
            assert_same(s1, s0, f"optimizer state at skipped step {step}")
        else:
            assert any(not torch.equal(w0[k], w1[k]) for k in w0), f"good step {step} changed nothing"
    m = metrics(jsonl_of(logs, "n"))
    assert [r["bad_steps"] for r in m] == [1, 3, 3]
    assert all(map(lambda r: r["train_loss"] == r["train_loss"], m))  # no NaN leaks into the metrics
    ck = load(save / LAST)
    assert ck["position"]["bad_steps"] == 3 and ck["position"]["epoch"] == EPOCHS
    assert_checkpoints_load(save)


@pytest.mark.parametrize("where", ["train", "eval"])
def test_out_of_memory_is_one_line_with_advice_and_keeps_finished_epochs(tmp_path, data, monkeypatch, capsys, where):
    """A batch that does not fit on the GPU (in a training step of epoch 2, or in its evaluation): one stderr line
    naming the batch sizes, the tokens and what to change, exit 2, no traceback; the log says it too (for
    `tail -f`); epoch 1's checkpoint is untouched."""
    save, logs = tmp_path / "ckpt", tmp_path / "logs"

    def inject(run):
        if where == "train":
            step = run.step

            def step_or_oom(*a):
                if run.pos.global_step == STEPS + 2:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                return step(*a)
            run.step = step_or_oom
        else:
            evaluate = run.evaluate

            def evaluate_or_oom(*a, **k):
                if run.pos.epoch == 1:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                return evaluate(*a, **k)
            run.evaluate = evaluate_or_oom
    after_setup(monkeypatch, inject)
    assert call_main(run_args(data, save, logs, "m")) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and err.count("\n") == 1
    assert err.startswith("train_mamba_baseline.py: error: the GPU ran out of memory at --batch_size 8, "
                          "--eval_batch_size ")
    assert "17 tokens" in err and "--accum_steps" in err and "--patch_size 4" in err
    assert "ran out of memory" not in out  # the log's copy is not echoed: the error is printed once
    assert "error: the GPU ran out of memory" in log_of(logs, "m").read_text()
    assert load(save / LAST)["position"]["epoch"] == 1
    assert [r["epoch"] for r in metrics(jsonl_of(logs, "m"))] == [1]
    assert_checkpoints_load(save)


def test_out_of_memory_while_setting_up_is_one_line(tmp_path, data, monkeypatch, capsys):
    """Out of memory before the model exists (its weights or the data set moving to a GPU that is already full):
    the same one line, exit 2, no traceback, nothing written."""
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    monkeypatch.setattr(engine, "build_model", oom)
    save, logs = tmp_path / "ckpt", tmp_path / "logs"
    assert call_main(run_args(data, save, logs, "m")) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and err.count("\n") == 1
    assert "error: the GPU ran out of memory at --batch_size 8, --eval_batch_size 16 (setting up the run)" in err
    assert not logs.exists() and not [f for f in os.listdir(save) if f.endswith(".pth")]


def test_nonfinite_streak_stops_with_exit_3_and_keeps_last_good_checkpoint(tmp_path, data, monkeypatch, capsys):
    save, logs = tmp_path / "ckpt", tmp_path / "logs"
    _inject_nan(monkeypatch, set(range(STEPS, EPOCHS * STEPS)))  # every step from epoch 2 on
    real = engine.save_checkpoint
    saved = {}

    def recording(state, path):
        real(state, path)
        saved[path] = (state["position"]["epoch"], hashlib.sha256(Path(path).read_bytes()).hexdigest())

    monkeypatch.setattr(engine, "save_checkpoint", recording)
    assert call_main(run_args(data, save, logs, "s", "--max_bad_steps", "3")) == 3
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    log = log_of(logs, "s").read_text()
    assert "error: the loss was not finite for 10 steps in a row (epoch 2, step 10); stopped" in log
    assert "--lr" in log and str(save / LAST) in log
    assert "not finite" in out
    last = str(save / LAST)
    assert saved[last][0] == 1  # nothing saved after the NaNs started
    assert hashlib.sha256(Path(last).read_bytes()).hexdigest() == saved[last][1]
    assert_checkpoints_load(save)  # loads, finite weights
    assert load(last)["position"]["epoch"] == 1
    assert [r["epoch"] for r in metrics(jsonl_of(logs, "s"))] == [1]


# ---- 5. bad input: one line, exit 2, no code run, nothing overwritten --------------------------------------
class Evil:
    """Unpickling this runs a shell command (if the loader allows it)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _bad_data(kind, data, tmp_path, monkeypatch):
    d = tmp_path / "baddata"
    shutil.copytree(data, d)
    folder = d / "cifar-10-batches-py"
    target = folder / "data_batch_2"
    if kind == "missing_dir":
        shutil.rmtree(d)
    elif kind == "missing_file":
        (folder / "test_batch").unlink()
    elif kind == "truncated":
        raw = target.read_bytes()
        target.write_bytes(raw[: len(raw) // 2])
    elif kind == "text":
        target.write_text("this is not a CIFAR batch\n")
    elif kind == "no_data_key":
        target.write_bytes(pickle.dumps({b"labels": [0, 1]}))
    elif kind == "wrong_shape":
        import numpy as np
        target.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}))
    elif kind == "bad_labels":
        import numpy as np
        target.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    elif kind == "evil_pickle":
        target.write_bytes(pickle.dumps(Evil(tmp_path / "pwned")))
    if kind.startswith("missing"):  # offline: the download the trainer tries first fails

        def offline(dataset, data_dir):
            raise OSError("Network is unreachable (test)")
        monkeypatch.setattr(data_mod, "_download", offline)
    return d


def _bad_checkpoint(kind, reference, tmp_path):
    p = tmp_path / f"{kind}.pth"
    real = reference.last.read_bytes()
    if kind == "random_bytes":
        p.write_bytes(random.Random(0).randbytes(50_000))
    elif kind == "truncated":
        p.write_bytes(real[: len(real) // 2])
    elif kind == "plain_dict":
        torch.save({"model": reference.ckpt["model"], "epoch": 3}, p)
    elif kind == "text":
        p.write_text("not a checkpoint\n")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "tagged_but_incomplete":
        torch.save({"format": FORMAT, "model": reference.ckpt["model"]}, p)
    elif kind == "evil_torch_save":
        torch.save({"format": FORMAT, "x": Evil(tmp_path / "pwned")}, p)
    elif kind == "evil_pickle":
        p.write_bytes(pickle.dumps(Evil(tmp_path / "pwned")))
    elif kind == "missing":
        pass
    elif kind == "malformed_ema":  # model_ema is a state dict or None
        ck = load(reference.save_dir / "mamba_tiny_cifar10_epoch1.pth")
        ck["model_ema"] = torch.zeros(3)
        torch.save(ck, p)
    elif kind == "wrong_shapes":  # the right config, weights of another shape (an edited file, other code)
        ck = load(reference.save_dir / "mamba_tiny_cifar10_epoch1.pth")  # unfinished
        ck["model"]["head.weight"] = torch.zeros(3, 3)
        torch.save(ck, p)
    else:  # a real checkpoint of another run: change what differs
        ck = load(reference.last)
        ck["config"].update({"other_arch": {"arch": "mamba_small"},
                             "other_dataset": {"dataset": "cifar100", "num_classes": 100},
                             "other_width": {"embed_dim": 32}}[kind])
        torch.save(ck, p)
    return p


USAGE = {
    "unknown_dataset": (["--dataset", "imagenet"], ["unknown dataset 'imagenet'"]),
    "unknown_arch": (["--arch", "mamba_huge"], ["unknown architecture 'mamba_huge'"]),
    "zero_epochs": (["--epochs", "0", "--warmup_epochs", "0"], ["--epochs must be positive"]),
    "negative_epochs": (["--epochs", "-2"], ["--epochs must be positive"]),
    "zero_batch": (["--batch_size", "0"], ["--batch_size must be positive"]),
    "negative_batch": (["--batch_size", "-8"], ["--batch_size must be positive"]),
    "zero_lr": (["--lr", "0"], ["--lr must be positive"]),
    "negative_lr": (["--lr", "-0.001"], ["--lr must be positive"]),
    "warmup_equals_epochs": (["--warmup_epochs", "3"], ["--warmup_epochs (3) must be shorter than --epochs (3)"]),
    "warmup_exceeds_epochs": (["--warmup_epochs", "7"], ["must be shorter than --epochs"]),
    "not_a_number": (["--epochs", "three"], ["--epochs", "three"]),
    "unknown_flag": (["--learning_rate", "1"], ["--learning_rate"]),
    "abbreviated_flag": (["--epo", "5"], ["unrecognized arguments: --epo"]),
    "val_size_not_per_class": (["--val_size", "15"], ["--val_size must be a multiple of cifar10's 10 classes"]),
    "negative_val_size": (["--val_size", "-10"], ["--val_size and --split_seed must be >= 0"]),
}
DATA = {
    "missing_dir": ["cifar10 not found under", "download failed", "Network is unreachable"],
    "missing_file": ["cifar10 copy under", "is incomplete: missing test_batch", "nothing was downloaded"],
    "truncated": ["data_batch_2 is not a readable CIFAR batch"],
    "text": ["data_batch_2 is not a readable CIFAR batch"],
    "no_data_key": ["data_batch_2 is not a readable CIFAR batch"],
    "wrong_shape": ["data_batch_2 has data of shape (4, 100)"],
    "bad_labels": ["data_batch_2 has labels outside 0..9"],
    "evil_pickle": ["data_batch_2 is not a readable CIFAR batch", "refusing to load posix.system"],
}
CKPT = {
    "missing": ["no checkpoint at"],
    "random_bytes": ["is corrupt, truncated or not a checkpoint"],
    "truncated": ["is corrupt, truncated or not a checkpoint"],
    "empty": ["is corrupt, truncated or not a checkpoint"],
    "text": ["is corrupt, truncated or not a checkpoint"],
    "plain_dict": ["is not a checkpoint of this project", FORMAT],
    "tagged_but_incomplete": ["is a damaged checkpoint (missing or malformed: optimizer, position, rng, config)"],
    "wrong_shapes": ["does not fit this model or optimizer", "size mismatch"],
    "malformed_ema": ["is a damaged checkpoint (missing or malformed: model_ema)"],
    "evil_torch_save": ["is corrupt, truncated or not a checkpoint"],
    "evil_pickle": ["is corrupt, truncated or not a checkpoint"],
    "other_arch": ["was made for a different run: arch 'mamba_small' (this run: 'mamba_tiny')"],
    "other_dataset": ["dataset 'cifar100' (this run: 'cifar10')", "num_classes 100 (this run: 10)"],
    "other_width": ["embed_dim 32 (this run: 16)"],
}


@pytest.fixture
def existing(tmp_path, reference):
    """A save_dir holding a finished run's checkpoints, which no refused run may touch."""
    d = tmp_path / "ckpt"
    shutil.copytree(reference.save_dir, d)
    return d


def _refused(argv, capsys, existing, needles, tmp_path):
    before = file_hashes(existing)
    assert call_main(argv) == 2
    line = one_error_line(capsys, *needles)
    assert file_hashes(existing) == before  # byte-identical, nothing added
    assert tmp_files(existing) == []
    assert not (tmp_path / "pwned").exists()  # no code ran
    return line


@pytest.mark.parametrize("case", list(USAGE))
def test_bad_usage(case, tmp_path, data, existing, capsys):
    extra, needles = USAGE[case]
    _refused(run_args(data, existing, tmp_path / "logs", "u", *extra), capsys, existing, needles, tmp_path)
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("kind", list(DATA))
def test_bad_data(kind, tmp_path, data, existing, capsys, monkeypatch):
    bad = _bad_data(kind, data, tmp_path, monkeypatch)
    _refused(run_args(bad, existing, tmp_path / "logs", "d"), capsys, existing, DATA[kind], tmp_path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", list(CKPT))
def test_bad_resume_checkpoint(kind, tmp_path, data, reference, existing, capsys):
    bad = _bad_checkpoint(kind, reference, tmp_path)
    before = bad.read_bytes() if bad.exists() else None
    _refused(run_args(data, existing, tmp_path / "logs", "c", "--resume", bad), capsys, existing,
             [str(bad)] + CKPT[kind], tmp_path)
    assert (bad.read_bytes() if bad.exists() else None) == before


def test_resume_auto_with_corrupt_last_is_refused(tmp_path, data, existing, capsys):
    (existing / LAST).write_bytes(b"\x00garbage" * 100)
    _refused(run_args(data, existing, tmp_path / "logs", "c", "--resume", "auto"), capsys, existing,
             [str(existing / LAST), "corrupt"], tmp_path)


def test_resume_of_finished_run_is_refused(tmp_path, data, existing, capsys):
    _refused(run_args(data, existing, tmp_path / "logs", "f", "--resume", "auto"), capsys, existing,
             ["is a finished run (3/3 epochs", "nothing to resume"], tmp_path)


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_unwritable_save_dir(where, tmp_path, data, existing, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    save = blocker / "ckpt" if where == "under_a_file" else blocker
    _refused(run_args(data, save, tmp_path / "logs", "w"), capsys, existing,
             [f"cannot write to --save_dir {save}"], tmp_path)
    assert blocker.read_text() == "x"


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, data, reference, monkeypatch, capsys):
    """ENOSPC in the middle of the epoch-2 save: exit 2 with one line; the epoch-1 _last.pth is untouched and
    resumes to exactly the uninterrupted result."""
    save, logs = tmp_path / "ckpt", tmp_path / "logs"
    last = save / LAST
    real_save, real_ckpt = torch.save, engine.save_checkpoint
    good = {}

    def full_disk(obj, f, *args, **kwargs):
        if obj["position"]["epoch"] >= 2:
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[:4096])  # part of it made it to disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    def recording(state, path):
        real_ckpt(state, path)
        good[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(engine, "save_checkpoint", recording)
    assert call_main(run_args(data, save, logs, "full")) == 2
    one_error_line(capsys, f"could not write {last}: the disk is full; the previous checkpoint is unchanged")
    monkeypatch.undo()
    assert hashlib.sha256(last.read_bytes()).hexdigest() == good[str(last)]
    assert load(last)["position"]["epoch"] == 1
    assert tmp_files(save) == []
    assert_checkpoints_load(save)
    assert call_main(run_args(data, save, logs, "after", "--resume", "auto")) == 0
    assert_same_run(last, reference, jsonl_of(logs, "after"))


# ---- 6. a checkpoint is plain data -----------------------------------------------------------------------------
PLAIN = (torch.Tensor, int, float, str, bool, type(None))


def _walk(obj, where="ckpt"):
    if isinstance(obj, (dict, OrderedDict)):
        assert type(obj) in (dict, OrderedDict), f"{where}: {type(obj)}"
        for k, v in obj.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            _walk(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        assert type(obj) in (list, tuple), f"{where}: {type(obj)}"
        for i, v in enumerate(obj):
            _walk(v, f"{where}[{i}]")
    else:
        assert type(obj) in PLAIN, f"{where}: {type(obj).__name__} is not plain data"


def test_checkpoints_hold_only_plain_data(reference):
    for p in sorted(reference.save_dir.glob("*.pth")):
        ck = load(p)
        _walk(ck)
        assert {"format", "model", "optimizer", "position", "rng", "config"} <= set(ck)
        assert type(ck["model"][next(iter(ck["model"]))]) is torch.Tensor  # not a Parameter subclass


# ---- 7. the chaos tool ------------------------------------------------------------------------------------------
def test_chaos_tool_passes(tmp_path):
    work = tmp_path / "chaos"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "chaos_test.py"), "--kills", "2", "--seed", "1",
                           "--workdir", str(work), "--epochs", "2", "--timeout", "120"],
                          cwd=REPO, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "PASS" in out and "FAIL" not in out, out
    assert "kill 1: " in out and "resumes from" in out, out  # where each kill landed
    assert "final resume: finished at end of epoch 2" in out, out


def test_fresh_run_over_an_existing_run_is_refused(tmp_path, data, existing, capsys):
    """Re-running a command without --resume must not overwrite the previous run's checkpoints."""
    _refused(run_args(data, existing, tmp_path / "logs", "n"), capsys, existing,
             ["already holds a run", "--resume auto", "nothing was overwritten"], tmp_path)


def test_full_disk_while_logging_is_one_line_and_the_checkpoint_survives(tmp_path, data, capsys, monkeypatch):
    import errno
    from training.logs import RunLog

    def full(self, rec, total):
        raise OSError(errno.ENOSPC, "No space left on device", self.jsonl_path)
    monkeypatch.setattr(RunLog, "epoch", full)
    save = tmp_path / "s"
    assert call_main(run_args(data, save, tmp_path / "logs", "disk")) == 2
    one_error_line(capsys, "No space left on device", "--resume auto")
    ck = load(save / LAST)  # the epoch's checkpoint is written before its log line
    assert ck["position"]["epoch"] == 1
