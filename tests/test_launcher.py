"""Tests for run_mamba_baseline.sh, with a fake nvidia-smi and a fake Python interpreter.

The script is copied into a temporary directory next to a stub ``train_mamba_baseline.py`` (the
launcher cds to its own directory and checks that the trainer is there), so nothing is written into
the repository and the real trainer is never started. The fake interpreter records its argv (and pid)
as ``<dataset>.json`` in a temporary directory and then sleeps, so the launched "runs" are real
processes until the test kills them.
"""
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_mamba_baseline.sh"

FAKE_NVIDIA_SMI = """#!/bin/sh
n="${FAKE_GPU_COUNT:-0}"
if [ "$n" -eq 0 ]; then
    echo "No devices were found"
    exit 6
fi
i=0
while [ "$i" -lt "$n" ]; do
    echo "GPU $i: NVIDIA Fake GPU (UUID: GPU-0000000$i)"
    i=$((i + 1))
done
"""

FAKE_PYTHON = """#!{python}
import json, os, sys, time
args = sys.argv[1:]
dataset = args[args.index("--dataset") + 1] if "--dataset" in args else "unknown"
out = os.path.join(os.environ["FAKE_ARGV_DIR"], dataset + ".json")
with open(out + ".tmp", "w") as f:
    json.dump({{"pid": os.getpid(), "argv": args}}, f)
os.replace(out + ".tmp", out)
print("fake trainer started", dataset, flush=True)
time.sleep(float(os.environ.get("FAKE_SLEEP", "60")))
"""

RUN_LINE = re.compile(r"^\[(?P<ds>cifar10|cifar100)\] arch: (?P<arch>\S+)\s+device: (?P<dev>.+?)\s+PID: (?P<pid>\d+)$")
TS_RE = r"\d{8}_\d{6}"


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _path_without_nvidia_smi() -> str:
    return os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not (Path(d) / "nvidia-smi").exists())


class Launcher:
    def __init__(self, tmp_path: Path):
        self.root = tmp_path / "repo"
        self.root.mkdir()
        shutil.copy2(SCRIPT, self.root / SCRIPT.name)
        (self.root / "train_mamba_baseline.py").write_text("raise SystemExit('stub: never run')\n")
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        _write_exe(self.bin / "nvidia-smi", FAKE_NVIDIA_SMI)
        self.fake_python = _write_exe(tmp_path / "fake_python", FAKE_PYTHON.format(python=sys.executable))
        self.argv_dir = tmp_path / "argv"
        self.argv_dir.mkdir()
        self.log_dir = tmp_path / "logs"
        self.ckpt_dir = tmp_path / "ckpt"
        self.pids: set[int] = set()

    def run(self, gpus=2, nvidia_smi=True, timeout=20, **overrides):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RUN_", "ARCH_", "GPU_", "FAKE_")) and k not in (
                   "EPOCHS", "BATCH_SIZE", "LOG_DIR", "CKPT_DIR", "DATA_ROOT", "PYTHON", "ALLOW_CPU",
                   "EXTRA_ARGS", "RESUME", "NPROC", "RUN_ID", "LR", "WEIGHT_DECAY", "WARMUP_EPOCHS",
                   "MIXUP_ALPHA", "CUTMIX_ALPHA", "LABEL_SMOOTHING")}
        base_path = _path_without_nvidia_smi()
        env.update(
            PATH=(str(self.bin) + os.pathsep + base_path) if nvidia_smi else base_path,
            FAKE_GPU_COUNT=str(gpus),
            FAKE_ARGV_DIR=str(self.argv_dir),
            PYTHON=str(self.fake_python),
            LOG_DIR=str(self.log_dir),
            CKPT_DIR=str(self.ckpt_dir),
        )
        env.update({k: str(v) for k, v in overrides.items()})
        t0 = time.monotonic()
        proc = subprocess.run(["bash", str(self.root / SCRIPT.name)], cwd=self.root, env=env,
                              capture_output=True, text=True, timeout=timeout)
        proc.elapsed = time.monotonic() - t0
        proc.runs = self.parse(proc.stdout)
        self.pids.update(r["pid"] for r in proc.runs.values())
        return proc

    @staticmethod
    def parse(stdout: str) -> dict:
        """{dataset: {arch, device, pid, log, out}} from the launcher's report."""
        runs, current = {}, None
        for line in stdout.splitlines():
            m = RUN_LINE.match(line.strip())
            if m:
                current = {"arch": m["arch"], "device": m["dev"], "pid": int(m["pid"])}
                runs[m["ds"]] = current
                continue
            s = line.strip()
            if current is not None and s.startswith(("log: ", "out: ")):
                current[s[:3]] = s[5:]
        return runs

    def argv(self, dataset, timeout=15.0) -> list:
        """The argv the fake trainer for ``dataset`` got (waits for it to start)."""
        path = self.argv_dir / f"{dataset}.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"the {dataset} run never started ({path} missing)")
            time.sleep(0.05)
        data = json.loads(path.read_text())
        self.pids.add(data["pid"])
        return data["argv"]

    def started(self) -> list:
        return sorted(p.stem for p in self.argv_dir.glob("*.json"))

    def cleanup(self):
        for f in self.argv_dir.glob("*.json"):
            try:
                self.pids.add(json.loads(f.read_text())["pid"])
            except (OSError, ValueError, KeyError):
                pass
        for pid in self.pids:
            if not self.is_fake_trainer(pid):  # exited, and its pid possibly reused by another process: leave it
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

    def is_fake_trainer(self, pid: int) -> bool:
        """Whether pid is still one of this test's processes: the fake trainer, or the launcher's subshell that is
        about to become it (its command line names this test's folder). Pids are recycled quickly (pid_max can be
        32768): a bare kill could stop an unrelated process, such as a training run beside the tests. Without /proc
        (not Linux) every recorded pid counts."""
        try:
            return str(self.root.parent).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return not Path("/proc/self").exists()
        except OSError:
            return False


def opt(argv, name):
    """The value following ``name`` in argv (asserting it occurs exactly once)."""
    assert argv.count(name) == 1, f"{name} occurs {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture
def launcher(tmp_path):
    lch = Launcher(tmp_path)
    yield lch
    lch.cleanup()


def test_cleanup_stops_only_its_fake_trainers(launcher):
    """A recorded pid that now belongs to another process (pids are recycled) is left alone; a live fake is stopped."""
    other = subprocess.Popen(["sleep", "30"])
    launcher.run(FAKE_SLEEP=30)
    launcher.argv("cifar10"), launcher.argv("cifar100")  # both fakes running
    fakes = set(launcher.pids)
    assert fakes and all(alive(p) for p in fakes)
    launcher.pids.add(other.pid)
    try:
        launcher.cleanup()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in fakes) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in fakes) and other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_script_is_executable_bash():
    assert SCRIPT.exists()
    assert os.access(SCRIPT, os.X_OK)
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_default_launch_two_gpus(launcher):
    proc = launcher.run(gpus=2)
    assert proc.returncode == 0, proc.stderr
    assert proc.elapsed < 10, "the launcher must return at once, leaving the runs going"
    assert set(proc.runs) == {"cifar10", "cifar100"}

    for ds, gpu in (("cifar10", "0"), ("cifar100", "1")):
        run = proc.runs[ds]
        argv = launcher.argv(ds)
        assert alive(run["pid"]), f"printed PID {run['pid']} is not a running process"
        # The printed PID is the trainer process itself (nohup execs it).
        assert json.loads((launcher.argv_dir / f"{ds}.json").read_text())["pid"] == run["pid"]
        assert run["arch"] == "mamba_small"
        assert run["device"] == f"GPU {gpu}"

        assert argv[0] == "train_mamba_baseline.py"
        assert opt(argv, "--dataset") == ds
        assert opt(argv, "--arch") == "mamba_small"
        assert opt(argv, "--gpu") == gpu
        assert "--device" not in argv
        assert opt(argv, "--epochs") == "300"
        assert opt(argv, "--batch_size") == "128"
        assert opt(argv, "--data_dir") == f"./datasets/{ds}"
        assert opt(argv, "--save_dir") == f"{launcher.ckpt_dir}/{ds}"
        assert opt(argv, "--log_dir") == str(launcher.log_dir)
        assert opt(argv, "--lr") == "1e-3"
        assert opt(argv, "--weight_decay") == "0.05"
        assert opt(argv, "--warmup_epochs") == "20"
        assert opt(argv, "--mixup_alpha") == "0.8"
        assert opt(argv, "--cutmix_alpha") == "1.0"
        assert opt(argv, "--label_smoothing") == "0.1"
        assert "--resume" not in argv
        assert argv[-1] == "--cuda_graphs"  # CUDA_GRAPHS=auto: one process a GPU at batch 128

        ts = opt(argv, "--run_id")
        assert re.fullmatch(TS_RE, ts)
        assert run["log"] == f"{launcher.log_dir}/mamba_small_{ds}_baseline_{ts}.log"
        assert run["out"] == f"{launcher.log_dir}/mamba_small_{ds}_baseline_{ts}.out"
        assert Path(run["out"]).exists()

    # One timestamp per launch.
    assert opt(launcher.argv("cifar10"), "--run_id") == opt(launcher.argv("cifar100"), "--run_id")
    # How to follow / stop / resume.
    assert f"tail -f {launcher.log_dir}/*.log" in proc.stdout
    assert re.search(r"kill .*\b%d\b" % proc.runs["cifar10"]["pid"], proc.stdout)
    assert "RESUME=true ./run_mamba_baseline.sh" in proc.stdout
    # The fake trainer's stdout lands in the .out file.
    out = Path(proc.runs["cifar10"]["out"])
    deadline = time.monotonic() + 10
    while "fake trainer started" not in out.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "fake trainer started cifar10" in out.read_text()


def test_quick_test_uses_30_epochs(launcher):
    proc = launcher.run(RUN_QUICK_TEST="true", EPOCHS="123")
    assert proc.returncode == 0, proc.stderr
    for ds in ("cifar10", "cifar100"):
        argv = launcher.argv(ds)
        assert opt(argv, "--epochs") == "30"
        assert opt(argv, "--warmup_epochs") == "3"


def test_epochs_and_arch_overrides(launcher):
    proc = launcher.run(EPOCHS="7", ARCH_CIFAR100="mamba_tiny", BATCH_SIZE="64", DATA_ROOT="/data")
    assert proc.returncode == 0, proc.stderr
    argv = launcher.argv("cifar100")
    assert opt(argv, "--epochs") == "7"
    assert opt(argv, "--arch") == "mamba_tiny"
    assert opt(argv, "--batch_size") == "64"
    assert opt(argv, "--data_dir") == "/data/cifar100"
    ts = opt(argv, "--run_id")
    assert proc.runs["cifar100"]["log"] == f"{launcher.log_dir}/mamba_tiny_cifar100_baseline_{ts}.log"
    assert opt(launcher.argv("cifar10"), "--arch") == "mamba_small"


def test_only_cifar10(launcher):
    proc = launcher.run(RUN_CIFAR100="false")
    assert proc.returncode == 0, proc.stderr
    assert set(proc.runs) == {"cifar10"}
    assert opt(launcher.argv("cifar10"), "--gpu") == "0"
    time.sleep(0.5)
    assert launcher.started() == ["cifar10"]


def test_one_gpu_puts_both_runs_on_gpu0(launcher):
    proc = launcher.run(gpus=1)
    assert proc.returncode == 0, proc.stderr
    assert "one GPU" in proc.stdout
    assert opt(launcher.argv("cifar10"), "--gpu") == "0"
    assert opt(launcher.argv("cifar100"), "--gpu") == "0"
    assert alive(proc.runs["cifar10"]["pid"]) and alive(proc.runs["cifar100"]["pid"])


def test_explicit_gpus(launcher):
    proc = launcher.run(gpus=4, GPU_CIFAR10="3", GPU_CIFAR100="2")
    assert proc.returncode == 0, proc.stderr
    assert opt(launcher.argv("cifar10"), "--gpu") == "3"
    assert opt(launcher.argv("cifar100"), "--gpu") == "2"


@pytest.mark.parametrize("gpus,overrides,bad", [
    (2, {"GPU_CIFAR10": "2"}, "2"),
    (2, {"GPU_CIFAR100": "5"}, "5"),
    (1, {"RUN_CIFAR10": "false"}, "1"),  # CIFAR-100 alone keeps its GPU 1
])
def test_gpu_index_out_of_range(launcher, gpus, overrides, bad):
    proc = launcher.run(gpus=gpus, **overrides)
    assert proc.returncode == 2
    assert proc.runs == {}
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert f"={bad}" in err[0] and f"only {gpus} GPU" in err[0]
    time.sleep(0.5)
    assert launcher.started() == []
    assert not list(launcher.log_dir.glob("*.out"))


def test_no_nvidia_smi_fails(launcher):
    proc = launcher.run(nvidia_smi=False)
    assert proc.returncode != 0
    assert "no GPU found" in proc.stderr
    assert proc.runs == {}
    time.sleep(0.3)
    assert launcher.started() == []


def test_zero_gpus_fails(launcher):
    proc = launcher.run(gpus=0)
    assert proc.returncode != 0
    assert "no GPU found" in proc.stderr
    assert launcher.started() == []


@pytest.mark.parametrize("nvidia_smi", [False, True])
def test_allow_cpu(launcher, nvidia_smi):
    proc = launcher.run(gpus=0, nvidia_smi=nvidia_smi, ALLOW_CPU="true")
    assert proc.returncode == 0, proc.stderr
    for ds in ("cifar10", "cifar100"):
        argv = launcher.argv(ds)
        assert opt(argv, "--device") == "cpu"
        assert "--gpu" not in argv
        assert proc.runs[ds]["device"] == "cpu"


def test_allow_cpu_still_uses_gpus_when_present(launcher):
    proc = launcher.run(gpus=2, ALLOW_CPU="true")
    assert proc.returncode == 0, proc.stderr
    argv = launcher.argv("cifar100")
    assert opt(argv, "--gpu") == "1"
    assert "--device" not in argv


def test_resume_passes_resume_auto(launcher):
    proc = launcher.run(RESUME="true")
    assert proc.returncode == 0, proc.stderr
    for ds in ("cifar10", "cifar100"):
        assert opt(launcher.argv(ds), "--resume") == "auto"


def test_extra_args_are_appended_and_word_split(launcher):
    proc = launcher.run(RUN_CIFAR10="false", GPU_CIFAR100="0", EXTRA_ARGS="--num_workers 8  --amp")
    assert proc.returncode == 0, proc.stderr
    argv = launcher.argv("cifar100")
    assert argv[-3:] == ["--num_workers", "8", "--amp"]


@pytest.mark.parametrize("extra,setting", [
    ("--arch mamba_tiny", "ARCH_CIFAR10 / ARCH_CIFAR100"), ("--arch=mamba_tiny", "ARCH_CIFAR10 / ARCH_CIFAR100"),
    ("--num_workers 2 --dataset cifar100", "RUN_CIFAR10 / RUN_CIFAR100"), ("--epochs=5", "EPOCHS"),
    ("--batch_size 64", "BATCH_SIZE"), ("--save_dir /x", "CKPT_DIR"), ("--log_dir=/x", "LOG_DIR"),
    ("--run_id a", "RUN_ID"), ("--device cpu", "ALLOW_CPU=true"), ("--gpu 1", "GPU_CIFAR10 / GPU_CIFAR100"),
    ("--data_dir /d", "DATA_ROOT"), ("--resume auto", "RESUME=true"), ("--lr 5e-4", "LR"),
    ("--weight_decay=0.1", "WEIGHT_DECAY"), ("--warmup_epochs 5", "WARMUP_EPOCHS"),
    ("--mixup_alpha 0", "MIXUP_ALPHA"), ("--cutmix_alpha 0", "CUTMIX_ALPHA"),
    ("--label_smoothing 0", "LABEL_SMOOTHING"), ("--cuda_graphs", "CUDA_GRAPHS=true")])
def test_extra_args_may_not_set_what_the_launcher_passes(launcher, extra, setting):
    """The launcher reports each run's log path and device from its own settings: EXTRA_ARGS overriding one of
    them would make the report wrong (issue 23), so it is refused, naming the setting to use."""
    proc = launcher.run(EXTRA_ARGS=extra)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    option = [w for w in extra.split() if w.startswith("--") and not w.startswith("--num")][0].split("=")[0]
    assert len(err) == 1 and f"EXTRA_ARGS sets {option}," in err[0] and f"use {setting}" in err[0], proc.stderr
    time.sleep(0.3)
    assert launcher.started() == [] and proc.runs == {}


def test_the_recipe_and_run_id_come_from_the_environment(launcher):
    proc = launcher.run(RUN_CIFAR100="false", LR="5e-4", WEIGHT_DECAY="0.1", WARMUP_EPOCHS="2", MIXUP_ALPHA="0",
                        CUTMIX_ALPHA="0.5", LABEL_SMOOTHING="0", RUN_ID="ablation1", EXTRA_ARGS="--arch_note=x")
    assert proc.returncode == 0, proc.stderr
    argv = launcher.argv("cifar10")
    assert [opt(argv, o) for o in ("--lr", "--weight_decay", "--warmup_epochs", "--mixup_alpha", "--cutmix_alpha",
                                   "--label_smoothing", "--run_id")] == ["5e-4", "0.1", "2", "0", "0.5", "0",
                                                                        "ablation1"]
    assert proc.runs["cifar10"]["log"] == f"{launcher.log_dir}/mamba_small_cifar10_baseline_ablation1.log"
    assert argv[-1] == "--arch_note=x"  # an option that merely starts like one the launcher passes goes through
    quick = launcher.run(RUN_QUICK_TEST="true", WARMUP_EPOCHS="1", RUN_CIFAR10="false", GPU_CIFAR100="0")
    assert quick.returncode == 0 and opt(launcher.argv("cifar100"), "--warmup_epochs") == "1"


@pytest.mark.parametrize("var,value", [("LR", "fast"), ("WARMUP_EPOCHS", "-1"), ("RUN_ID", "a b/c")])
def test_bad_recipe_value_or_run_id_exits_2(launcher, var, value):
    proc = launcher.run(**{var: value})
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and var in err[0], proc.stderr
    assert launcher.started() == []


@pytest.mark.parametrize("settings", [
    dict(BATCH_SIZE="256"), dict(CUDA_GRAPHS="false"), dict(gpus=4, NPROC="2"),
    dict(gpus=0, ALLOW_CPU="true"), dict(EXTRA_ARGS="--no_compile"), dict(EXTRA_ARGS="--deterministic"),
    dict(EXTRA_ARGS="--accum_steps=2"), dict(EXTRA_ARGS="--num_workers 2 --accum_steps 1")],
    ids=["batch256", "false", "nproc2", "cpu", "no_compile", "deterministic", "accum2", "accum1"])
def test_cuda_graphs_auto_stays_off_where_not_shown_to_help_or_excluded(launcher, settings):
    """CUDA_GRAPHS=auto passes --cuda_graphs only to one-process GPU runs at batch <= 128 that compile and do not
    accumulate (the trainer's conditions for graphs, and the batch at which they were measured faster)."""
    proc = launcher.run(**settings)
    assert proc.returncode == 0, proc.stderr
    assert "--cuda_graphs" not in launcher.argv("cifar10")


def test_cuda_graphs_true_passes_them_at_any_batch(launcher):
    proc = launcher.run(CUDA_GRAPHS="true", BATCH_SIZE="512", EXTRA_ARGS="--accum_steps 1")
    assert proc.returncode == 0, proc.stderr
    for ds in ("cifar10", "cifar100"):
        assert launcher.argv(ds).count("--cuda_graphs") == 1


@pytest.mark.parametrize("settings,message", [
    (dict(CUDA_GRAPHS="true", gpus=4, NPROC="2"), "CUDA_GRAPHS=true needs NPROC=1"),
    (dict(CUDA_GRAPHS="true", gpus=0, ALLOW_CPU="true"), "CUDA_GRAPHS=true needs a GPU"),
    (dict(CUDA_GRAPHS="yes"), "CUDA_GRAPHS must be auto, true or false, got 'yes'")])
def test_cuda_graphs_that_cannot_run_exit_2(launcher, settings, message):
    proc = launcher.run(**settings)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], proc.stderr
    time.sleep(0.3)
    assert launcher.started() == [] and proc.runs == {}


@pytest.mark.parametrize("var", ["RUN_CIFAR10", "RUN_CIFAR100", "RUN_QUICK_TEST", "ALLOW_CPU", "RESUME"])
def test_bad_boolean_exits_2(launcher, var):
    proc = launcher.run(**{var: "yes"})
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and var in err[0] and "true or false" in err[0], proc.stderr
    time.sleep(0.3)
    assert launcher.started() == []


def test_nothing_requested_exits_2(launcher):
    proc = launcher.run(RUN_CIFAR10="false", RUN_CIFAR100="false")
    assert proc.returncode == 2
    assert "nothing to run" in proc.stderr
    assert launcher.started() == []


def test_missing_python_exits_2(launcher):
    proc = launcher.run(PYTHON="/nonexistent/python3")
    assert proc.returncode == 2
    assert "PYTHON" in proc.stderr
    assert launcher.started() == []


def test_nproc_runs_each_dataset_over_its_own_gpus_with_torchrun(launcher):
    proc = launcher.run(gpus=4, NPROC=2)
    assert proc.returncode == 0, proc.stderr
    for ds, gpus in (("cifar10", "0,1"), ("cifar100", "2,3")):
        argv = launcher.argv(ds)
        assert argv[:4] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"] and argv[4] == "2"
        assert "--gpu" not in argv
        assert f"GPUs {gpus}" in proc.runs[ds]["device"]


def test_nproc_needing_more_gpus_than_present_starts_nothing(launcher):
    proc = launcher.run(gpus=2, NPROC=2)
    assert proc.returncode == 2 and "needs 4 GPUs" in proc.stderr
    assert proc.runs == {} and not list(launcher.argv_dir.iterdir())


def test_nproc_must_be_a_positive_integer(launcher):
    proc = launcher.run(gpus=2, NPROC="two")
    assert proc.returncode == 2 and "NPROC" in proc.stderr
