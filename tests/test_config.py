"""training/config.py: every flag, its default, its checks; and how the command line reports bad input."""
import os
import subprocess
import sys

import pytest

import train_mamba_baseline
from conftest import ROOT
from training.config import UsageError, build_parser, parse_config

SPEC_DEFAULTS = dict(
    dataset="cifar10", arch="mamba_small", epochs=300, batch_size=128, lr=1e-3, weight_decay=0.05,
    warmup_epochs=20, use_randaugment=True, use_mixup=True, use_cutmix=True, mixup_alpha=0.8, cutmix_alpha=1.0,
    label_smoothing=0.1, gpu=0, save_freq=50, log_dir="./logs_mamba_baseline", data_dir="./datasets/cifar10",
    save_dir="./checkpoint/mamba_baseline/cifar10", num_classes=10,
    # the rest of the flags
    embed_dim=None, depth=None, patch_size=2, drop_path=0.1, scan="auto", accum_steps=1, clip_grad=0.0,
    min_lr=1e-5, warmup_lr=1e-6, eval_batch_size=1024, seed=0, device="auto", precision="auto", max_bad_steps=20,
    deterministic=False, compile=None, use_crop=True, use_flip=True, num_workers=0, train_subset=0,
    test_subset=0, resume=None, save_every_minutes=0.0, no_progress=False, model_ema=False, model_ema_decay=0.9999,
    stem="conv", stem_auto=True, patch_size_auto=True, cuda_graphs=False, val_size=0, split_seed=0,
)


def test_defaults():
    cfg = parse_config([])
    for key, value in SPEC_DEFAULTS.items():
        assert getattr(cfg, key) == value, key
    assert cfg.run_id  # a timestamp unless given


def test_dataset_picks_default_folders():
    cfg = parse_config(["--dataset", "cifar100"])
    assert cfg.num_classes == 100
    assert cfg.data_dir == "./datasets/cifar100"
    assert cfg.save_dir == "./checkpoint/mamba_baseline/cifar100"
    cfg = parse_config(["--dataset", "cifar100", "--data_dir", "/d", "--save_dir", "/s"])
    assert (cfg.data_dir, cfg.save_dir) == ("/d", "/s")


# flag -> (value on the command line, the parsed value); every value differs from the default
EVERY_FLAG = {
    "--dataset": ("cifar100", "cifar100"), "--arch": ("mamba_base", "mamba_base"), "--epochs": ("7", 7),
    "--batch_size": ("32", 32), "--lr": ("0.002", 0.002), "--weight_decay": ("0.1", 0.1),
    "--warmup_epochs": ("2.5", 2.5), "--mixup_alpha": ("0.3", 0.3), "--cutmix_alpha": ("0.4", 0.4),
    "--label_smoothing": ("0.2", 0.2), "--gpu": ("3", 3), "--save_dir": ("/tmp/s", "/tmp/s"),
    "--embed_dim": ("48", 48), "--depth": ("6", 6), "--patch_size": ("8", 8), "--drop_path": ("0.3", 0.3),
    "--scan": ("ref", "ref"), "--accum_steps": ("4", 4), "--clip_grad": ("1.5", 1.5), "--min_lr": ("2e-6", 2e-6),
    "--warmup_lr": ("3e-7", 3e-7), "--eval_batch_size": ("99", 99), "--seed": ("42", 42),
    "--device": ("cpu", "cpu"), "--precision": ("bf16", "bf16"), "--max_bad_steps": ("5", 5),
    "--data_dir": ("/tmp/d", "/tmp/d"), "--num_workers": ("2", 2), "--train_subset": ("100", 100),
    "--test_subset": ("50", 50), "--resume": ("auto", "auto"), "--save_freq": ("10", 10),
    "--save_every_minutes": ("1.5", 1.5), "--log_dir": ("/tmp/l", "/tmp/l"), "--run_id": ("abc", "abc"),
    "--input_size": ("64", 64), "--model_ema_decay": ("0.999", 0.999), "--val_size": ("200", 200),
    "--split_seed": ("3", 3),
}
# --pretrained is parsed here; its effect (and its refusals) are tested in test_finetune_cli.py.
PRETRAINED = {"--pretrained": ("/tmp/vim.pth", "/tmp/vim.pth")}
# --stem conv takes --patch_size 2 or 4 (its stride): parsed in test_conv_stem, its model in test_model.py; with
# --pretrained the file's tokenizer must match (test_evaluate.py, test_finetune_cli.py)
STEM = {"--stem": ("conv", "conv")}
SWITCHES = ("use_randaugment", "use_mixup", "use_cutmix", "use_crop", "use_flip")  # on by default
SWITCHES_OFF = {f"--no_{s}": s for s in SWITCHES}
SWITCHES_ON = {f"--{s}": s for s in SWITCHES}
FLAGS_ON = {"--deterministic": "deterministic", "--no_progress": "no_progress", "--compile": "compile",
            "--model_ema": "model_ema"}
CUDA_GRAPHS = {"--cuda_graphs"}  # excludes --accum_steps > 1 and --no_compile: parsed in test_compile_defaults...


def test_every_flag_parses_to_its_field():
    argv = [x for flag, (text, _) in EVERY_FLAG.items() for x in (flag, text)] + list(FLAGS_ON)
    cfg = parse_config(argv)
    for flag, (_, value) in EVERY_FLAG.items():
        assert getattr(cfg, flag[2:]) == value, flag
        assert value != SPEC_DEFAULTS.get(flag[2:]), f"{flag}: the test value must differ from the default"
    for flag, field in FLAGS_ON.items():
        assert getattr(cfg, field) is True, flag
    assert cfg.num_classes == 100
    assert cfg.command == "train_mamba_baseline.py " + " ".join(argv)


def test_compile_defaults_to_the_engine_s_choice():
    """--compile / --no_compile set it; left out it is None, which the run resolves (on with CUDA, unless
    --deterministic; tests/test_cli.py)."""
    assert parse_config([]).compile is None
    assert parse_config(["--no_compile"]).compile is False
    assert parse_config(["--no_compile", "--compile"]).compile is True
    cfg = parse_config(["--cuda_graphs"])  # CUDA graphs are a torch.compile mode: they turn compile on
    assert cfg.cuda_graphs is True and cfg.compile is True


def test_the_parser_has_no_untested_flag():
    known = set(EVERY_FLAG) | set(PRETRAINED) | set(STEM) | set(SWITCHES_OFF) | set(FLAGS_ON) | set(SWITCHES_ON) | \
        CUDA_GRAPHS | {"-h", "--help", "--no_compile"}
    flags = {s for a in build_parser()._actions for s in a.option_strings}
    assert flags == known, f"flags without a test: {flags - known}; tested but gone: {known - flags}"


@pytest.mark.parametrize("flag,field", list(SWITCHES_OFF.items()))
def test_each_no_use_switch_turns_only_its_switch_off(flag, field):
    cfg = parse_config([flag])
    assert getattr(cfg, field) is False
    for other in SWITCHES_OFF.values():
        if other != field:
            assert getattr(cfg, other) is True
    # the positive spelling is accepted and the last one wins
    assert getattr(parse_config([flag, "--" + field]), field) is True
    assert getattr(parse_config(["--" + field, flag]), field) is False


def test_odd_batch_allowed_without_mixing():
    assert parse_config(["--batch_size", "7", "--no_use_mixup", "--no_use_cutmix"]).batch_size == 7
    assert parse_config(["--batch_size", "7", "--mixup_alpha", "0", "--no_use_cutmix"]).batch_size == 7
    assert parse_config(["--batch_size", "7", "--mixup_alpha", "0", "--cutmix_alpha", "0"]).batch_size == 7


def test_edge_values_accepted():
    cfg = parse_config(["--warmup_epochs", "0", "--epochs", "1", "--label_smoothing", "0", "--weight_decay", "0",
                        "--drop_path", "0", "--patch_size", "32", "--min_lr", "0", "--warmup_lr", "0"])
    assert (cfg.warmup_epochs, cfg.epochs, cfg.patch_size) == (0, 1, 32)
    for p in (1, 2, 4, 8, 16, 32):
        assert parse_config(["--patch_size", str(p)]).patch_size == p
    assert parse_config(["--warmup_epochs", "4.5", "--epochs", "5"]).warmup_epochs == 4.5


BAD = {
    "unknown dataset": ["--dataset", "imagenet"],
    "unknown arch": ["--arch", "resnet50"],
    "zero epochs": ["--epochs", "0"],
    "negative epochs": ["--epochs", "-3"],
    "zero batch": ["--batch_size", "0"],
    "negative batch": ["--batch_size", "-8"],
    "zero lr": ["--lr", "0"],
    "negative lr": ["--lr", "-0.1"],
    "zero accum": ["--accum_steps", "0"],
    "negative accum": ["--accum_steps", "-2"],
    "warmup == epochs": ["--epochs", "20", "--warmup_epochs", "20"],
    "warmup > epochs": ["--epochs", "5", "--warmup_epochs", "10"],
    "warmup default vs few epochs": ["--epochs", "10"],
    "negative warmup": ["--warmup_epochs", "-1"],
    "odd batch with mixup": ["--batch_size", "7"],
    "odd batch with cutmix only": ["--batch_size", "7", "--no_use_mixup"],
    "odd batch with mixup only": ["--batch_size", "7", "--no_use_cutmix"],
    "patch 3": ["--patch_size", "3"],
    "patch 0": ["--patch_size", "0"],
    "patch 64": ["--patch_size", "64"],
    "patch -4": ["--patch_size", "-4"],
    "bad scan": ["--scan", "fast"],
    "bad device": ["--device", "tpu"],
    "bad precision": ["--precision", "fp16"],
    "unknown flag": ["--learning_rate", "0.1"],
    "positional": ["cifar10"],
    "not an int": ["--epochs", "ten"],
    "not a float": ["--lr", "fast"],
    "missing value": ["--epochs"],
    "zero eval batch": ["--eval_batch_size", "0"],
    "zero save_freq": ["--save_freq", "0"],
    "zero max_bad_steps": ["--max_bad_steps", "0"],
    "zero embed_dim": ["--embed_dim", "0"],
    "zero depth": ["--depth", "0"],
    "negative weight decay": ["--weight_decay", "-0.1"],
    "label smoothing 1": ["--label_smoothing", "1"],
    "negative mixup alpha": ["--mixup_alpha", "-1"],
    "drop path 1": ["--drop_path", "1"],
    "negative clip": ["--clip_grad", "-1"],
    "negative min_lr": ["--min_lr", "-1e-5"],
    "negative subset": ["--train_subset", "-1"],
    "negative gpu": ["--gpu", "-1"],
    "negative workers": ["--num_workers", "-1"],
    "negative save minutes": ["--save_every_minutes", "-1"],
    "ema decay 1": ["--model_ema", "--model_ema_decay", "1"],
    "ema decay 0": ["--model_ema_decay", "0"],
    "ema decay above 1": ["--model_ema", "--model_ema_decay", "1.5"],
    "negative ema decay": ["--model_ema_decay", "-0.5"],
    "ema decay nan": ["--model_ema_decay", "nan"],
    "unknown stem": ["--stem", "vit"],
    "conv stem with patch size 8": ["--stem", "conv", "--patch_size", "8"],
    "conv stem with patch size 1": ["--stem", "conv", "--patch_size", "1"],
    "conv stem, stride 2, odd input": ["--stem", "conv", "--patch_size", "2", "--input_size", "31"],
    "conv stem, input not divisible by 4": ["--stem", "conv", "--patch_size", "4", "--input_size", "30"],
    "conv stem (stride 2 by default), odd input": ["--stem", "conv", "--input_size", "31"],
    "cuda graphs without compile": ["--cuda_graphs", "--no_compile"],
    "cuda graphs, then no compile": ["--no_compile", "--cuda_graphs"],
    "cuda graphs with accumulation": ["--cuda_graphs", "--accum_steps", "2"],
}


@pytest.mark.parametrize("argv", list(BAD.values()), ids=list(BAD))
def test_bad_input_raises_usage_error(argv):
    with pytest.raises(UsageError) as e:
        parse_config(argv)
    msg = str(e.value)
    assert msg and "\n" not in msg


def test_error_messages_name_the_problem():
    cases = {("--dataset", "imagenet"): "imagenet", ("--arch", "resnet50"): "resnet50", ("--epochs", "0"): "--epochs",
             ("--batch_size", "7"): "--batch_size", ("--learning_rate", "1"): "--learning_rate",
             ("--patch_size", "3"): "--patch_size", ("--scan", "fast"): "--scan",
             ("--model_ema_decay", "1"): "--model_ema_decay", ("--stem", "vit"): "--stem",
             ("--cuda_graphs", "--no_compile"): "--cuda_graphs"}
    for argv, needle in cases.items():
        with pytest.raises(UsageError, match=needle):
            parse_config(list(argv))


def test_main_reports_usage_error_in_one_line(capsys, tmp_path):
    save, logs = tmp_path / "ckpt", tmp_path / "logs"
    rc = train_mamba_baseline.main(["--epochs", "0", "--save_dir", str(save), "--log_dir", str(logs)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train_mamba_baseline.py: error: --epochs")
    assert not save.exists() and not logs.exists()


GROUPS = ("data", "model", "recipe", "augmentation", "run", "checkpoints", "fine-tuning")


def test_help_is_grouped_with_one_short_line_per_option():
    """--help: every option in one of the groups, each with one line of help that fits beside it."""
    parser = build_parser()
    groups = {g.title: g for g in parser._action_groups}
    assert set(GROUPS) <= set(groups)
    placed = [a for t in GROUPS for a in groups[t]._group_actions]
    assert {s for a in placed for s in a.option_strings} == \
        {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}
    for a in placed:
        assert a.help and "\n" not in a.help and len(a.help) <= 52, (a.option_strings, a.help)
    env = {**os.environ, "COLUMNS": "80"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_mamba_baseline.py"), "--help"], env=env,
                         capture_output=True, text=True, timeout=120).stdout
    for title in GROUPS:
        assert f"\n{title}:\n" in out
    body = out[out.index("\ndata:\n"):]
    assert not [line for line in body.splitlines() if line.startswith(" " * 4)], "a help line wrapped"


def test_an_abbreviated_option_is_refused():
    """--arc is not --arch: a prefix standing for an option would also slip past the launcher's EXTRA_ARGS check."""
    with pytest.raises(UsageError, match="--arc"):
        parse_config(["--arc", "mamba_tiny"])


# ---- the real command line: one line on stderr, exit code 2, no traceback, nothing written ----------------

CLI_BAD = {  # one per kind of check: the parser, the validation, the run's own setup (+ "defaults" below)
    "unknown flag": ["--bogus"],
    "warmup >= epochs": ["--epochs", "3"],
    "scan backend the CPU cannot run": ["--device", "cpu", "--scan", "cuda", "--batch_size", "8"],
    "EMA decay of 1": ["--model_ema", "--model_ema_decay", "1"],
    "CUDA graphs on the CPU": ["--device", "cpu", "--cuda_graphs", "--batch_size", "8"],
}


def test_cli_bad_input(tmp_path):
    script = os.path.join(ROOT, "train_mamba_baseline.py")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, argv in CLI_BAD.items():  # all at once: each process mostly waits on importing torch
        work = tmp_path / name.replace(" ", "_").replace(">=", "ge")
        work.mkdir()
        args = [sys.executable, script, *argv, "--data_dir", str(work / "data"), "--save_dir", str(work / "ckpt"),
                "--log_dir", str(work / "logs")]
        procs[name] = (work, subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True))
    # defaults for the folders: nothing may appear in the working directory either
    bare = tmp_path / "bare"
    bare.mkdir()
    procs["defaults"] = (bare, subprocess.Popen([sys.executable, script, "--lr", "-1"], cwd=bare, env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for name, (work, proc) in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{err}"
        lines = err.splitlines()
        assert len(lines) == 1, f"{name}: {err!r}"
        assert lines[0].startswith("train_mamba_baseline.py: error: "), name
        assert "Traceback" not in err + out, name
        assert sorted(os.listdir(work)) == [], f"{name} wrote {os.listdir(work)}"


def test_pretrained_leaves_the_shape_to_the_checkpoint():
    cfg = parse_config(["--pretrained", "/tmp/vim.pth"])
    assert cfg.pretrained == "/tmp/vim.pth" and cfg.patch_size is None and cfg.input_size is None
    assert parse_config(["--pretrained", "/tmp/vim.pth", "--input_size", "224"]).input_size == 224
    for extra in (["--patch_size", "16"], ["--embed_dim", "192"], ["--depth", "24"], ["--input_size", "0"]):
        with pytest.raises(UsageError):
            parse_config(["--pretrained", "/tmp/vim.pth", *extra])


def test_conv_stem():
    """--stem conv: 2x2-pixel tokens (the grid of patch 2) by default, at any even input size; with --patch_size 4
    (its stride) 4x4-pixel tokens, at any input size divisible by 4."""
    cfg = parse_config(["--stem", "conv"])
    assert (cfg.stem, cfg.patch_size, cfg.input_size, cfg.patch_size_auto) == ("conv", 2, 32, True)
    assert not parse_config(["--stem", "conv", "--patch_size", "2"]).patch_size_auto
    assert parse_config(["--stem", "conv", "--input_size", "64"]).input_size == 64
    assert parse_config(["--stem", "conv", "--patch_size", "4"]).patch_size == 4
    cfg = parse_config(["--stem", "conv", "--patch_size", "2", "--input_size", "30"])
    assert (cfg.stem, cfg.patch_size, cfg.input_size) == ("conv", 2, 30)
    with pytest.raises(UsageError, match="--patch_size 2 or 4"):
        parse_config(["--stem", "conv", "--patch_size", "8"])


@pytest.mark.parametrize("argv,stem,patch", [
    ([], "conv", 2), (["--input_size", "64"], "conv", 2), (["--patch_size", "4"], "patch", 4),
    (["--patch_size", "2"], "patch", 2), (["--pretrained", "/tmp/vim.pth"], "patch", None),
    (["--stem", "patch"], "patch", 4), (["--stem", "auto", "--patch_size", "8"], "patch", 8)])
def test_stem_auto(argv, stem, patch):
    """--stem auto (the default): the conv stem from scratch; patches when a patch size or official weights are given;
    an explicit --stem is kept as given (stem_auto False), which a resume then checks against the checkpoint."""
    cfg = parse_config(argv)
    assert (cfg.stem, cfg.patch_size) == (stem, patch)
    assert cfg.stem_auto == ("--stem" not in argv or "auto" in argv)


def test_patch_size_must_divide_the_input_size():
    assert parse_config(["--input_size", "64", "--patch_size", "16"]).patch_size == 16
    with pytest.raises(UsageError):
        parse_config(["--input_size", "48", "--patch_size", "32"])
