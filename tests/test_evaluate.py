"""evaluate.py, models/weights.py (load_model, export) and models/cost.py on tiny generated runs (CPU)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import train_mamba_baseline
from conftest import ROOT, TINY, make_cifar
from models import load_model
from models.cost import macs_per_image, parameter_groups
from models.vim import build_model
from models.weights import EXPORT_FORMAT, export_weights

# the conv stem at stride 4 (65 tokens), the trainer's tokenizer from scratch
i = TINY.index("--patch_size")
CONV = TINY[:i] + TINY[i + 2:] + ["--stem", "conv", "--patch_size", "4"]


def train(base, data_dir, *extra, dataset="cifar10"):
    argv = CONV + ["--data_dir", data_dir, "--save_dir", str(base / "ckpt"), "--log_dir", str(base / "logs"),
                   "--run_id", "t", "--dataset", dataset, *extra]
    assert train_mamba_baseline.main(argv) == 0
    return str(base / "ckpt" / f"mamba_tiny_{dataset}_last.pth")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch conv-stem run with EMA; -> dict(path, data, model: the trainer's own model as it ended)."""
    from training import engine
    base = tmp_path_factory.mktemp("run")
    data = make_cifar(str(base / "data"), "cifar10", n_train=40, n_test=16)
    runs = []
    real_setup = engine.Run.setup

    def setup(self):
        real_setup(self)
        runs.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine.Run, "setup", setup)
        path = train(base, data, "--epochs", "2", "--warmup_epochs", "0", "--model_ema", "--model_ema_decay", "0.5")
    return dict(path=path, data=data, base=base, model=runs[0].model.eval())


def evaluate_json(tmp_path, *argv):
    out = tmp_path / "out.json"
    assert evaluate.main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------------
# Accuracy: what the trainer measured
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ema", [False, True])
def test_reproduces_the_trainers_last_test(trained, tmp_path, ema):
    res = evaluate_json(tmp_path, trained["path"], "--data_dir", trained["data"], "--batch_size", "5", "--no_speed",
                        *(["--ema"] if ema else []))
    last = torch.load(trained["path"], weights_only=True)["position"]["history"][-1]
    assert res["top1"] == last["ema_acc" if ema else "test_acc"]
    assert res["loss"] == pytest.approx(last["ema_loss" if ema else "test_loss"], rel=1e-5)
    assert res["weights"] == ("ema" if ema else "model")
    keys = {"top1", "top5", "per_class", "params", "flops_per_image", "images_per_s", "latency_ms", "epoch", "config"}
    assert keys <= set(res) and res["epoch"] == 2 and res["config"]["stem"] == "conv"
    assert res["top5"] is None and len(res["per_class"]) == 10 and res["images_per_s"] is None
    assert res["params"]["total"] == sum(p.numel() for p in trained["model"].parameters())


def test_an_older_checkpoint_without_its_normalisation_gets_the_trainers_rule(trained, tmp_path):
    from training.data import MEAN_STD
    ckpt = torch.load(trained["path"], weights_only=True)
    assert tuple(ckpt["normalisation"]["mean"]) == MEAN_STD["cifar10"][0]
    del ckpt["normalisation"]
    torch.save(ckpt, tmp_path / "old.pth")
    old = evaluate_json(tmp_path, str(tmp_path / "old.pth"), "--data_dir", trained["data"], "--no_speed")
    new = evaluate_json(tmp_path, trained["path"], "--data_dir", trained["data"], "--no_speed")
    assert (old["top1"], old["loss"]) == (new["top1"], new["loss"])
    assert evaluate.main([str(tmp_path / "old.pth"), "--export", str(tmp_path / "w.pth")]) == 0
    assert tuple(torch.load(tmp_path / "w.pth", weights_only=True)["config"]["std"]) == MEAN_STD["cifar10"][1]


def test_ema_and_trained_weights_differ(trained):
    a, b = load_model(trained["path"]), load_model(trained["path"], ema=True)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_cifar100_prints_top5_and_speed_and_plots(tmp_path, capsys):
    data = make_cifar(str(tmp_path / "data"), "cifar100", n_train=40, n_test=16)
    path = train(tmp_path, data, "--epochs", "1", "--warmup_epochs", "0", dataset="cifar100")
    capsys.readouterr()
    res = evaluate_json(tmp_path, path, "--data_dir", data, "--batch_size", "4", "--plot", str(tmp_path / "cm.png"))
    out = capsys.readouterr().out
    assert "top-5" in out and "MACs per image" in out and "images/s" in out and "not counted" in out
    assert 0 <= res["top1"] <= res["top5"] <= 100 and len(res["per_class"]) == 100
    per_class = [c for c in res["per_class"] if c is not None]
    assert len(per_class) <= 16 and all(0 <= c <= 100 for c in per_class)
    assert res["images_per_s"] > 0 and res["latency_ms"] > 0
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------------
# Parameters and compute
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(patch_size=8), dict(stem="conv", patch_size=2), dict(patch_size=4)])
def test_parameter_groups_add_up(overrides):
    model = build_model("mamba_tiny", 100, embed_dim=24, depth=3, **overrides)
    groups = parameter_groups(model)
    assert groups["total"] == sum(p.numel() for p in model.parameters())
    assert sum(v for k, v in groups.items() if k != "total") == groups["total"]
    assert groups["head"] == 24 * 100 + 100 and groups["final_norm"] == 24 and groups["blocks.norm"] == 3 * 24
    assert groups["blocks.A/D"] == 3 * 2 * (48 * 16 + 48)  # A_log, A_b_log (E x N) and D, D_b (E), per block


def hand_count(D, depth, img, classes, stem, p, N=16, K=4, hidden=64):
    """MACs per image written out from the architecture (models/cost.py's convention)."""
    E, R = 2 * D, math.ceil(D / 16)
    M = (img // p) ** 2
    L = M + 1
    if stem == "patch":
        tokenizer = M * 3 * p * p * D
    else:  # 3x3 conv at full size, pool /2, 3x3 conv, (pool /2 at stride 4)
        tokenizer = img * img * 3 * 9 * hidden + (img // 2) ** 2 * hidden * 9 * D
    direction = L * E * (R + 2 * N) + L * R * E + L * E * K + 4 * E * L * N + 2 * E * L
    block = L * D * 2 * E + 2 * direction + L * E * D
    return tokenizer + depth * block + D * classes


@pytest.mark.parametrize("stem, p", [("patch", 8), ("patch", 4), ("conv", 4), ("conv", 2)])
def test_macs_match_a_hand_count(stem, p):
    model = build_model("mamba_tiny", 10, embed_dim=16, depth=2, stem=stem, patch_size=p)
    macs = macs_per_image(model)
    assert macs["total"] == hand_count(16, 2, 32, 10, stem, p)
    assert macs["total"] == macs["matrix"] + macs["conv1d"] + macs["scan"]


def test_macs_count_the_reference_path_whatever_the_kernels():
    """With the Triton kernels set, the mixer's convs and x_proj run in one custom op, whose matrix products the
    counter would not see: counting runs the PyTorch path and then puts the kernels back."""
    pytest.importorskip("triton")
    model = build_model("mamba_tiny", 10, embed_dim=16, depth=2, patch_size=8)
    model.set_kernels("triton")
    assert macs_per_image(model)["total"] == hand_count(16, 2, 32, 10, "patch", 8)
    assert all(layer.mixer.scan_backend == "triton" for layer in model.layers)


def test_macs_leave_the_scan_to_the_formula_and_the_model_as_it_was():
    """The reference scan's einsum must not reach the counter (it would be counted twice: the counter's share is the
    hand count less the two formula parts); counting leaves the model's mode and weights as they were."""
    model = build_model("mamba_tiny", 10, embed_dim=16, depth=2, patch_size=8).train()
    x = torch.randn(2, 3, 32, 32)
    before = model.eval()(x)
    model.train()
    macs = macs_per_image(model)
    assert model.training
    E, L, N, K = 32, 17, 16, 4
    per_direction = 4 * E * L * N + 2 * E * L
    assert (macs["conv1d"], macs["scan"]) == (2 * 2 * E * L * K, 2 * 2 * per_direction)
    assert macs["matrix"] == hand_count(16, 2, 32, 10, "patch", 8) - macs["conv1d"] - macs["scan"]
    torch.testing.assert_close(model.eval()(x), before, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------
# load_model and the exported file
# ------------------------------------------------------------------------------------------------------

def test_load_model_gives_the_trainers_logits(trained):
    model = load_model(trained["path"])
    assert not model.training and next(model.parameters()).device.type == "cpu"
    assert model.cfg == trained["model"].cfg
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained["model"](x), rtol=0, atol=0)


def test_load_model_imports_no_training_code(trained):
    code = ("import sys; from models import load_model; m = load_model(sys.argv[1]); "
            "bad = [n for n in sys.modules if n == 'training' or n.startswith('training.')]; "
            "assert not bad, bad; print(type(m).__name__, m.training)")
    out = subprocess.run([sys.executable, "-c", code, trained["path"]], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "VisionMamba False"


def test_export_round_trips_through_load_model_and_evaluate(trained, tmp_path, capsys):
    out = tmp_path / "w.pth"
    assert evaluate.main([trained["path"], "--export", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"format", "model", "config", "epoch", "weights"} and saved["format"] == EXPORT_FORMAT
    assert all(v.dtype == torch.float32 for v in saved["model"].values())
    assert {"stem", "patch_size", "img_size", "embed_dim", "depth", "num_classes", "arch", "dataset", "mean",
            "std"} <= set(saved["config"]) and saved["config"]["stem"] == "conv"
    assert os.path.getsize(out) < os.path.getsize(trained["path"]) / 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(x), trained["model"](x), rtol=0, atol=0)
    a = evaluate_json(tmp_path, str(out), "--data_dir", trained["data"], "--no_speed")
    b = evaluate_json(tmp_path, trained["path"], "--data_dir", trained["data"], "--no_speed")
    assert (a["top1"], a["loss"], a["epoch"]) == (b["top1"], b["loss"], b["epoch"])

    ema = tmp_path / "ema.pth"
    assert evaluate.main([trained["path"], "--ema", "--export", str(ema)]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_model(ema)(x), load_model(trained["path"], ema=True)(x), rtol=0, atol=0)


def test_mamba_small_export_is_under_110_mb(tmp_path):
    model = build_model("mamba_small", 10, stem="conv", patch_size=2)
    config = dict(arch="mamba_small", dataset="cifar10", num_classes=10, embed_dim=None, depth=None, patch_size=2,
                  input_size=32, stem="conv", drop_path=0.1)
    ckpt = tmp_path / "small.pth"
    sd = model.state_dict()
    ema = {k: v.clone() for k, v in sd.items()}  # its own storage, as in a real checkpoint
    torch.save({"format": "vim-cifar-checkpoint/1", "model": sd, "model_ema": ema, "optimizer": {},
                "position": {"epoch": 1}, "rng": {}, "config": config, "normalisation": None}, ckpt)
    size = export_weights(str(ckpt), str(tmp_path / "w.pth"), normalisation=lambda info: ((0.5,) * 3, (0.25,) * 3))
    assert size < 110e6 and size < os.path.getsize(ckpt) * 0.6
    assert load_model(tmp_path / "w.pth").cfg == model.cfg


def test_pretrained_run_starts_from_an_export(trained, tmp_path, capsys):
    exported = tmp_path / "w.pth"
    export_weights(trained["path"], str(exported))
    start = torch.load(exported, weights_only=True)["model"]
    data = make_cifar(str(tmp_path / "data"), "cifar10", n_train=16, n_test=8)
    argv = ["--arch", "mamba_tiny", "--device", "cpu", "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "8",
            "--no_progress", "--data_dir", data, "--save_dir", str(tmp_path / "c"), "--log_dir", str(tmp_path / "l"),
            "--run_id", "ft", "--lr", "1e-30", "--min_lr", "0", "--no_use_randaugment", "--pretrained", str(exported)]
    assert train_mamba_baseline.main(argv) == 0
    ck = torch.load(tmp_path / "c" / "mamba_tiny_cifar10_last.pth", weights_only=True)
    assert (ck["config"]["stem"], ck["config"]["patch_size"], ck["config"]["input_size"]) == ("conv", 4, 32)
    assert tuple(ck["normalisation"]["mean"]) == tuple(torch.load(exported, weights_only=True)["config"]["mean"])
    for k, v in start.items():  # lr 1e-30: every tensor, the head included (10 classes both), is the export's
        torch.testing.assert_close(ck["model"][k], v, rtol=0, atol=1e-6, msg=k)
    log = (tmp_path / "l" / "mamba_tiny_cifar10_baseline_ft.log").read_text()
    assert "head kept" in log and "the file's normalisation" in log

    argv[argv.index(str(tmp_path / "c"))] = str(tmp_path / "c2")
    capsys.readouterr()
    assert train_mamba_baseline.main(argv + ["--stem", "patch"]) == 2  # the file's tokenizer is the conv stem
    assert "holds the conv stem, not the --stem patch asked for" in capsys.readouterr().err
    assert train_mamba_baseline.main(argv + ["--stem", "conv"]) == 0  # naming the file's own tokenizer is fine

    data100 = make_cifar(str(tmp_path / "d100"), "cifar100", n_train=16, n_test=8)
    argv[argv.index(data)] = data100
    argv[argv.index(str(tmp_path / "c2"))] = str(tmp_path / "c100")
    assert train_mamba_baseline.main(argv + ["--dataset", "cifar100"]) == 0
    ck = torch.load(tmp_path / "c100" / "mamba_tiny_cifar100_last.pth", weights_only=True)
    assert ck["model"]["head.weight"].shape == (100, 16)
    torch.testing.assert_close(ck["model"]["layers.1.mixer.in_proj.weight"], start["layers.1.mixer.in_proj.weight"],
                               rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2
# ------------------------------------------------------------------------------------------------------

def one_line_error(capsys, argv, *expected):
    assert evaluate.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate.py: error:"), captured.err
    for text in expected:
        assert text in err[0], err[0]


def test_errors(trained, tmp_path, capsys):
    path, data = trained["path"], trained["data"]
    one_line_error(capsys, [str(tmp_path / "missing.pth")], "no checkpoint at")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    one_line_error(capsys, [str(tmp_path / "junk.pth")], "not a checkpoint of this project")
    torch.save({"model": {}}, tmp_path / "other.pth")
    one_line_error(capsys, [str(tmp_path / "other.pth")], "format tag")
    one_line_error(capsys, [path, "--data_dir", str(tmp_path / "empty")], "cifar10 files missing")
    data100 = make_cifar(str(tmp_path / "d100"), "cifar100", n_train=5, n_test=4)
    one_line_error(capsys, [path, "--data_dir", data100], "holds cifar100", "trained on cifar10")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["dataset"] = "cifar100"
    torch.save(ckpt, tmp_path / "relabelled.pth")
    one_line_error(capsys, [str(tmp_path / "relabelled.pth")], "'cifar100' but has 10 classes")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_ema"] = None
    torch.save(ckpt, tmp_path / "no_ema.pth")
    one_line_error(capsys, [str(tmp_path / "no_ema.pth"), "--ema", "--data_dir", data], "no EMA weights")
    export_weights(path, str(tmp_path / "w.pth"))
    one_line_error(capsys, [str(tmp_path / "w.pth"), "--ema"], "exported file", "leave out --ema")
    for bad in ("0", "-3", "x"):
        one_line_error(capsys, [path, "--batch_size", bad], "--batch_size")
    one_line_error(capsys, [path, "--device", "tpu"], "--device")
    one_line_error(capsys, [path, "--no_such_flag"], "unrecognized arguments")
