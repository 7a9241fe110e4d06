"""DDP on the CPU: 2 gloo processes under torchrun train one run; compared with 1 process at the same global batch."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import ROOT, make_cifar, tiny_args

# Every random choice off, so that the two runs see the same images and the same computation.
DETERMINISTIC = ["--no_use_randaugment", "--no_use_mixup", "--no_use_cutmix", "--no_use_crop", "--no_use_flip",
                 "--drop_path", "0", "--epochs", "2", "--warmup_epochs", "1"]

RUNNER = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {root!r})
    from training import distributed as ddp
    from training.config import parse_config
    from training.engine import Run

    def leave(run):
        # Everything the tests read is written: leave without the interpreter's shutdown. A gloo worker thread can
        # still be dropping its last collective (tensors with Python objects) when the interpreter shuts down; it
        # then takes the GIL, is ended inside C++ code, and the process aborts with "terminate called without an
        # active exception" (rare, seen in CI; gdb: ~AsyncAllgatherWork -> take_gil -> pthread_exit while
        # Py_FinalizeEx runs). Destroying the group first does not prevent it: its worker threads stay.
        run.log.close()
        ddp.cleanup()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    cfg = parse_config(sys.argv[1:])
    os.makedirs(cfg.save_dir, exist_ok=True)
    run = Run(cfg)
    run.setup()
    with open(os.path.join({out!r}, f"split_rank{{run.rank}}.txt"), "w") as f:  # a file: ranks share stdout
        f.write(f"{{run.split['held_out'] if run.split else None}} {{len(run.train_data)}}")
    stop_at = int(os.environ.get("STOP_AT_STEP", "0"))
    if stop_at:  # as if `kill` arrived during step stop_at (ranks agree on stopping every 10 steps)
        step, calls = run.step, [0]
        def counted(*a):
            calls[0] += 1
            if calls[0] == stop_at:
                run.stop.signum = 15
            return step(*a)
        run.step = counted
    try:
        with run.stop:
            run.fit()
    except Exception as e:
        print("STOPPED", type(e).__name__, run.pos.epoch, run.pos.step_in_epoch)
        leave(run)
    torch.save(run.model.state_dict(), os.path.join({out!r}, f"rank{{run.rank}}_of_{{run.world}}.pt"))
    if run.ema is not None:
        torch.save(run.ema.module.state_dict(), os.path.join({out!r}, f"ema_rank{{run.rank}}_of_{{run.world}}.pt"))
    print("LOG", run.log.log_path if run.is_main else "")
    leave(run)
""")


def run_procs(tmp_path, nproc, args, **env_extra):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(root=ROOT, out=str(tmp_path)))
    # --standalone: torchrun finds a free port itself, so repeated or concurrent runs never collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--compile"]], ids=["eager", "compiled"])
def test_two_gloo_ranks_match_each_other_and_one_process(tmp_path, extra):
    """Weights and (--model_ema) the EMA each rank keeps for itself, without communication. Compiled too: on a GPU
    torchrun runs compile by default, and torch.compile splits a DDP model's graph at its gradient buckets."""
    data = make_cifar(str(tmp_path / "data"), n_train=64, n_test=16)
    args = tiny_args(tmp_path, data, *DETERMINISTIC, "--model_ema", "--model_ema_decay", "0.9", *extra)
    ddp_args = [a if a != "8" or args[i - 1] != "--batch_size" else "4" for i, a in enumerate(args)]
    out = run_procs(tmp_path, 2, ddp_args)  # 2 ranks x batch 4
    r0 = torch.load(tmp_path / "rank0_of_2.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1_of_2.pt", weights_only=True)
    e0 = torch.load(tmp_path / "ema_rank0_of_2.pt", weights_only=True)
    e1 = torch.load(tmp_path / "ema_rank1_of_2.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ in {k}"
        assert torch.equal(e0[k], e1[k]), f"ranks' EMAs differ in {k}"
    assert any(not torch.equal(e0[k], r0[k]) for k in r0)
    log_path = [line.split()[1] for line in out.splitlines() if line.startswith("LOG ") and len(line.split()) > 1][0]
    log = open(log_path).read()
    assert "global batch 8 = 4 x 1 accum x 2 process(es)" in log and "cpu x2" in log
    assert ("torch.compile" in log) == bool(extra)

    single = tmp_path / "single"
    single.mkdir()
    run_procs(single, 1, tiny_args(single, data, *DETERMINISTIC, "--model_ema", "--model_ema_decay", "0.9", *extra))
    s = torch.load(single / "rank0_of_1.pt", weights_only=True)
    es = torch.load(single / "ema_rank0_of_1.pt", weights_only=True)
    # Same images, same averaged gradient; only the order of floating-point sums differs.
    for k in s:
        torch.testing.assert_close(r0[k], s[k], rtol=1e-4, atol=1e-5, msg=f"DDP and 1-process differ in {k}")
        torch.testing.assert_close(e0[k], es[k], rtol=1e-4, atol=1e-5, msg=f"DDP and 1-process EMAs differ in {k}")


@pytest.mark.slow
def test_ddp_mid_epoch_resume_gives_every_rank_its_own_rng(tmp_path):
    """Crop, flip and Mixup/CutMix on: each rank draws its own randomness, so resuming mid-epoch is exact only
    if each rank gets its own RNG state back."""
    data = make_cifar(str(tmp_path / "data"), n_train=240, n_test=16)  # 30 steps of 2 x 4 images per epoch
    random_on = ["--no_use_randaugment", "--drop_path", "0.1", "--epochs", "2", "--warmup_epochs", "1",
                 "--batch_size", "4", "--deterministic"]
    ref = tmp_path / "ref"
    ref.mkdir()
    run_procs(ref, 2, tiny_args(ref, data, *random_on))
    part = tmp_path / "part"
    part.mkdir()
    # The signal lands in step 5; ranks agree on it at step 10, save mid-epoch and stop together.
    out = run_procs(part, 2, tiny_args(part, data, *random_on), STOP_AT_STEP="5")
    assert out.count("STOPPED Stopped 0 10") == 2, out
    ck = torch.load(part / "ckpt" / "mamba_tiny_cifar10_last.pth", weights_only=True)
    assert ck["position"]["step_in_epoch"] == 10 and len(ck["per_rank"]) == 2
    run_procs(part, 2, tiny_args(part, data, *random_on, "--resume", "auto"))
    a = torch.load(ref / "rank0_of_2.pt", weights_only=True)
    b = torch.load(part / "rank0_of_2.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), f"resumed DDP run differs in {k}"


def test_mid_epoch_checkpoint_refuses_another_process_count(tmp_path):
    data = make_cifar(str(tmp_path / "data"), n_train=240, n_test=16)
    args = tiny_args(tmp_path, data, "--no_use_randaugment", "--epochs", "2", "--warmup_epochs", "1",
                     "--batch_size", "4")
    run_procs(tmp_path, 2, args, STOP_AT_STEP="5")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_mamba_baseline.py"), *args, "--resume", "auto"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and "saved mid-epoch by 2 process(es)" in r.stderr


@pytest.mark.slow
def test_epoch_boundary_checkpoint_moves_to_more_processes_at_the_same_global_batch(tmp_path):
    """A 1-process run's epoch-1 checkpoint, resumed over 2 processes at half the per-process batch: same global
    batch, so the log says so and warns of no recipe change; at another global batch it warns, naming it."""
    data = make_cifar(str(tmp_path / "data"), n_train=80, n_test=16)
    one = tmp_path / "one"
    one.mkdir()
    run_procs(one, 1, tiny_args(one, data, *DETERMINISTIC, "--batch_size", "8", "--save_freq", "1"))
    for name, batch in (("same", "4"), ("other", "8")):
        two = tmp_path / name
        (two / "ckpt").mkdir(parents=True)
        (two / "ckpt" / "mamba_tiny_cifar10_last.pth").write_bytes(
            (one / "ckpt" / "mamba_tiny_cifar10_epoch1.pth").read_bytes())
        out = run_procs(two, 2, tiny_args(two, data, *DETERMINISTIC, "--batch_size", batch, "--resume", "auto"))
        log = next(open(line[4:]).read() for line in out.splitlines() if line.startswith("LOG /"))
        saved = torch.load(two / "ckpt" / "mamba_tiny_cifar10_last.pth", weights_only=True)
        assert "epoch 1, step 0" in log and len(saved["per_rank"]) == 2
        if name == "same":
            assert "resuming over 2 process(es); the checkpoint's run had 1: the same global batch 8" in log
            assert "differ from the checkpoint's" not in log
        else:
            assert "differ from the checkpoint's: processes 1 -> 2; global batch 8 -> 16" in log


def test_every_rank_holds_out_the_same_validation_split(tmp_path):
    """--val_size under DDP: the split follows --split_seed alone, so every rank holds out the same images (those
    of one process), trains on its shard of the rest, and evaluates its slice of the validation split."""
    from training.data import load_cifar, split_hash, validation_split
    data = make_cifar(str(tmp_path / "data"), n_train=100, n_test=16)  # at least 6 images of each class
    args = tiny_args(tmp_path, data, *DETERMINISTIC, "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "4",
                     "--val_size", "20", "--split_seed", "5")
    run_procs(tmp_path, 2, args)
    held = split_hash(validation_split(load_cifar("cifar10", data, download=False)["train"][1], 20, 10, 5)[1])
    assert [(tmp_path / f"split_rank{r}.txt").read_text() for r in (0, 1)] == [f"{held} 80"] * 2
    rec = json.loads((tmp_path / "logs" / "mamba_tiny_cifar10_baseline_test.jsonl").read_text())
    assert rec["val_acc"] * 20 / 100 == pytest.approx(round(rec["val_acc"] * 20 / 100))  # of all 20, not a slice
    ck = torch.load(tmp_path / "ckpt" / "mamba_tiny_cifar10_last.pth", weights_only=True)
    assert ck["split"] == {"val_size": 20, "split_seed": 5, "held_out": held}


@pytest.mark.parametrize("where", ["Run()", "setup"])
def test_the_process_group_is_destroyed_when_the_run_refuses_its_config(tmp_path, monkeypatch, where):
    """Under torchrun, Run() joins the process group and may refuse the config right after (--cuda_graphs with
    several processes), or setup() may (a checkpoint of another run). A group left alive at exit can abort the
    process ("terminate called without an active exception") instead of the one-line error and exit code 2."""
    import training.engine as engine
    from training.config import UsageError, parse_config
    destroyed = []
    monkeypatch.setattr(engine.ddp, "cleanup", lambda: destroyed.append(True))

    def refuse(*a):
        raise UsageError("refused")
    monkeypatch.setattr(engine.Run, "__init__" if where == "Run()" else "setup", refuse)
    cfg = parse_config(tiny_args(tmp_path, str(tmp_path / "data")))
    with pytest.raises(UsageError, match="refused"):
        engine.train(cfg)
    assert destroyed == [True]
