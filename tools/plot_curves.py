#!/usr/bin/env python3
"""Plot training curves from the trainer's per-epoch ``.jsonl`` logs.

    python tools/plot_curves.py RUN.jsonl [RUN2.jsonl ...] -o curves.png [--labels a b] [--title T]
                                [--reference cifar10|cifar100]

Each line of a ``.jsonl`` file is one epoch record, e.g.::

    {"epoch": 3, "lr": 0.001, "train_loss": 1.9, "test_loss": 1.5, "test_acc": 45.2,
     "test_acc5": 80.1, "best_acc": 45.2, "epoch_time": 12.3, "images_per_s": 4000.0}

(accuracies in percent). Lines without ``"epoch"`` are skipped; when an epoch appears twice (a resumed
run appending to the same file) the later line wins. The PNG has two panels: test top-1 accuracy vs
epoch, and train loss (solid) / test loss (dashed) vs epoch, one colour per run. A run trained with
--model_ema also has ``ema_acc``, the EMA weights' top-1: drawn dashed beside its test_acc, same colour.
A run with a validation split (--val_size) also has ``val_acc`` / ``val_loss`` (dotted) and, with
--model_ema, ``ema_val_acc`` (dash-dot); its best epoch is the best validation one, and the summary gives
the test top-1 of that epoch.
``--reference`` overlays the user's guide's expected top-1 accuracy points.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

PROG = "plot_curves.py"

# The user's guide's expected top-1 accuracy (percent) at these epochs.
REFERENCE_CURVES = {
    "cifar10": [(50, 85.0), (100, 90.0), (150, 92.0), (200, 93.5), (250, 94.5), (300, 95.0)],
    "cifar100": [(50, 55.0), (100, 65.0), (150, 72.0), (200, 76.0), (250, 78.0), (300, 79.5)],
}
REFERENCE_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


class PlotError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise PlotError(f"{message} (see --help)")


def _number(value):
    """``value`` as a float, or None when absent / null / not a number."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def load_records(path) -> list[dict]:
    """The epoch records of one ``.jsonl`` file, sorted by epoch; a repeated epoch keeps its later line.

    Raises PlotError for a missing/unreadable file, a line that is not valid JSON (naming its line
    number), a non-numeric ``epoch``, or a file with no epoch records at all.
    """
    path = Path(path)
    if not path.is_file():
        raise PlotError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlotError(f"{path}: cannot read: {exc}") from None

    by_epoch: dict[int, dict] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PlotError(f"{path}: line {lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "epoch" not in record:
            continue
        epoch = record["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or not math.isfinite(epoch):
            raise PlotError(f"{path}: line {lineno}: 'epoch' must be a number, got {epoch!r}")
        by_epoch[int(epoch)] = record
    if not by_epoch:
        raise PlotError(f"{path}: no epoch records")
    return [by_epoch[e] for e in sorted(by_epoch)]


def _series(records, key):
    """(epochs, values) for the records where ``key`` holds a number."""
    xs, ys = [], []
    for r in records:
        v = _number(r.get(key))
        if v is not None:
            xs.append(int(r["epoch"]))
            ys.append(v)
    return xs, ys


def _best(records, key):
    """(best value, the first epoch reaching it) of ``key``; (None, None) without a finite one."""
    best, best_epoch = None, None
    for epoch, acc in zip(*_series(records, key)):
        if math.isfinite(acc) and (best is None or acc > best):
            best, best_epoch = acc, epoch
    return best, best_epoch


def summarize(records) -> dict:
    """Final and best top-1 accuracy of one run (None where the run has no accuracy yet); with a validation split
    also its best validation top-1, and the test top-1 at that epoch."""
    epochs, accs = _series(records, "test_acc")
    final = accs[-1] if accs else None
    final_epoch = epochs[-1] if epochs else None
    best, best_epoch = _best(records, "test_acc")
    val_best, val_epoch = _best(records, "val_acc")
    # The trainer's running best (of validation with a split, else of test) can predate this file (a resumed run);
    # take it when it is higher.
    _, recorded = _series(records, "best_acc")
    recorded = [v for v in recorded if math.isfinite(v)]
    if val_best is not None:
        if recorded and max(recorded) > val_best:
            val_best, val_epoch = max(recorded), None
    elif recorded and (best is None or max(recorded) > best):
        best, best_epoch = max(recorded), None
    test_there = dict(zip(epochs, accs)).get(val_epoch)
    return {
        "first_epoch": int(records[0]["epoch"]),
        "last_epoch": int(records[-1]["epoch"]),
        "final_acc": final,
        "final_epoch": final_epoch,
        "best_acc": best,
        "best_epoch": best_epoch,
        "val_best_acc": val_best,
        "val_best_epoch": val_epoch,
        "test_at_val_best": test_there,
    }


def _marker(xs):
    """Dots on short series, so that a run of one or a few epochs is still visible."""
    return "." if len(xs) < 30 else None


def plot(runs, out, title=None, reference=None) -> None:
    """Draw ``runs`` (a list of (label, records)) into the PNG ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    any_test_loss = any_val = False
    for i, (label, records) in enumerate(runs):
        color = colors[i % len(colors)]
        xs, ys = _series(records, "test_acc")
        if xs:
            ax_acc.plot(xs, ys, color=color, label=label, marker=_marker(xs))
        for key, style, name in (("ema_acc", "--", "EMA"), ("val_acc", ":", "val"), ("ema_val_acc", "-.", "EMA val")):
            xs, ys = _series(records, key)
            if xs:
                any_val = any_val or key == "val_acc"
                ax_acc.plot(xs, ys, color=color, linestyle=style, label=f"{label} {name}", marker=_marker(xs))
        xs, ys = _series(records, "train_loss")
        if xs:
            ax_loss.plot(xs, ys, color=color, label=f"{label} train", marker=_marker(xs))
        xs, ys = _series(records, "test_loss")
        if xs:
            any_test_loss = True
            ax_loss.plot(xs, ys, color=color, linestyle="--", label=f"{label} test", marker=_marker(xs))
        xs, ys = _series(records, "val_loss")
        if xs:
            ax_loss.plot(xs, ys, color=color, linestyle=":", label=f"{label} val", marker=_marker(xs))

    if reference:
        ref_x, ref_y = zip(*REFERENCE_CURVES[reference])
        ax_acc.plot(ref_x, ref_y, linestyle="none", marker="*", markersize=11, color="black",
                    label=f"guide reference ({REFERENCE_NAMES[reference]})")

    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("top-1 accuracy (%)" if any_val else "test top-1 accuracy (%)")
    ax_acc.set_title("Test (solid) and validation (dotted) accuracy" if any_val else "Test accuracy")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Train / test loss" if any_test_loss else "Train loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120, format="png")
    except (OSError, ValueError) as exc:
        raise PlotError(f"cannot write {out}: {exc}") from None
    finally:
        plt.close(fig)


def _fmt(acc):
    return "n/a" if acc is None else f"{acc:.2f}%"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Plot test accuracy and loss curves from the trainer's .jsonl logs.")
    p.add_argument("runs", nargs="+", metavar="RUN.jsonl", help="per-epoch log(s) written by the trainer")
    p.add_argument("-o", "--output", default="curves.png", help="output PNG (default: curves.png)")
    p.add_argument("--labels", nargs="+", help="one legend label per run (default: the file stems)")
    p.add_argument("--title", help="figure title")
    p.add_argument("--reference", choices=sorted(REFERENCE_CURVES),
                   help="overlay the guide's expected accuracy points for this data set")
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.labels is not None and len(args.labels) != len(args.runs):
            raise PlotError(f"got {len(args.labels)} label(s) for {len(args.runs)} run(s)")
        labels = args.labels or [Path(r).stem for r in args.runs]
        runs = [(label, load_records(path)) for label, path in zip(labels, args.runs)]
        plot(runs, args.output, title=args.title, reference=args.reference)
    except PlotError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0

    print(f"wrote {args.output}")
    for label, records in runs:
        s = summarize(records)
        best = _fmt(s["best_acc"])
        if s["best_epoch"] is not None:
            best += f" (epoch {s['best_epoch']})"
        final = _fmt(s["final_acc"])
        if s["final_epoch"] is not None:
            final += f" (epoch {s['final_epoch']})"
        val = ""
        if s["val_best_acc"] is not None:
            at = f" (epoch {s['val_best_epoch']})" if s["val_best_epoch"] is not None else ""
            val = f", best val top-1 {_fmt(s['val_best_acc'])}{at}, test top-1 there {_fmt(s['test_at_val_best'])}"
        print(f"  {label}: epochs {s['first_epoch']}-{s['last_epoch']}, final top-1 {final}, best top-1 {best}{val}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
