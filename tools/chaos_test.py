#!/usr/bin/env python3
"""Chaos test: kill a tiny CPU training at random moments, resume it, and check it ends exactly as an
uninterrupted run does.

    python tools/chaos_test.py --kills 4 --seed 0 --workdir /tmp/chaos

1. generates a tiny CIFAR-10 in the standard layout (tools/fake_cifar.py) under WORKDIR/data;
2. trains the reference: the tiny config (--deterministic), uninterrupted, in WORKDIR/reference;
3. trains the same config in WORKDIR/chaos with --resume auto and a mid-epoch checkpoint every
   --save_every_minutes, and --kills times kills it at a random moment (SIGKILL; every third kill, from the
   second on, is a SIGTERM), each time checking that every checkpoint loads (weights_only=True) and noting
   where the next attempt resumes (epoch/step from _last.pth);
4. resumes with --resume auto until the run finishes, then compares the final weights, their EMA (the runs use
   --model_ema) and optimizer state (torch.equal on every tensor) and the per-epoch metrics (not the times) with
   the reference.

Prints a PASS/FAIL summary. Exit status: 0 PASS, 1 FAIL (a mismatch, a checkpoint that does not load, a run
that failed or hung). Every process gets --timeout seconds at most, so the tool never hangs.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TRAINER = os.path.join(REPO, "train_mamba_baseline.py")
sys.path.insert(0, HERE)
from fake_cifar import make_cifar  # noqa: E402

STEM = "mamba_tiny_cifar10"
METRIC_KEYS = ("epoch", "lr", "train_loss", "test_loss", "test_acc", "best_acc", "bad_steps", "ema_loss", "ema_acc")


class Failure(Exception):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Kill a tiny CPU training at random moments (SIGKILL, some SIGTERM), "
                                "resume it each time, and compare the result with an uninterrupted run.")
    p.add_argument("--kills", type=int, default=4, help="how many times to kill the run (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments and signals")
    p.add_argument("--workdir", default=None, help="where data, checkpoints and logs go; its data/, reference/ and "
                   "chaos/ are replaced (default: a temporary directory, removed after a PASS unless --keep)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n_train", type=int, default=160, help="training images (batch 8: n_train/8 steps per epoch)")
    p.add_argument("--save_every_minutes", type=float, default=0.002,
                   help="mid-epoch checkpoint period of the killed runs (default 0.002: about every step)")
    p.add_argument("--timeout", type=float, default=300, help="seconds any one training process may take")
    p.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    a = p.parse_args(argv)
    if a.kills < 0 or a.epochs < 2 or a.n_train < 16 or a.timeout <= 0:
        p.error("need --kills >= 0, --epochs >= 2, --n_train >= 16, --timeout > 0")
    return a


def train_args(a, data_dir, save_dir, log_dir, *extra):
    return ["--arch", "mamba_tiny", "--embed_dim", "16", "--depth", "2", "--patch_size", "8", "--device", "cpu",
            "--batch_size", "8", "--eval_batch_size", "16", "--no_progress", "--no_use_randaugment",
            "--deterministic", "--model_ema", "--epochs", str(a.epochs), "--warmup_epochs", "1", "--seed", "0",
            "--data_dir", data_dir, "--train_subset", str(a.n_train), "--num_workers", "1", "--save_dir", save_dir,
            "--log_dir", log_dir, "--run_id", "chaos", *extra]


class Trainer:
    """One training process; output appended to out_path."""

    def __init__(self, argv, out_path, timeout):
        self.t0 = time.monotonic()
        self.timeout = timeout
        with open(out_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, TRAINER, *argv], cwd=REPO, stdout=out,
                                         stderr=subprocess.STDOUT)

    def elapsed(self):
        return time.monotonic() - self.t0

    def wait(self):
        left = max(1.0, self.timeout - self.elapsed())
        try:
            return self.proc.wait(left)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise Failure(f"a training process ran past --timeout {self.timeout:g}s; killed it") from None

    def sleep_until(self, t, cond=None):
        """Sleep until t seconds after launch (or cond() is true); False if the process exited first."""
        while self.elapsed() < t and not (cond and cond()):
            if self.proc.poll() is not None:
                return False
            if self.elapsed() > self.timeout:
                self.wait()  # raises
            time.sleep(0.01)
        return self.proc.poll() is None


def count_in(path, text):
    try:
        with open(path, errors="replace") as f:
            return f.read().count(text)
    except FileNotFoundError:
        return 0


def load(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


def check_checkpoints(save_dir):
    """Every *.pth loads with weights_only=True and has finite weights; -> _last.pth's position or None."""
    import torch
    last = None
    for name in sorted(os.listdir(save_dir)) if os.path.isdir(save_dir) else []:
        if not name.endswith(".pth"):
            continue
        path = os.path.join(save_dir, name)
        try:
            ck = load(path)
        except Exception as e:
            raise Failure(f"{path} does not load: {type(e).__name__}: {str(e)[:200]}") from None
        if ck.get("format") != "vim-cifar-checkpoint/1":
            raise Failure(f"{path} has no format tag")
        if not all(torch.isfinite(t).all() for t in ck["model"].values() if t.is_floating_point()):
            raise Failure(f"{path} has non-finite weights")
        if name == f"{STEM}_last.pth":
            last = ck["position"]
    return last


def where(pos, steps_per_epoch):
    if pos is None:
        return "no checkpoint yet (the next attempt starts over)"
    if pos["step_in_epoch"]:
        return f"epoch {pos['epoch'] + 1} step {pos['step_in_epoch']}/{steps_per_epoch} (mid-epoch)"
    return f"end of epoch {pos['epoch']}"


def compare(got_path, ref_path):
    """-> list of differences between two final checkpoints (empty: identical)."""
    import torch
    got, ref = load(got_path), load(ref_path)
    diffs = []

    def walk(a, b, at):
        if isinstance(a, torch.Tensor):
            if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)):
                diffs.append(at)
        elif isinstance(a, dict):
            if not isinstance(b, dict) or set(a) != set(b):
                diffs.append(at + " (keys)")
            else:
                for k in a:
                    walk(a[k], b[k], f"{at}.{k}")
        elif isinstance(a, (list, tuple)):
            if not isinstance(b, (list, tuple)) or len(a) != len(b):
                diffs.append(at + " (length)")
            else:
                for i, (x, y) in enumerate(zip(a, b)):
                    walk(x, y, f"{at}[{i}]")
        elif a != b:
            diffs.append(f"{at}: {a!r} != {b!r}")

    walk(got["model"], ref["model"], "model")
    walk(got["optimizer"], ref["optimizer"], "optimizer")
    walk(got["model_ema"], ref["model_ema"], "model_ema")
    for k in ("epoch", "step_in_epoch", "global_step", "best_acc", "best_epoch", "bad_steps"):
        walk(got["position"][k], ref["position"][k], f"position.{k}")
    strip = [[{k: r[k] for k in METRIC_KEYS} for r in c["position"]["history"]] for c in (got, ref)]
    walk(strip[0], strip[1], "metrics")
    return diffs


def jsonl_metrics(path):
    with open(path) as f:
        return [{k: r[k] for k in METRIC_KEYS} for r in map(json.loads, f.read().splitlines())]


def chaos(a, work):
    rng = random.Random(a.seed)
    data = make_cifar(os.path.join(work, "data"), "cifar10", n_train=a.n_train, n_test=16)
    steps = a.n_train // 8
    ref_dir, chaos_dir = os.path.join(work, "reference"), os.path.join(work, "chaos")
    for d in (ref_dir, chaos_dir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    ref_ckpt, ref_logs = os.path.join(ref_dir, "ckpt"), os.path.join(ref_dir, "logs")
    ckpt, logs = os.path.join(chaos_dir, "ckpt"), os.path.join(chaos_dir, "logs")
    ref_log = os.path.join(ref_logs, f"{STEM}_baseline_chaos.log")
    log = os.path.join(logs, f"{STEM}_baseline_chaos.log")
    out = os.path.join(chaos_dir, "trainer.out")

    # the reference, timed: startup (launch -> 'training epochs') and training
    t = Trainer(train_args(a, data, ref_ckpt, ref_logs), os.path.join(ref_dir, "trainer.out"), a.timeout)
    t.sleep_until(a.timeout, lambda: count_in(ref_log, "training epochs") > 0)
    startup = t.elapsed()
    t.sleep_until(a.timeout, lambda: count_in(ref_log, "finished:") > 0)
    training = max(0.2, t.elapsed() - startup)
    rc = t.wait()
    if rc != 0:
        raise Failure(f"the reference run failed (exit {rc}); see {ref_dir}/trainer.out")
    print(f"reference: {a.epochs} epochs x {steps} steps, startup {startup:.1f}s, training {training:.1f}s", flush=True)

    resume = ["--resume", "auto", "--save_every_minutes", str(a.save_every_minutes)]
    kills, finished, pos = [], False, None
    for i in range(a.kills):
        done = (pos["epoch"] * steps + pos["step_in_epoch"]) if pos else 0
        left = 1.0 - done / (a.epochs * steps)  # the share of the training this attempt has to do
        sig = signal.SIGTERM if i % 3 == 1 else signal.SIGKILL
        before = count_in(log, "training epochs")
        t = Trainer(train_args(a, data, ckpt, logs, *resume), out, a.timeout)
        if rng.random() < 0.2:  # aimed at startup (imports, data, checkpoint load)
            alive = t.sleep_until(rng.uniform(0.05, 1.0) * startup)
        else:  # aimed at training: anywhere in what is left of it
            alive = t.sleep_until(a.timeout, lambda: count_in(log, "training epochs") > before)
            alive = alive and t.sleep_until(t.elapsed() + rng.uniform(0.0, 0.85) * training * left)
        phase = "training" if count_in(log, "training epochs") > before else "startup"
        at = t.elapsed()
        if alive:
            t.proc.send_signal(sig)
        rc = t.wait()
        expected = {0, -signal.SIGKILL} if sig == signal.SIGKILL else {0, 128 + signal.SIGTERM, -signal.SIGTERM}
        if rc not in expected:
            raise Failure(f"kill {i + 1}: the run exited {rc} (expected one of {sorted(expected)}); "
                          f"see {out}")
        pos = check_checkpoints(ckpt)
        what = f"{sig.name} at {at:.1f}s ({phase})" if alive else "none: the run had already ended"
        print(f"kill {i + 1}: {what} -> exit {rc}; resumes from {where(pos, steps)}", flush=True)
        kills.append(rc)
        if rc == 0 or (pos and pos["epoch"] >= a.epochs and pos["step_in_epoch"] == 0):
            finished = True  # it got to the end (killed after its last checkpoint, at the latest)
            break
    attempts = 0
    while not finished:
        attempts += 1
        if attempts > 3:
            raise Failure("the run did not finish in 3 resumes without kills")
        rc = Trainer(train_args(a, data, ckpt, logs, *resume), out, a.timeout).wait()
        if rc != 0:
            raise Failure(f"the final resume exited {rc}; see {out}")
        finished = True
    pos = check_checkpoints(ckpt)
    leftovers = [n for n in os.listdir(ckpt) if ".tmp" in n]
    if leftovers:
        raise Failure(f"temporary files left in {ckpt}: {leftovers}")
    print(f"final resume: finished at {where(pos, steps)}", flush=True)
    diffs = compare(os.path.join(ckpt, f"{STEM}_last.pth"), os.path.join(ref_ckpt, f"{STEM}_last.pth"))
    jsonl = [jsonl_metrics(os.path.join(d, f"{STEM}_baseline_chaos.jsonl")) for d in (logs, ref_logs)]
    if jsonl[0] != jsonl[1]:
        diffs.append("metrics .jsonl")
    return sum(rc != 0 for rc in kills), diffs


def main(argv=None):
    a = parse_args(argv)
    work = a.workdir or tempfile.mkdtemp(prefix="chaos_")
    os.makedirs(work, exist_ok=True)
    t0 = time.monotonic()
    try:
        killed, diffs = chaos(a, work)
    except Failure as e:
        print(f"FAIL: {e} (workdir {work})", flush=True)
        return 1
    took = time.monotonic() - t0
    if diffs:
        print(f"FAIL: {killed} kill(s); the final run differs from the uninterrupted one in {len(diffs)} place(s): "
              + "; ".join(diffs[:10]) + f" ({took:.0f}s, workdir {work})", flush=True)
        return 1
    print(f"PASS: {killed} kill(s) landed; the resumed run ended with the same weights, EMA weights, optimizer "
          f"state and metrics as the uninterrupted one (torch.equal on every tensor) ({took:.0f}s)", flush=True)
    if not a.workdir and not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
