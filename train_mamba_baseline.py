#!/usr/bin/env python3
"""Train a Vision Mamba from scratch on CIFAR-10/100: the command line. --help lists every option; README.md the main ones.

    python train_mamba_baseline.py --dataset cifar100
    torchrun --nproc_per_node 2 train_mamba_baseline.py --dataset cifar10   # one run over 2 GPUs
"""
import sys


def main(argv=None):
    from training.checkpoint import CheckpointError
    from training.config import UsageError, parse_config
    from training.data import DataError
    from models.pretrained import PretrainedError
    from torch._dynamo.exc import BackendCompilerFailed  # torch.compile could not build kernels (InductorError too)
    try:
        cfg = parse_config(argv)
        from training.engine import train
        return train(cfg)
    except (UsageError, DataError, CheckpointError, PretrainedError) as e:
        print(f"train_mamba_baseline.py: error: {e}", file=sys.stderr)
        return 2
    except BackendCompilerFailed as e:  # the machine's compiler toolchain, not the run: say how to go on without it
        why = " ".join(line.strip() for line in str(e).strip().splitlines()[:2])[:200] or type(e).__name__
        print(f"train_mamba_baseline.py: error: torch.compile could not compile the model here ({why}); run again "
              "with --no_compile (and --resume auto to continue from the last checkpoint)", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's fault (a full disk while logging, a vanished folder): one line, no traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"train_mamba_baseline.py: error: {e.strerror or e}{where}; the last checkpoint is intact, resume "
              "with --resume auto", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
