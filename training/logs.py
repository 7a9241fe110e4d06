"""The run's log: one readable line per epoch that `tail -f` follows, and a .jsonl of the same records."""
import collections
import json
import os
import sys
import time


def log_paths(log_dir, arch, dataset, run_id):
    stem = os.path.join(log_dir, f"{arch}_{dataset}_baseline_{run_id}")
    return stem + ".log", stem + ".jsonl"


class RunLog:
    """Writes on rank 0 only; every other rank gets a RunLog with enabled=False that does nothing."""

    def __init__(self, log_path, jsonl_path, enabled=True, echo=True):
        self.log_path, self.jsonl_path, self.enabled, self.echo = log_path, jsonl_path, enabled, echo
        # monotonic times of this process's last 6 epoch lines (5 intervals), for the time left
        self._epoch_ends = collections.deque(maxlen=6)
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
            self._log = open(log_path, "a", buffering=1)

    def info(self, message, echo=True):
        """Writes to the log file, and to stdout unless the RunLog or this call says echo=False."""
        if not self.enabled:
            return
        for line in str(message).splitlines():
            stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
            self._log.write(stamped + "\n")
            if self.echo and echo:
                print(stamped, flush=True)

    def epoch(self, rec, total_epochs):
        """rec: one epoch's metrics (see engine.Run.fit)."""
        self._epoch_ends.append(time.monotonic())

        def scores(name):  # " | val loss 1.2345 acc 56.78 top5 89.01"
            top5 = f" top5 {rec[name + '_acc5']:.2f}" if rec.get(name + "_acc5") is not None else ""
            return f" | {name} loss {rec[name + '_loss']:.4f} acc {rec[name + '_acc']:.2f}{top5}"
        val = "val_acc" in rec  # --val_size: the best epoch is chosen on it
        ema = ""
        if rec.get("ema_acc") is not None:  # --model_ema: its top-1
            ema = f" | ema val {rec['ema_val_acc']:.2f} test" if val else " | ema"
            ema += f" {rec['ema_acc']:.2f}"
        self.info(f"epoch {rec['epoch']:>3}/{total_epochs} | lr {rec['lr']:.2e} | train loss {rec['train_loss']:.4f}"
                  f"{scores('val') if val else ''}{scores('test')}{ema}"
                  f" | best {'val ' if val else ''}{rec['best_acc']:.2f}"
                  f" | {rec['epoch_time']:.1f}s {rec['images_per_s']:.0f} img/s"
                  f"{self._time_left(total_epochs - rec['epoch'])}")
        if self.enabled:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def _time_left(self, epochs_left):
        """' | left 1h05m': the epochs left at the mean pace of this process's last 5 whole epochs, from one epoch
        line to the next (checkpoint writes included; the first epoch, which compiles, has no earlier line)."""
        ends = self._epoch_ends
        if epochs_left <= 0 or len(ends) < 2:
            return ""
        seconds = round(epochs_left * (ends[-1] - ends[0]) / (len(ends) - 1))
        hours, minutes = seconds // 3600, seconds % 3600 // 60
        return f" | left {hours}h{minutes:02d}m" if hours else f" | left {minutes}m{seconds % 60:02d}s"

    def rewrite_jsonl(self, records):
        """On resume: the .jsonl becomes exactly the checkpoint's history (no lost or doubled epochs)."""
        if not self.enabled:
            return
        tmp = self.jsonl_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, self.jsonl_path)

    def close(self):
        if self.enabled:
            self._log.close()


def progress(iterable, total, enabled, desc):
    """A tqdm bar when attached to a terminal; the plain iterable otherwise (logs stay clean)."""
    if not enabled or not sys.stdout.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
