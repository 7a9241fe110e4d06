"""The epoch line's time left: from the pace of this process's whole epochs, never from the first (compiling) one."""
import itertools

import training.logs as logs
from training.logs import RunLog


def rec(epoch):
    return dict(epoch=epoch, lr=1e-3, train_loss=1.0, test_loss=1.0, test_acc=50.0, best_acc=50.0, epoch_time=1.0,
                images_per_s=100.0)


def test_time_left_follows_the_pace_of_the_last_whole_epochs(tmp_path, monkeypatch):
    clock = itertools.chain([1000.0, 1300.0, 1360.0, 1420.0], itertools.count(1480.0, 30.0))
    monkeypatch.setattr(logs.time, "monotonic", lambda: next(clock))
    log = RunLog(str(tmp_path / "r.log"), str(tmp_path / "r.jsonl"), echo=False)
    for epoch in range(11, 21):  # a resumed run: its first line here is epoch 11 of 30
        log.epoch(rec(epoch), 30)
    log.epoch(rec(30), 30)
    log.close()
    lines = (tmp_path / "r.log").read_text().splitlines()
    assert "left" not in lines[0]                                 # nothing to measure a pace from yet
    assert lines[1].endswith("| left 1h30m")                      # 18 epochs x 300 s (one interval)
    assert lines[2].endswith("| left 51m00s")                     # 17 x 180 s (two intervals)
    assert lines[9].endswith("| left 5m00s")                      # 10 x the last 5 intervals' 30 s
    assert "left" not in lines[10]                                # the last epoch
    short = RunLog(str(tmp_path / "s.log"), str(tmp_path / "s.jsonl"), echo=False)
    monkeypatch.setattr(logs.time, "monotonic", iter([0.0, 12.5]).__next__)
    short.epoch(rec(1), 4)
    short.epoch(rec(2), 4)
    short.close()
    assert (tmp_path / "s.log").read_text().splitlines()[1].endswith("| left 0m25s")   # 2 x 12.5 s


def test_the_epoch_line_shows_validation_beside_test(tmp_path):
    """--val_size: val loss/acc (top-5 on CIFAR-100) before the test ones, the EMA's of both, and the best is
    validation's; without a split the line is as before."""
    log = RunLog(str(tmp_path / "r.log"), str(tmp_path / "r.jsonl"), echo=False)
    log.epoch(dict(rec(1), val_loss=1.5, val_acc=40.0, val_acc5=70.0, test_acc5=75.0, ema_acc=45.0,
                   ema_val_acc=41.0, best_acc=40.0), 2)
    log.epoch(rec(2), 2)
    log.close()
    with_val, plain = (tmp_path / "r.log").read_text().splitlines()
    assert ("| val loss 1.5000 acc 40.00 top5 70.00 | test loss 1.0000 acc 50.00 top5 75.00 | ema val 41.00 test "
            "45.00 | best val 40.00 |") in with_val
    assert "| test loss 1.0000 acc 50.00 | best 50.00 |" in plain and "val" not in plain
