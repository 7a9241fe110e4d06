"""Every option of a run, its default and its check: the one place that knows them.

The resolved configuration is a plain dict (``vars(args)``): it goes into the log and every checkpoint.
"""
import argparse
import sys
import time

from models.vim import VARIANTS, ConvStem
from models.scan import SCAN_CHOICES

DATASETS = {"cifar10": 10, "cifar100": 100}
# --patch_size left out, by stem (the conv stem's is its stride): 2 won the 40-epoch token ablation (README, Results)
DEFAULT_PATCH_SIZE = {"conv": 2, "patch": 4}


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump: the flags are in --help and the README
        raise UsageError(message)


def _switch(parser, name, help):
    """--NAME (default on) and --no_NAME, the spelling the guide's users type."""
    parser.add_argument(f"--{name}", dest=name, action="store_true", default=True, help=help + " (default: on)")
    parser.add_argument(f"--no_{name}", dest=name, action="store_false", help=f"turn --{name} off")


def build_parser():
    p = _Parser(prog="train_mamba_baseline.py",
                description="Train a Vision Mamba from scratch on CIFAR-10/100 (DeiT-style recipe).")
    g = p.add_argument_group("the guide's options")
    g.add_argument("--dataset", default="cifar10", help="cifar10 or cifar100")
    g.add_argument("--arch", default="mamba_small", help=f"one of {', '.join(VARIANTS)}")
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--batch_size", type=int, default=128, help="images per micro-batch and process; one optimizer "
                   "step sees batch_size x accum_steps x processes")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (after warmup)")
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--warmup_epochs", type=float, default=20)
    _switch(g, "use_randaugment", "RandAugment(2, 9)")
    _switch(g, "use_crop", "random crop with 4 pixels of zero padding")
    _switch(g, "use_flip", "random horizontal flip")
    _switch(g, "use_mixup", "Mixup")
    _switch(g, "use_cutmix", "CutMix")
    g.add_argument("--mixup_alpha", type=float, default=0.8)
    g.add_argument("--cutmix_alpha", type=float, default=1.0)
    g.add_argument("--label_smoothing", type=float, default=0.1)
    g.add_argument("--gpu", type=int, default=0, help="CUDA device index")
    g.add_argument("--save_dir", default=None, help="default ./checkpoint/mamba_baseline/<dataset>")

    m = p.add_argument_group("model")
    m.add_argument("--embed_dim", type=int, default=None, help="override the variant's width")
    m.add_argument("--depth", type=int, default=None, help="override the variant's depth")
    m.add_argument("--patch_size", type=int, default=None,
                   help="patch size (default 4 at 32x32: 64 patches + cls token; with --pretrained: the checkpoint's); "
                   "with --stem conv, the stem's stride: 2 (default: 256 tokens + cls token) or 4 (64 + cls); on "
                   "--resume, left out: the checkpoint's")
    m.add_argument("--stem", default="auto", help="how images become tokens: conv (two stages of 3x3 conv + ReLU, "
                   "the first with a 3x3 max-pool of stride 2: 2x2 pixels per token; with --patch_size 4 the second "
                   "pools too: 4x4) or patch (Vim's patch embedding, --patch_size); auto (default): conv from scratch, "
                   "patch with --patch_size or --pretrained, and a resumed run's own stem")
    m.add_argument("--input_size", type=int, default=None,
                   help="input resolution; CIFAR images are resized up to it on the device (default 32; with "
                        "--pretrained: the checkpoint's, e.g. 224)")
    m.add_argument("--pretrained", default=None, help="fine-tune from an official Vim checkpoint (.pth)")
    m.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate of the last block")
    m.add_argument("--scan", default="auto", help=f"selective-scan backend: {'|'.join(SCAN_CHOICES)}")

    t = p.add_argument_group("training")
    t.add_argument("--accum_steps", type=int, default=1, help="gradient accumulation: micro-batches per step")
    t.add_argument("--clip_grad", type=float, default=0.0, help="max gradient norm (0: off)")
    t.add_argument("--min_lr", type=float, default=1e-5, help="learning rate at the end of the cosine")
    t.add_argument("--warmup_lr", type=float, default=1e-6, help="learning rate at step 0")
    t.add_argument("--eval_batch_size", type=int, default=1024)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    t.add_argument("--precision", default="auto", help="auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32")
    t.add_argument("--max_bad_steps", type=int, default=20,
                   help="stop after this many consecutive steps with a non-finite loss")
    t.add_argument("--compile", dest="compile", action="store_const", const=True, default=None,
                   help="torch.compile the model for training (default: on with CUDA unless --deterministic)")
    t.add_argument("--no_compile", dest="compile", action="store_const", const=False, help="turn --compile off")
    t.add_argument("--cuda_graphs", action="store_true",
                   help="compile with CUDA graphs (torch.compile's reduce-overhead mode): each step's forward and "
                        "backward replay as recorded graphs instead of thousands of kernel launches, which matters at "
                        "small batches (README, Speed); needs one CUDA process, implies --compile (default: off)")
    t.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    t.add_argument("--model_ema", action="store_true",
                   help="also keep an exponential moving average of the weights (timm ModelEmaV3) and evaluate it "
                        "every epoch; its warmup is on: at optimizer step t the decay is 1 - t^(-2/3) (0 at step 1: "
                        "a copy) capped at --model_ema_decay, so that short runs average over a window they can "
                        "fill (default: off)")
    t.add_argument("--model_ema_decay", type=float, default=0.9999,
                   help="the EMA's decay per optimizer step once warmed up, in (0, 1) (default: 0.9999)")

    d = p.add_argument_group("data")
    d.add_argument("--data_dir", default=None, help="default ./datasets/<dataset>; holds cifar-10-batches-py/ "
                   "or cifar-100-python/")
    d.add_argument("--num_workers", type=int, default=0,
                   help="CPU threads for host-side work (0: torch's default); augmentation runs batched "
                        "on the training device, so no loader processes are needed")
    d.add_argument("--train_subset", type=int, default=0, help="use only the first N training images (0: all)")
    d.add_argument("--test_subset", type=int, default=0, help="evaluate on the first N test images (0: all)")

    o = p.add_argument_group("checkpoints and logs")
    o.add_argument("--resume", default=None, help="a checkpoint path, or 'auto': the last one in save_dir")
    o.add_argument("--save_freq", type=int, default=50, help="keep a numbered checkpoint every N epochs")
    o.add_argument("--save_every_minutes", type=float, default=0.0,
                   help="also write the last checkpoint mid-epoch this often (0: only at epoch ends)")
    o.add_argument("--log_dir", default="./logs_mamba_baseline")
    o.add_argument("--run_id", default=None, help="the log name's timestamp part (default: now)")
    o.add_argument("--no_progress", action="store_true", help="no progress bar even on a terminal")
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
    # The conv stem won the 40-epoch ablation (README, Results); a patch size or official weights ask for patches.
    # A resumed run with --stem left at auto, or --patch_size left out, takes the checkpoint's (training/engine.py).
    args.stem_auto = args.stem == "auto"
    args.patch_size_auto = args.patch_size is None
    if args.stem_auto:
        args.stem = "patch" if (args.pretrained or args.patch_size is not None) else "conv"
    if args.stem == "conv":
        _check(not args.pretrained, "--stem conv trains from scratch; official checkpoints (--pretrained) use patches")
        # --patch_size is the stem's stride here: 2 (256 tokens at 32x32, as patch 2) or 4 (64, as patch 4)
        args.patch_size = DEFAULT_PATCH_SIZE["conv"] if args.patch_size is None else args.patch_size
        _check(args.patch_size in ConvStem.STRIDES,
               f"--stem conv takes --patch_size 2 or 4 (its stride), got {args.patch_size}")
        args.input_size = 32 if args.input_size is None else args.input_size
        _check(args.input_size > 0 and args.input_size % args.patch_size == 0,
               f"--stem conv needs --input_size divisible by {args.patch_size}")
    elif args.pretrained:
        _check(args.embed_dim is None and args.depth is None and args.patch_size is None,
               "--embed_dim, --depth and --patch_size come from the --pretrained checkpoint; leave them out")
        _check(args.input_size is None or args.input_size > 0, "--input_size must be positive")
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
    args.data_dir = args.data_dir or f"./datasets/{args.dataset}"
    args.save_dir = args.save_dir or f"./checkpoint/mamba_baseline/{args.dataset}"
    args.run_id = args.run_id or time.strftime("%Y%m%d_%H%M%S")
    args.command = " ".join(sys.argv) if argv is None else "train_mamba_baseline.py " + " ".join(argv)
    return args
