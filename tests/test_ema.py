"""--model_ema: the EMA of the weights (timm ModelEmaV3 with warmup), its evaluation, records, checkpoints and log.

Resume exactness with the EMA is in test_reliability.py (mid-epoch, and switching it on or off) and test_cli.py
(epoch boundary); DDP in test_distributed.py; the plot in test_plot_curves.py.
"""
import json
import math

import pytest
import torch

import train_mamba_baseline
import training.data as data_mod
from conftest import after_setup, tiny_args
from models.vim import build_model

FAST = ["--no_use_randaugment"]
EMA_KEYS = {"ema_loss", "ema_acc", "ema_acc5", "best_ema_acc"}


def run(base, data_dir, *extra, dataset="cifar10", expect=0):
    argv = tiny_args(base, data_dir, *(["--dataset", dataset] if dataset != "cifar10" else []), *extra)
    assert train_mamba_baseline.main(argv) == expect
    return base


def ckpt(base, kind="last", dataset="cifar10"):
    return torch.load(base / "ckpt" / f"mamba_tiny_{dataset}_{kind}.pth", map_location="cpu", weights_only=True)


def records(base, dataset="cifar10"):
    path = base / "logs" / f"mamba_tiny_{dataset}_baseline_test.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def log(base, dataset="cifar10"):
    return (base / "logs" / f"mamba_tiny_{dataset}_baseline_test.log").read_text()


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_off_by_default_no_ema_anywhere(tmp_path, cifar10_dir):
    r = run(tmp_path, cifar10_dir, *FAST, "--epochs", "1", "--warmup_epochs", "0", "--train_subset", "16")
    assert ckpt(r)["model_ema"] is None
    assert not EMA_KEYS & set(records(r)[0])
    assert "| ema " not in log(r) and "EMA" not in log(r)


def test_ema_run_records_checkpoints_and_log(tmp_path, cifar10_dir):
    r = run(tmp_path, cifar10_dir, *FAST, "--model_ema", "--model_ema_decay", "0.9", "--epochs", "3",
            "--warmup_epochs", "1", "--save_freq", "1", "--test_subset", "12")
    recs = records(r)
    best = 0.0
    for x in recs:
        assert EMA_KEYS <= set(x) and x["ema_acc5"] is None                    # CIFAR-10: no top-5
        assert math.isfinite(x["ema_loss"]) and 0 <= x["ema_acc"] <= 100
        best = max(best, x["ema_acc"])
        assert x["best_ema_acc"] == best
    # every checkpoint holds the EMA: the model's names and shapes, other values (it lags the weights)
    for kind in ("last", "best", "epoch1", "epoch2", "epoch3"):
        ck = ckpt(r, kind)
        assert ck["model_ema"].keys() == ck["model"].keys(), kind
        assert all(ck["model_ema"][k].shape == v.shape for k, v in ck["model"].items()), kind
    last = ckpt(r)
    assert any(not torch.equal(last["model_ema"][k], v) for k, v in last["model"].items())
    pos = last["position"]
    assert pos["best_ema_acc"] == best and recs[pos["best_ema_epoch"] - 1]["ema_acc"] == best
    # _best.pth follows the trained model's test_acc, whatever the EMA does
    best_ck = ckpt(r, "best")
    assert recs[best_ck["position"]["epoch"] - 1]["test_acc"] == max(x["test_acc"] for x in recs)
    # the logged EMA accuracy and loss are those of the checkpoint's EMA weights
    model = build_model("mamba_tiny", 10, embed_dim=16, depth=2, patch_size=8)
    model.load_state_dict(last["model_ema"])
    model.eval()
    x, y = data_mod.load_cifar("cifar10", cifar10_dir, download=False)["test"]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in data_mod.MEAN_STD["cifar10"])
    with torch.no_grad():
        logits = model((x[:12].float() / 255 - mean) / std)
    assert 100 * (logits.argmax(1) == y[:12]).float().mean().item() == pytest.approx(recs[-1]["ema_acc"])
    assert torch.nn.functional.cross_entropy(logits, y[:12]).item() == pytest.approx(recs[-1]["ema_loss"], rel=1e-5)
    # the log: the EMA's top-1 on every epoch line, its best at the end
    text = log(r)
    lines = [line for line in text.splitlines() if "/3 | lr " in line]
    assert len(lines) == 3 and all(f"| ema {x['ema_acc']:.2f} | best " in line for line, x in zip(lines, recs))
    assert f"EMA {best:.2f}% at epoch {pos['best_ema_epoch']}" in text


def test_cifar100_records_ema_top5(tmp_path, cifar100_dir):
    r = run(tmp_path, cifar100_dir, *FAST, "--model_ema", "--epochs", "1", "--warmup_epochs", "0",
            "--train_subset", "16", dataset="cifar100")
    rec = records(r, "cifar100")[0]
    assert rec["ema_acc5"] is not None and rec["ema_acc"] <= rec["ema_acc5"] <= 100
    assert "| ema " in log(r, "cifar100")


def _record_steps(monkeypatch, store):
    """store: one (EMA before the step, weights after the optimizer step) pair per step; the EMA after step k is
    the EMA before step k + 1 (the last one is in the checkpoint)."""
    def hook(run):
        step = run.step

        def recorded(micro_batches, lr):
            before = snapshot(run.ema.module)
            out = step(micro_batches, lr)
            store.append((before, snapshot(run.model)))
            return out
        run.step = recorded

    after_setup(monkeypatch, hook)


def test_ema_update_is_timms_formula_with_warmup(tmp_path, cifar10_dir, monkeypatch):
    """With --model_ema_decay 0.5 and the warmup: step 1 copies the weights (decay 0), step 2 uses
    decay 1 - 2^(-2/3), every later step 0.5 (the warmup's 1 - t^(-2/3) is above it from t = 3)."""
    steps = []
    _record_steps(monkeypatch, steps)
    r = run(tmp_path, cifar10_dir, *FAST, "--model_ema", "--model_ema_decay", "0.5", "--epochs", "2",
            "--warmup_epochs", "0")
    assert len(steps) == 10  # 40 images, batch 8, 2 epochs
    emas = [e for e, _ in steps] + [ckpt(r)["model_ema"]]
    for t in range(1, len(steps) + 1):  # global step t: EMA emas[t - 1] -> emas[t] with the weights after step t
        old, new, weights = emas[t - 1], emas[t], steps[t - 1][1]
        decay = 0.0 if t == 1 else min(0.5, 1 - t ** (-2 / 3))
        for k in weights:
            expected = decay * old[k] + (1 - decay) * weights[k]
            torch.testing.assert_close(new[k], expected, rtol=1e-6, atol=1e-7, msg=f"step {t}, {k}")
            if t > 1:  # between the old EMA and the new weights
                lo, hi = torch.minimum(old[k], weights[k]), torch.maximum(old[k], weights[k])
                assert bool(((new[k] >= lo - 1e-7) & (new[k] <= hi + 1e-7)).all()), (t, k)
    assert all(torch.equal(emas[1][k], steps[0][1][k]) for k in emas[1])  # step 1: an exact copy
    last = ckpt(r)
    assert any(not torch.equal(last["model_ema"][k], v) for k, v in last["model"].items())


def test_the_ema_update_reads_nothing_back_to_the_host(tmp_path, cifar10_dir, monkeypatch):
    """No host-device sync per step: inside the engine's EMA update no tensor is turned into a Python value (on
    a GPU each of these would wait for the device)."""
    calls = []

    def no_host_reads(run):
        update = run.ema.update

        def guarded(*args, **kwargs):
            calls.append(kwargs.get("step"))
            with monkeypatch.context() as m:
                for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
                    m.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"EMA update called .{_n}()"))
                return update(*args, **kwargs)
        run.ema.update = guarded

    after_setup(monkeypatch, no_host_reads)
    run(tmp_path, cifar10_dir, *FAST, "--model_ema", "--epochs", "1", "--warmup_epochs", "0")
    assert calls == [1, 2, 3, 4, 5]  # once per optimizer step, with the global step


def test_a_nonfinite_step_never_reaches_the_ema(tmp_path, cifar10_dir, monkeypatch):
    """NaN losses: the optimizer skips those steps on the device, so the EMA averages in the unchanged (finite)
    weights; it stays finite in every step, checkpoint and record."""
    bad = {1, 3, 4, 7}  # global steps (0-based, as the engine counts before the step)
    steps = []

    def inject(run):
        criterion = run.step.criterion
        run.step.criterion = lambda out, y: criterion(out, y) * (float("nan") if run.pos.global_step in bad else 1.)

    after_setup(monkeypatch, inject)
    _record_steps(monkeypatch, steps)  # wraps the setup above: the NaNs are in place when it records
    r = run(tmp_path, cifar10_dir, *FAST, "--model_ema", "--model_ema_decay", "0.5", "--epochs", "2",
            "--warmup_epochs", "0", "--save_freq", "1")
    assert len(steps) == 10
    for t, (ema, weights) in enumerate(steps):
        assert all(torch.isfinite(v).all() for v in ema.values()), f"EMA before step {t}"
    for kind in ("last", "epoch1", "epoch2"):
        assert all(torch.isfinite(v).all() for v in ckpt(r, kind)["model_ema"].values()), kind
    assert all(math.isfinite(x["ema_loss"]) and math.isfinite(x["ema_acc"]) for x in records(r))
    # why: the skipped steps left the weights finite and unchanged
    assert [x["bad_steps"] for x in records(r)] == [3, 4]
    for t, (ema, weights) in enumerate(steps):
        assert all(torch.isfinite(v).all() for v in weights.values()), f"weights after step {t}"
        if t in bad:
            assert all(torch.equal(weights[k], steps[t - 1][1][k]) for k in weights), t


def test_ema_weights_that_do_not_fit_are_refused(tmp_path, cifar10_dir, capsys):
    r = run(tmp_path / "a", cifar10_dir, *FAST, "--model_ema", "--epochs", "2", "--warmup_epochs", "0",
            "--save_freq", "1", "--train_subset", "16")
    ck = ckpt(r, "epoch1")
    ck["model_ema"]["head.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.pth"
    torch.save(ck, bad)
    capsys.readouterr()
    run(tmp_path / "b", cifar10_dir, *FAST, "--model_ema", "--epochs", "2", "--warmup_epochs", "0",
        "--train_subset", "16", "--resume", str(bad), expect=2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train_mamba_baseline.py: error: ")
    assert "holds EMA weights that do not fit this model" in err and "head.weight" in err
