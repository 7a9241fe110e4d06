#!/usr/bin/env python3
"""Evaluate and inspect a checkpoint of train_mamba_baseline.py (or a file exported from one).

    python evaluate.py checkpoint/mamba_baseline/cifar10/mamba_small_cifar10_best.pth
    python evaluate.py CKPT --ema --json eval.json --plot confusion.png
    python evaluate.py CKPT --export mamba_small_cifar10.pth     # weights + configuration only, then stop

The data set, the architecture and the tokenizer come from the checkpoint. On the data set's test split it
prints top-1 (and top-5 on CIFAR-100) and per-class top-1; then the parameters by part, the multiply-accumulates
per image (models/cost.py says what is counted and how) and the inference speed on the device.
"""
import json
import os
import sys
import time

import torch

from training.config import UsageError, _Parser  # the trainer's: bad input is one line, exit code 2

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPEED_SECONDS = 1.0  # time spent on each speed measurement, after the warm-up


def build_parser():
    p = _Parser(prog="evaluate.py", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a checkpoint of train_mamba_baseline.py, or a file exported by --export")
    p.add_argument("--data_dir", default=None, help="default ./datasets/<the checkpoint's data set>")
    p.add_argument("--ema", action="store_true", help="the EMA weights of a --model_ema run")
    p.add_argument("--batch_size", type=int, default=256, help="images per batch, for the test split and the "
                   "throughput measurement (default: 256)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--no_speed", action="store_true", help="skip the speed measurement")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw the confusion matrix into this PNG")
    p.add_argument("--export", default=None, metavar="OUT",
                   help="write the weights (fp32) and configuration alone to OUT, for load_model and the trainer's "
                        "--pretrained, and stop")
    return p


def parse_args(argv):
    args = build_parser().parse_args(argv)
    if args.batch_size <= 0:
        raise UsageError(f"--batch_size must be positive, got {args.batch_size}")
    if args.device not in ("auto", "cuda", "cpu"):
        raise UsageError(f"--device must be auto, cuda or cpu, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA GPU is visible (use --device cpu)")
    return args


def normalisation(info):
    """The (mean, std) the model was trained with: recorded in the file, or else (checkpoints from before the
    trainer recorded it) the trainer's rule: ImageNet's after --pretrained, the data set's own otherwise."""
    from training.data import IMAGENET_MEAN_STD, MEAN_STD
    if info["mean"] is not None and info["std"] is not None:
        return tuple(info["mean"]), tuple(info["std"])
    return IMAGENET_MEAN_STD if info["config"].get("pretrained") else MEAN_STD[info["dataset"]]


def load_test_split(dataset, data_dir, num_classes):
    """-> (images uint8 (N, 3, 32, 32), labels (N,)) of the test split. Raises DataError / UsageError."""
    from training.data import LAYOUT, load_cifar
    for other, lay in LAYOUT.items():  # the other data set's folder and not this one's: say so, not "files missing"
        if other != dataset and os.path.isdir(os.path.join(data_dir, lay["folder"])) \
                and not os.path.isdir(os.path.join(data_dir, LAYOUT[dataset]["folder"])):
            raise UsageError(f"{data_dir} holds {other}, but the checkpoint was trained on {dataset}")
    x, y = load_cifar(dataset, data_dir, download=False)["test"]
    if len(y) == 0:
        raise UsageError(f"the {dataset} test split under {data_dir} is empty")
    if int(y.max()) >= num_classes:
        raise UsageError(f"the test labels under {data_dir} go up to {int(y.max())}, but the model has "
                         f"{num_classes} classes")
    return x, y


@torch.no_grad()
def predict(model, images, mean, std, device, batch_size, amp):
    """uint8 images (N, 3, 32, 32) -> logits (N, classes), float32 on the CPU; preprocessed as the trainer tests."""
    from training.step import resize
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(images), batch_size):
        x = resize((images[i:i + batch_size].to(device).float() / 255 - mean) / std, model.cfg.img_size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out.append(model(x).float().cpu())
    return torch.cat(out)


def accuracy(logits, labels, num_classes):
    """-> dict(loss (mean cross-entropy), top1, top5 (%, None with 10 classes), per_class (top-1 % per class, None
    where a class has no test image), confusion (classes x classes counts: row = true class, column = prediction))."""
    pred = logits.argmax(1)
    top5 = (logits.topk(min(5, num_classes), dim=1).indices == labels[:, None]).any(1)
    confusion = torch.bincount(labels * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)
    per_class = [100 * confusion[c, c].item() / n if (n := confusion[c].sum().item()) else None
                 for c in range(num_classes)]
    return dict(loss=torch.nn.functional.cross_entropy(logits, labels).item(),
                top1=100 * (pred == labels).double().mean().item(),
                top5=100 * top5.double().mean().item() if num_classes > 10 else None,
                per_class=per_class, confusion=confusion)


@torch.no_grad()
def measure_speed(model, device, batch_size, amp):
    """-> (images/s at batch_size, milliseconds per batch of 1): forward passes alone on random inputs, after a
    warm-up, for SPEED_SECONDS each (the median call for the latency)."""
    cfg = model.cfg

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def times(batch):
        x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for _ in range(3):
                model(x)
            sync()
            out, start = [], time.perf_counter()
            while len(out) < 3 or (time.perf_counter() - start < SPEED_SECONDS and len(out) < 1000):
                t = time.perf_counter()
                model(x)
                sync()
                out.append(time.perf_counter() - t)
        return out

    big = times(batch_size)
    one = sorted(times(1))
    return batch_size * len(big) / sum(big), 1000 * one[len(one) // 2]


def plot_confusion(confusion, names, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(names)
    rows = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(7, 6) if n <= 10 else (11, 10))
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 10:
        ax.set_xticks(range(n), names, rotation=45, ha="right")
        ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix (rows: true class, as fractions)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _human(n):
    return f"{n / 1e9:.3f} G" if n >= 1e9 else f"{n / 1e6:.3f} M" if n >= 1e6 else f"{n / 1e3:.3f} K"


def describe(path, info, model):
    cfg = model.cfg
    tokens = f"{cfg.num_patches + 1} tokens at {cfg.img_size}x{cfg.img_size}"
    stem = f"conv stem, stride {cfg.patch_size}" if cfg.stem == "conv" else f"patch {cfg.patch_size}"
    weights = "EMA weights" if info["weights"] == "ema" else "trained weights"
    mid = f" and {info['step_in_epoch']} step(s)" if info["step_in_epoch"] else ""
    return (f"checkpoint: {path}: {info['arch']} on {info['dataset']}, {weights} after {info['epoch']} epoch(s){mid}\n"
            f"model: {stem} ({tokens}), width {cfg.embed_dim}, depth {cfg.depth}, d_state {cfg.d_state}")


def report(results, names):
    lines = [f"test: {results['test_images']} images of {results['dataset']} on {results['device']} "
             f"({results['precision']}): loss {results['loss']:.4f}, top-1 {results['top1']:.2f}%"
             + (f", top-5 {results['top5']:.2f}%" if results["top5"] is not None else "")]
    if results.get("trainer_top1") is not None:
        lines[-1] += (f" (the trainer's test after epoch {results['epoch']}: loss {results['trainer_loss']:.4f}, "
                      f"top-1 {results['trainer_top1']:.2f}%)")
    cells = [f"{name} {'-' if acc is None else f'{acc:.1f}'}" for name, acc in zip(names, results["per_class"])]
    lines.append("per-class top-1 (%):")
    lines += ["  " + "  ".join(cells[i:i + 10]) for i in range(0, len(cells), 10)]
    params = results["params"]
    lines.append(f"parameters: {params['total']:,}")
    lines += [f"  {k:<22}{v:>13,}" for k, v in params.items() if k != "total"]
    macs = results["macs"]
    lines.append(f"compute: {_human(macs['total'])}MACs per image (multiply-accumulates, what papers call FLOPs)")
    lines.append(f"  {'matrix work':<22}{_human(macs['matrix']):>13} (FlopCounterMode: tokenizer, projections, head)")
    lines.append(f"  {'conv1d':<22}{_human(macs['conv1d']):>13} (formula: depthwise, E*L*K per direction)")
    lines.append(f"  {'selective scan':<22}{_human(macs['scan']):>13} (formula: 4*E*L*N + 2*E*L per direction)")
    lines.append("  not counted: elementwise work (norms, activations, exp/softplus, residual adds, pooling)")
    if results["images_per_s"] is not None:
        lines.append(f"speed on {results['device']} ({results['precision']}): {results['images_per_s']:,.0f} images/s "
                     f"at batch {results['speed_batch']}, {results['latency_ms']:.2f} ms for a batch of 1")
    return "\n".join(lines)


def run(args):
    from models.bimamba import use_causal_conv1d
    from models.cost import macs_per_image, parameter_groups
    from models.scan import resolve_scan
    from models.weights import build_from, export_weights, read_weights

    if args.export:
        size = export_weights(args.checkpoint, args.export, ema=args.ema, normalisation=normalisation)
        print(f"exported {'the EMA' if args.ema else 'the'} weights and configuration of {args.checkpoint} to "
              f"{args.export} ({size / 1e6:.1f} MB)")
        return 0

    sd, info = read_weights(args.checkpoint, args.ema)
    model = build_from(sd, info["vim"], args.checkpoint)
    print(describe(args.checkpoint, info, model))
    params = parameter_groups(model)
    macs = macs_per_image(model)  # on the CPU, before the model moves

    data_dir = args.data_dir or f"./datasets/{info['dataset']}"
    images, labels = load_test_split(info["dataset"], data_dir, info["num_classes"])
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    model.to(device)
    scan = resolve_scan("auto", device)
    model.set_kernels(scan, use_causal_conv1d(scan, compiled=False))
    amp = device.type == "cuda"  # as the trainer tests: bf16 autocast on CUDA, fp32 on the CPU
    mean, std = normalisation(info)
    logits = predict(model, images, mean, std, device, args.batch_size, amp)
    acc = accuracy(logits, labels, info["num_classes"])

    # the trainer's own test of these weights: at the end of the last epoch (not for a mid-epoch save)
    last = info["history"][-1] if info["history"] and not info["step_in_epoch"] else {}
    speed = (None, None) if args.no_speed else measure_speed(model, device, args.batch_size, amp)
    results = dict(checkpoint=args.checkpoint, dataset=info["dataset"], weights=info["weights"],
                   device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   precision="bf16 autocast" if amp else "fp32", test_images=len(labels),
                   loss=acc["loss"], top1=acc["top1"], top5=acc["top5"], per_class=acc["per_class"],
                   trainer_top1=last.get("ema_acc" if args.ema else "test_acc"),
                   trainer_loss=last.get("ema_loss" if args.ema else "test_loss"),
                   params=params, flops_per_image=macs["total"], flops_convention="MACs (multiply-accumulates)",
                   macs=macs, images_per_s=speed[0], latency_ms=speed[1], speed_batch=args.batch_size,
                   epoch=info["epoch"], config=info["config"])
    names = CIFAR10_CLASSES if info["num_classes"] == 10 else [str(c) for c in range(info["num_classes"])]
    print(report(results, names))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if args.plot:
        plot_confusion(acc["confusion"], names, args.plot)
    return 0


def main(argv=None):
    from models.weights import WeightsError
    from training.data import DataError
    try:
        return run(parse_args(argv))
    except (UsageError, WeightsError, DataError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print("evaluate.py: error: the GPU ran out of memory; use a smaller --batch_size", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable --json / --plot / --export path
        print(f"evaluate.py: error: {e.strerror or e} ({e.filename})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
