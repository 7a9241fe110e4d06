"""Tests for tools/plot_curves.py (CPU only, matplotlib Agg)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "plot_curves.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _load_tool():
    spec = importlib.util.spec_from_file_location("plot_curves", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pc = _load_tool()


def record(epoch, acc, train_loss=2.0, test_loss=1.5, **extra):
    r = {"epoch": epoch, "lr": 1e-3, "train_loss": train_loss, "test_loss": test_loss, "test_acc": acc,
         "test_acc5": None, "best_acc": acc, "epoch_time": 12.3, "images_per_s": 4000.0}
    r.update(extra)
    return r


def write_jsonl(path: Path, lines) -> Path:
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def check_png(path: Path):
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img


@pytest.fixture
def run_a(tmp_path):
    return write_jsonl(tmp_path / "mamba_small_cifar10_baseline_20240101_000000.jsonl",
                       [record(e, 30 + 5 * e, train_loss=2.5 - 0.2 * e, test_loss=2.0 - 0.1 * e)
                        for e in range(1, 8)])


@pytest.fixture
def run_b(tmp_path):
    return write_jsonl(tmp_path / "run_b.jsonl",
                       [record(e, 10 + 3 * e, test_loss=None) for e in range(1, 5)])


def test_plot_one_run(tmp_path, run_a, capsys):
    out = tmp_path / "curves.png"
    assert pc.main([str(run_a), "-o", str(out)]) == 0
    check_png(out)
    stdout = capsys.readouterr().out
    assert str(out) in stdout
    assert run_a.stem in stdout
    assert "final top-1 65.00%" in stdout and "best top-1 65.00%" in stdout


def test_plot_two_runs_labels_title_reference(tmp_path, run_a, run_b, capsys):
    out = tmp_path / "sub" / "dir" / "curves.png"  # parent folders are created
    rc = pc.main([str(run_a), str(run_b), "-o", str(out), "--labels", "small", "tiny",
                  "--title", "CIFAR-10 baseline", "--reference", "cifar10"])
    assert rc == 0
    check_png(out)
    stdout = capsys.readouterr().out
    assert "small:" in stdout and "tiny:" in stdout
    assert "final top-1 22.00%" in stdout  # run_b: 10 + 3 * 4


@pytest.mark.parametrize("ref", ["cifar10", "cifar100"])
def test_reference_curves(tmp_path, run_a, ref):
    out = tmp_path / f"{ref}.png"
    assert pc.main([str(run_a), "-o", str(out), "--reference", ref]) == 0
    check_png(out)
    points = dict(pc.REFERENCE_CURVES[ref])
    assert sorted(points) == [50, 100, 150, 200, 250, 300]
    assert points[300] == (95.0 if ref == "cifar10" else 79.5)
    assert points[50] == (85.0 if ref == "cifar10" else 55.0)


def test_load_records_later_duplicate_wins_and_skips_non_epoch_lines(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"event": "start", "args": {"lr": 1e-3}},
        record(1, 20.0),
        record(2, 25.0),
        "",
        record(3, 30.0),
        {"event": "resumed"},
        record(2, 26.0),  # a resumed run re-logs epoch 2: this line wins
        record(3, 31.0),
        "[1, 2, 3]",
        record(4, 35.0),
    ])
    recs = pc.load_records(path)
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4]
    assert [r["test_acc"] for r in recs] == [20.0, 26.0, 31.0, 35.0]


def test_summary_handles_null_accuracy_and_earlier_best(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [
        record(1, 40.0),
        record(2, 50.0),
        record(3, 45.0),
        record(4, None),
    ])
    s = pc.summarize(pc.load_records(path))
    assert s["final_acc"] == 45.0 and s["final_epoch"] == 3
    assert s["best_acc"] == 50.0 and s["best_epoch"] == 2
    assert (s["first_epoch"], s["last_epoch"]) == (1, 4)


def test_train_loss_only_run_still_plots(tmp_path, capsys):
    path = write_jsonl(tmp_path / "r.jsonl", [{"epoch": 1, "train_loss": 2.3}, {"epoch": 2, "train_loss": 2.1}])
    out = tmp_path / "c.png"
    assert pc.main([str(path), "-o", str(out)]) == 0
    check_png(out)
    assert "final top-1 n/a" in capsys.readouterr().out


def _error_line(capsys):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("plot_curves.py: error: ")
    assert "Traceback" not in captured.err
    return lines[0]


def test_error_missing_file(tmp_path, capsys):
    out = tmp_path / "c.png"
    assert pc.main([str(tmp_path / "nope.jsonl"), "-o", str(out)]) == 2
    assert "nope.jsonl" in _error_line(capsys)
    assert not out.exists()


def test_error_no_epoch_records(tmp_path, capsys):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"event": "start"}, ""])
    assert pc.main([str(path), "-o", str(tmp_path / "c.png")]) == 2
    assert "no epoch records" in _error_line(capsys)


def test_error_empty_file(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert pc.main([str(path), "-o", str(tmp_path / "c.png")]) == 2
    assert "no epoch records" in _error_line(capsys)


def test_error_bad_json_names_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [record(1, 20.0), record(2, 25.0), '{"epoch": 3, "test_acc": '])
    assert pc.main([str(path), "-o", str(tmp_path / "c.png")]) == 2
    line = _error_line(capsys)
    assert "line 3" in line and "bad.jsonl" in line


def test_error_labels_count_mismatch(tmp_path, run_a, run_b, capsys):
    out = tmp_path / "c.png"
    assert pc.main([str(run_a), str(run_b), "-o", str(out), "--labels", "only_one"]) == 2
    assert "label" in _error_line(capsys)
    assert not out.exists()


def test_error_bad_arguments(tmp_path, run_a, capsys):
    assert pc.main([]) == 2
    _error_line(capsys)
    assert pc.main([str(run_a), "--reference", "imagenet"]) == 2
    _error_line(capsys)


def test_help_returns_0(capsys):
    assert pc.main(["--help"]) == 0
    assert "--reference" in capsys.readouterr().out


def test_cli_error_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "c.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plot_curves.py: error: "), proc.stderr


def test_cli_success(tmp_path, run_a):
    out = tmp_path / "cli.png"
    proc = subprocess.run([sys.executable, str(TOOL), str(run_a), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    check_png(out)
    assert str(out) in proc.stdout


def _kept_figure(monkeypatch, runs, out):
    """pc.plot's figure, kept open (plot closes it) for inspection."""
    import matplotlib.pyplot as plt
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    pc.plot(runs, out)
    monkeypatch.undo()
    assert len(kept) == 1
    return kept[0]


def test_ema_accuracy_is_dashed_beside_test_acc_in_the_same_colour(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    ema = [record(e, 30 + 5 * e, ema_acc=28 + 6 * e, ema_loss=1.4, best_ema_acc=28 + 6 * e) for e in range(1, 6)]
    plain = [record(e, 20 + 2 * e) for e in range(1, 6)]
    out = tmp_path / "ema.png"
    fig = _kept_figure(monkeypatch, [("with", ema), ("without", plain)], out)
    try:
        check_png(out)
        lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
        assert sorted(lines) == ["with", "with EMA", "without"]  # no EMA line for a run without ema_acc
        acc, ema_line = lines["with"], lines["with EMA"]
        assert ema_line.get_linestyle() == "--" and acc.get_linestyle() == "-"
        assert ema_line.get_color() == acc.get_color() != lines["without"].get_color()
        assert list(ema_line.get_xdata()) == [1, 2, 3, 4, 5]
        assert list(ema_line.get_ydata()) == [34.0, 40.0, 46.0, 52.0, 58.0]
    finally:
        plt.close(fig)
    # from the command line too; the summary still reports the trained model's test_acc
    path = write_jsonl(tmp_path / "ema.jsonl", ema)
    assert pc.main([str(path), "-o", str(tmp_path / "cli.png")]) == 0
    check_png(tmp_path / "cli.png")


def test_a_validation_split_is_drawn_and_summarised(tmp_path, monkeypatch, capsys):
    """--val_size runs: val_acc dotted and ema_val_acc dash-dot beside test_acc, val_loss dotted beside the test
    loss; the summary's best is the best validation epoch, with the test top-1 there (issue 22)."""
    import matplotlib.pyplot as plt
    val = [record(e, 30 + 5 * e, val_loss=1.6, val_acc=[20.0, 50.0, 40.0][e - 1], ema_acc=25.0, ema_loss=1.5,
                  ema_val_acc=22.0 + e, best_acc=[20.0, 50.0, 50.0][e - 1]) for e in range(1, 4)]
    out = tmp_path / "val.png"
    fig = _kept_figure(monkeypatch, [("split", val), ("plain", [record(1, 10.0)])], out)
    try:
        check_png(out)
        acc = {line.get_label(): line for line in fig.axes[0].get_lines()}
        assert sorted(acc) == ["plain", "split", "split EMA", "split EMA val", "split val"]
        assert acc["split val"].get_linestyle() == ":" and acc["split EMA val"].get_linestyle() == "-."
        assert acc["split val"].get_color() == acc["split"].get_color()
        assert list(acc["split val"].get_ydata()) == [20.0, 50.0, 40.0]
        loss = {line.get_label(): line for line in fig.axes[1].get_lines()}
        assert loss["split val"].get_linestyle() == ":" and "plain val" not in loss
        assert "validation" in fig.axes[0].get_title()
    finally:
        plt.close(fig)
    s = pc.summarize(val)
    assert (s["val_best_acc"], s["val_best_epoch"], s["test_at_val_best"]) == (50.0, 2, 40.0)
    assert (s["best_acc"], s["best_epoch"]) == (45.0, 3)  # the test set's own best, not best_acc (validation's)
    assert pc.summarize([record(1, 10.0)])["val_best_acc"] is None
    path = write_jsonl(tmp_path / "val.jsonl", val)
    assert pc.main([str(path), "-o", str(tmp_path / "cli.png")]) == 0
    assert "best val top-1 50.00% (epoch 2), test top-1 there 40.00%" in capsys.readouterr().out
