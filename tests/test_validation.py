"""--val_size / --split_seed (issue 22): a class-balanced validation split held out of the training set, fixed by
its own seed; evaluated every epoch beside the test set; _best.pth chosen on it; recorded in every checkpoint."""
import json
import shutil

import pytest
import torch

import train_mamba_baseline
from conftest import make_cifar, tiny_args
from training.config import UsageError, parse_config
from training.data import load_cifar, split_hash, validation_split

PLAIN = ["--no_use_randaugment", "--no_use_mixup", "--no_use_cutmix", "--drop_path", "0", "--warmup_epochs", "0"]


@pytest.fixture
def data(tmp_path):
    """100 CIFAR-10 training images, at least 6 of each class (seed 0), and 16 test images."""
    return make_cifar(str(tmp_path / "data"), "cifar10", n_train=100, n_test=16, seed=0)


def run(base, data_dir, *extra, expect=0):
    assert train_mamba_baseline.main(tiny_args(base, data_dir, *PLAIN, *extra)) == expect
    return base


def records(base):
    return [json.loads(x) for x in (base / "logs" / "mamba_tiny_cifar10_baseline_test.jsonl").read_text().splitlines()]


def ckpt(base, kind="last"):
    return torch.load(base / "ckpt" / f"mamba_tiny_cifar10_{kind}.pth", map_location="cpu", weights_only=True)


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train_mamba_baseline.py: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


# ---- the split itself ----------------------------------------------------------------------------------------
def labels(n=1000, classes=10, seed=0):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("classes,val_size", [(10, 100), (10, 10), (100, 300)])
def test_split_is_class_balanced_disjoint_and_covers_the_training_set(classes, val_size):
    y = labels(n=2000, classes=classes)
    train, val = validation_split(y, val_size, classes, split_seed=0)
    assert torch.equal(torch.bincount(y[val], minlength=classes), torch.full((classes,), val_size // classes))
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(len(y)))
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)  # the data's own order


def test_split_follows_split_seed_and_nothing_else():
    y = labels()
    torch.manual_seed(1)
    a = validation_split(y, 100, 10, split_seed=0)
    torch.manual_seed(2)  # the global RNG (--seed seeds it) neither moves the split nor is moved by it
    state = torch.get_rng_state()
    b = validation_split(y, 100, 10, split_seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[1], b[1]) and split_hash(a[1]) == split_hash(b[1])
    c = validation_split(y, 100, 10, split_seed=1)
    assert not torch.equal(a[1], c[1]) and split_hash(a[1]) != split_hash(c[1])


@pytest.mark.parametrize("val_size,needle", [(1000, "leaves nothing to train on: the training set has 1000"),
                                             (1010, "leaves nothing to train on"),
                                             (20, "class 3 has 2 in the training set: none would be left")])
def test_split_that_leaves_nothing_or_empties_a_class_is_refused(val_size, needle):
    y = labels()
    y[y == 3] = 4
    y[:2] = 3  # class 3: two images
    with pytest.raises(ValueError, match=needle):
        validation_split(y, val_size, 10, split_seed=0)


@pytest.mark.parametrize("argv,needle", [
    (["--val_size", "-10"], "--val_size and --split_seed must be >= 0"),
    (["--split_seed", "-1"], "--val_size and --split_seed must be >= 0"),
    (["--val_size", "25"], "--val_size must be a multiple of cifar10's 10 classes"),
    (["--dataset", "cifar100", "--val_size", "5010"], "multiple of cifar100's 100 classes")])
def test_bad_split_options(argv, needle):
    with pytest.raises(UsageError, match=needle):
        parse_config(argv)
    assert parse_config(["--val_size", "5000", "--split_seed", "3"]).val_size == 5000


# ---- a run with a split ----------------------------------------------------------------------------------------
def test_a_run_evaluates_validation_and_test_and_records_the_split(tmp_path, data):
    r = run(tmp_path, data, "--epochs", "2", "--val_size", "20", "--model_ema", "--model_ema_decay", "0.5")
    y = load_cifar("cifar10", data, download=False)["train"][1]
    held = split_hash(validation_split(y, 20, 10, 0)[1])
    log = (r / "logs" / "mamba_tiny_cifar10_baseline_test.log").read_text()
    assert f"data: 80 train / 20 val (held out: {held}) / 16 test images" in log and "10 steps/epoch" in log
    recs = records(r)
    for x in recs:
        for k in ("val_loss", "val_acc", "test_loss", "test_acc", "ema_loss", "ema_acc", "ema_val_loss",
                  "ema_val_acc"):
            assert isinstance(x[k], float), k
        assert x["val_acc5"] is None and x["ema_val_acc5"] is None  # CIFAR-10: no top-5
        assert x["val_acc"] * 20 / 100 == pytest.approx(round(x["val_acc"] * 20 / 100))  # of 20 held-out images
    assert recs[-1]["best_acc"] == max(x["val_acc"] for x in recs)
    assert recs[-1]["best_ema_acc"] == max(x["ema_val_acc"] for x in recs)
    lines = [line for line in log.splitlines() if "epoch   2/2 |" in line]
    assert len(lines) == 1 and " | val loss " in lines[0] and " | test loss " in lines[0]
    assert f"| best val {recs[-1]['best_acc']:.2f}" in lines[0] and " | ema val " in lines[0]
    assert ckpt(r)["split"] == {"val_size": 20, "split_seed": 0, "held_out": held}
    assert "best val top-1" in log and "(test top-1 there" in log


def test_best_follows_validation_not_test(tmp_path, data, monkeypatch):
    """Epoch 1 tests better, epoch 2 validates better: _best.pth is epoch 2's."""
    from training import engine
    scores = {"val": [10.0, 20.0], "test": [50.0, 40.0]}

    def evaluate(self, model=None, data=None):
        return 1.0, scores["val" if data is self.val_data else "test"].pop(0), 0.0
    monkeypatch.setattr(engine.Run, "evaluate", evaluate)
    r = run(tmp_path, data, "--epochs", "2", "--val_size", "20")
    best = ckpt(r, "best")["position"]
    assert (best["epoch"], best["best_epoch"], best["best_acc"]) == (2, 2, 20.0)
    assert [x["best_acc"] for x in records(r)] == [10.0, 20.0]
    log = (r / "logs" / "mamba_tiny_cifar10_baseline_test.log").read_text()
    assert "finished: best val top-1 20.00% at epoch 2 (test top-1 there 40.00%)" in log


def test_without_a_split_best_follows_test(tmp_path, data, monkeypatch):
    from training import engine
    scores = [50.0, 40.0]
    monkeypatch.setattr(engine.Run, "evaluate", lambda self, model=None, data=None: (1.0, scores.pop(0), 0.0))
    r = run(tmp_path, data, "--epochs", "2")
    assert ckpt(r, "best")["position"]["epoch"] == 1 and ckpt(r)["split"] is None
    assert "val_acc" not in records(r)[0]


def test_the_split_does_not_move_with_seed(tmp_path, data):
    a = run(tmp_path / "a", data, "--epochs", "1", "--val_size", "20", "--seed", "0")
    b = run(tmp_path / "b", data, "--epochs", "1", "--val_size", "20", "--seed", "1")
    c = run(tmp_path / "c", data, "--epochs", "1", "--val_size", "20", "--split_seed", "1")
    assert ckpt(a)["split"] == ckpt(b)["split"] != ckpt(c)["split"]


@pytest.mark.parametrize("resume_with,needle", [
    (["--val_size", "20", "--split_seed", "1"], "this run asks for --val_size 20 --split_seed 1"),
    (["--val_size", "40"], "this run asks for --val_size 40"),
    ([], "this run asks for none (--val_size 0)")])
def test_resume_with_another_split_is_refused(tmp_path, data, capsys, resume_with, needle):
    first = run(tmp_path / "first", data, "--epochs", "2", "--val_size", "20", "--save_freq", "1")
    part = tmp_path / "part"
    (part / "ckpt").mkdir(parents=True)
    shutil.copy(first / "ckpt" / "mamba_tiny_cifar10_epoch1.pth", part / "ckpt" / "mamba_tiny_cifar10_last.pth")
    before = (part / "ckpt" / "mamba_tiny_cifar10_last.pth").read_bytes()
    capsys.readouterr()
    run(part, data, "--epochs", "2", "--resume", "auto", *resume_with, expect=2)
    one_error_line(capsys, "was made with validation split --val_size 20 --split_seed 0 (held out: ", needle)
    assert (part / "ckpt" / "mamba_tiny_cifar10_last.pth").read_bytes() == before
    run(part, data, "--epochs", "2", "--resume", "auto", "--val_size", "20")  # the same split resumes
    assert [x["epoch"] for x in records(part)] == [1, 2] and "val_acc" in records(part)[1]


def test_resume_of_a_run_without_a_split_refuses_one(tmp_path, data, capsys):
    run(tmp_path, data, "--epochs", "2", "--save_freq", "1")
    shutil.copy(tmp_path / "ckpt" / "mamba_tiny_cifar10_epoch1.pth", tmp_path / "ckpt" / "mamba_tiny_cifar10_last.pth")
    capsys.readouterr()
    run(tmp_path, data, "--epochs", "2", "--resume", "auto", "--val_size", "20", expect=2)
    one_error_line(capsys, "was made with validation split none (--val_size 0)")


@pytest.mark.parametrize("extra,needles", [
    (["--val_size", "100"], ["--val_size 100 leaves nothing to train on: the training set has 100 images"]),
    (["--val_size", "30", "--train_subset", "20"], ["--val_size 30 leaves nothing", "has 20 images"]),
    (["--val_size", "60"], ["holds out 6 image(s) of each class, but class 9 has 6 in the training set"]),
    (["--val_size", "15"], ["--val_size must be a multiple of cifar10's 10 classes"]),
    (["--val_size", "-10"], ["--val_size and --split_seed must be >= 0"])])
def test_bad_split_is_one_line_exit_2(tmp_path, data, capsys, extra, needles):
    run(tmp_path, data, "--epochs", "1", *extra, expect=2)
    one_error_line(capsys, *needles)
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").glob("*.pth"))
