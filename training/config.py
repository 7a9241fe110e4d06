"""Every option of a run, its default and its check: the one place that knows them.

The resolved configuration is a plain dict (``vars(args)``): it goes into the log and every checkpoint.
"""
import argparse
import sys
import time

from models.vim import VARIANTS, ConvStem
from models.scan import SCAN_CHOICES

DATASETS = {"cifar10": 10, "cifar100": 100}
# --patch_size left out, by stem (the conv stem's is its stride): 2 won the 40-epoch token ablation (docs/RESULTS.md)
DEFAULT_PATCH_SIZE = {"conv": 2, "patch": 4}


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump: the flags are in --help and the README
        raise UsageError(message)


class _Formatter(argparse.HelpFormatter):
    """Short placeholders (N, X, VALUE), so that each option's one line of help starts beside it."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)

    def _get_default_metavar_for_optional(self, action):
        return {int: "N", float: "X"}.get(action.type, "VALUE")


def _switch(parser, name, help):
    """--NAME (default on) and --no_NAME, the spelling the guide's users type."""
    parser.add_argument(f"--{name}", dest=name, action="store_true", default=True, help=help + " (default: on)")
    parser.add_argument(f"--no_{name}", dest=name, action="store_false", help=f"turn --{name} off")


def build_parser():
    """One short line of help per option, in groups; what each one means at length is in README.md, Options."""
    # allow_abbrev off: a prefix (--arc) would silently stand for an option (--arch), also past the launcher's check
    p = _Parser(prog="train_mamba_baseline.py", allow_abbrev=False, formatter_class=_Formatter,
                description="Train a Vision Mamba from scratch on CIFAR-10/100 (DeiT-style recipe). "
                            "Each option at length: README.md, Options.")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="cifar10", help="cifar10 or cifar100 (default: cifar10)")
    d.add_argument("--data_dir", default=None,
                   help="holds cifar-10-batches-py/ or cifar-100-python/")
    d.add_argument("--train_subset", type=int, default=0, help="train on the first N training images only (0: all)")
    d.add_argument("--test_subset", type=int, default=0, help="evaluate on the first N test images only (0: all)")
    d.add_argument("--val_size", type=int, default=0, help="hold out N training images to validate on (0: none)")
    d.add_argument("--split_seed", type=int, default=0, help="which images --val_size holds out (default: 0)")

    m = p.add_argument_group("model")
    m.add_argument("--arch", default="mamba_small",
                   help=", ".join(v + " (default)" * (v == "mamba_small") for v in VARIANTS))
    m.add_argument("--embed_dim", type=int, default=None, help="override the variant's width")
    m.add_argument("--depth", type=int, default=None, help="override the variant's depth")
    m.add_argument("--stem", default="auto", help="conv, patch or auto (default; README, Options)")
    m.add_argument("--patch_size", type=int, default=None,
                   help="patch size, or the conv stem's stride: 2 or 4")
    m.add_argument("--input_size", type=int, default=None, help="resize images to this on the device (default: 32)")
    m.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth of the last block (default: 0.1)")
    m.add_argument("--scan", default="auto", help=f"scan kernel: {'|'.join(SCAN_CHOICES)}")

    r = p.add_argument_group("recipe")
    r.add_argument("--epochs", type=int, default=300, help="(default: 300)")
    r.add_argument("--batch_size", type=int, default=128, help="images per micro-batch and process (default: 128)")
    r.add_argument("--accum_steps", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    r.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, after warmup (default: 1e-3)")
    r.add_argument("--min_lr", type=float, default=1e-5, help="learning rate at the cosine's end (default: 1e-5)")
    r.add_argument("--warmup_lr", type=float, default=1e-6, help="learning rate at step 0 (default: 1e-6)")
    r.add_argument("--warmup_epochs", type=float, default=20, help="linear warmup, in epochs (default: 20)")
    r.add_argument("--weight_decay", type=float, default=0.05, help="AdamW's weight decay (default: 0.05)")
    r.add_argument("--label_smoothing", type=float, default=0.1, help="(default: 0.1)")
    r.add_argument("--clip_grad", type=float, default=0.0, help="max gradient norm (default: 0, off)")
    r.add_argument("--model_ema", action="store_true", help="also keep and evaluate an EMA of the weights")
    r.add_argument("--model_ema_decay", type=float, default=0.9999,
                   help="the EMA's decay once warmed up (default: 0.9999)")

    a = p.add_argument_group("augmentation")
    _switch(a, "use_randaugment", "RandAugment(2, 9)")
    _switch(a, "use_crop", "random crop, 4 pixels of zero padding")
    _switch(a, "use_flip", "random horizontal flip")
    _switch(a, "use_mixup", "Mixup")
    _switch(a, "use_cutmix", "CutMix")
    a.add_argument("--mixup_alpha", type=float, default=0.8, help="Mixup's Beta(alpha, alpha) (default: 0.8)")
    a.add_argument("--cutmix_alpha", type=float, default=1.0, help="CutMix's Beta(alpha, alpha) (default: 1.0)")

    u = p.add_argument_group("run")
    u.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    u.add_argument("--gpu", type=int, default=0, help="CUDA device index (default: 0; not under torchrun)")
    u.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32")
    u.add_argument("--compile", dest="compile", action="store_const", const=True, default=None,
                   help="torch.compile the model (default: on with CUDA)")
    u.add_argument("--no_compile", dest="compile", action="store_const", const=False, help="turn --compile off")
    u.add_argument("--cuda_graphs", action="store_true",
                   help="compile with CUDA graphs (one CUDA process)")
    u.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    u.add_argument("--seed", type=int, default=0, help="weights, data order and augmentation (default: 0)")
    u.add_argument("--eval_batch_size", type=int, default=1024, help="(default: 1024)")
    u.add_argument("--num_workers", type=int, default=0, help="CPU threads for host-side work (0: torch's default)")
    u.add_argument("--max_bad_steps", type=int, default=20,
                   help="stop at N non-finite losses in a row (default: 20)")
    u.add_argument("--no_progress", action="store_true", help="no progress bar, even on a terminal")
    u.add_argument("--log_dir", default="./logs_mamba_baseline", help="(default: ./logs_mamba_baseline)")
    u.add_argument("--run_id", default=None, help="the log names' last part (default: the start time)")

    c = p.add_argument_group("checkpoints")
    c.add_argument("--save_dir", default=None, help="(default: ./checkpoint/mamba_baseline/<dataset>)")
    c.add_argument("--resume", default=None, help="a checkpoint, or auto: the last one in --save_dir")
    c.add_argument("--save_freq", type=int, default=50, help="a numbered checkpoint every N epochs (default: 50)")
    c.add_argument("--save_every_minutes", type=float, default=0.0,
                   help="also save mid-epoch every X minutes (0: off)")

    f = p.add_argument_group("fine-tuning")
    f.add_argument("--pretrained", default=None, help="start from official Vim or exported weights")
    return p


def _check(cond, message):
    if not cond:
        raise UsageError(message)


def parse_config(argv=None):
    """argv -> a validated argparse.Namespace with every default resolved. Raises UsageError."""
    args = build_parser().parse_args(argv)
    _check(args.dataset in DATASETS, f"unknown dataset {args.dataset!r}; choose cifar10 or cifar100")
    _check(args.arch in VARIANTS, f"unknown architecture {args.arch!r}; choose from {', '.join(VARIANTS)}")
    for name in ("epochs", "batch_size", "accum_steps", "eval_batch_size", "save_freq", "max_bad_steps"):
        _check(getattr(args, name) > 0, f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("embed_dim", "depth"):
        _check(getattr(args, name) is None or getattr(args, name) > 0, f"--{name} must be positive")
    _check(args.lr > 0, f"--lr must be positive, got {args.lr}")
    _check(args.weight_decay >= 0, "--weight_decay must be >= 0")
    _check(0 <= args.warmup_epochs < args.epochs,
           f"--warmup_epochs ({args.warmup_epochs:g}) must be shorter than --epochs ({args.epochs})")
    _check(0 <= args.label_smoothing < 1, "--label_smoothing must be in [0, 1)")
    _check(args.mixup_alpha >= 0 and args.cutmix_alpha >= 0, "--mixup_alpha and --cutmix_alpha must be >= 0")
    _check(0 <= args.drop_path < 1, "--drop_path must be in [0, 1)")
    _check(args.stem in ("auto", "patch", "conv"), f"--stem must be auto, patch or conv, got {args.stem!r}")
    # The conv stem won the 40-epoch ablation (docs/RESULTS.md); a patch size or official weights ask for patches.
    # A resumed run with --stem left at auto, or --patch_size left out, takes the checkpoint's (training/engine.py).
    args.stem_auto = args.stem == "auto"
    args.patch_size_auto = args.patch_size is None
    if args.stem_auto:
        args.stem = "patch" if (args.pretrained or args.patch_size is not None) else "conv"
    if args.pretrained:  # the file gives the tokenizer (an --stem given must match it: training/engine.py)
        _check(args.embed_dim is None and args.depth is None and args.patch_size is None,
               "--embed_dim, --depth and --patch_size come from the --pretrained checkpoint; leave them out")
        _check(args.input_size is None or args.input_size > 0, "--input_size must be positive")
    elif args.stem == "conv":
        # --patch_size is the stem's stride here: 2 (256 tokens at 32x32, as patch 2) or 4 (64, as patch 4)
        args.patch_size = DEFAULT_PATCH_SIZE["conv"] if args.patch_size is None else args.patch_size
        _check(args.patch_size in ConvStem.STRIDES,
               f"--stem conv takes --patch_size 2 or 4 (its stride), got {args.patch_size}")
        args.input_size = 32 if args.input_size is None else args.input_size
        _check(args.input_size > 0 and args.input_size % args.patch_size == 0,
               f"--stem conv needs --input_size divisible by {args.patch_size}")
    else:
        args.input_size = 32 if args.input_size is None else args.input_size
        args.patch_size = DEFAULT_PATCH_SIZE["patch"] if args.patch_size is None else args.patch_size
        _check(args.input_size > 0 and args.patch_size > 0 and args.input_size % args.patch_size == 0,
               f"--patch_size must divide --input_size ({args.input_size}), e.g. 1, 2, 4, 8, 16, 32 at 32")
    _check(args.clip_grad >= 0 and args.min_lr >= 0 and args.warmup_lr >= 0,
           "--clip_grad, --min_lr and --warmup_lr must be >= 0")
    _check(args.scan in SCAN_CHOICES, f"--scan must be one of {', '.join(SCAN_CHOICES)}")
    _check(args.device in ("auto", "cuda", "cpu"), "--device must be auto, cuda or cpu")
    _check(args.precision in ("auto", "bf16", "fp32"), "--precision must be auto, bf16 or fp32")
    _check(args.num_workers >= 0 and args.train_subset >= 0 and args.test_subset >= 0 and args.gpu >= 0,
           "--num_workers, --train_subset, --test_subset and --gpu must be >= 0")
    _check(args.save_every_minutes >= 0, "--save_every_minutes must be >= 0")
    _check(not (args.cuda_graphs and args.compile is False), "--cuda_graphs compiles the model; leave out --no_compile")
    # accumulation keeps one micro-batch's gradients while the recorded backward runs again: untested with graphs
    _check(not (args.cuda_graphs and args.accum_steps > 1), "--cuda_graphs needs --accum_steps 1")
    if args.cuda_graphs:
        args.compile = True
    _check(0 < args.model_ema_decay < 1, f"--model_ema_decay must be in (0, 1), got {args.model_ema_decay:g}")
    mixing = (args.use_mixup and args.mixup_alpha > 0) or (args.use_cutmix and args.cutmix_alpha > 0)
    _check(not mixing or args.batch_size % 2 == 0, "--batch_size must be even when Mixup or CutMix is on")
    args.num_classes = DATASETS[args.dataset]
    _check(args.val_size >= 0 and args.split_seed >= 0, "--val_size and --split_seed must be >= 0")
    _check(args.val_size % args.num_classes == 0, f"--val_size must be a multiple of {args.dataset}'s "
           f"{args.num_classes} classes (the same number of each is held out), got {args.val_size}")
    args.data_dir = args.data_dir or f"./datasets/{args.dataset}"
    args.save_dir = args.save_dir or f"./checkpoint/mamba_baseline/{args.dataset}"
    args.run_id = args.run_id or time.strftime("%Y%m%d_%H%M%S")
    args.command = " ".join(sys.argv) if argv is None else "train_mamba_baseline.py " + " ".join(argv)
    return args
