"""The training run: set up, train_one_epoch, evaluate, checkpoint, log, resume, stop cleanly.

Nothing in the training step waits for the GPU: the loss, the non-finite-step counters and the epoch's
sums stay on the device; the host reads them every ``SYNC_EVERY`` steps and at the end of an epoch.
"""
import contextlib
import os
import random
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from models.bimamba import use_causal_conv1d
from models.scan import resolve_scan
from models.pretrained import load_pretrained, matching_variant, pretrained_model_config, pretrained_normalisation
from models.vim import build_model
from training import distributed as ddp
from training.checkpoint import (SAVED_DEFAULTS, CheckpointError, RunLock, check_compatible, check_split,
                                 checkpoint_paths, load_checkpoint, rng_state, save_checkpoint, set_rng_state)
from training.config import UsageError
from training.data import IMAGENET_MEAN_STD, MEAN_STD, DeviceData, load_cifar, split_hash, validation_split
from training.logs import RunLog, log_paths, progress
from training.optim import build_optimizer, lr_at
from training.step import TrainStep, resize

SYNC_EVERY = 25  # steps between host reads of the device-side counters


class Stopped(Exception):
    """A signal asked the run to stop; the last checkpoint was written."""

    def __init__(self, signum):
        self.signum = signum


class NonFiniteLoss(Exception):
    pass


@dataclass
class Position:
    """Where the run is; saved in every checkpoint."""
    epoch: int = 0              # epochs completed
    step_in_epoch: int = 0      # optimizer steps done in the current epoch (0 at an epoch boundary)
    global_step: int = 0
    best_acc: float = 0.0       # top-1 on the validation split (--val_size), else on the test set
    best_epoch: int = 0         # 0: no evaluation yet (the first one is the best so far, even at 0.00%)
    best_ema_acc: float = 0.0   # the EMA model's (--model_ema), chosen the same way; 0 without it
    best_ema_epoch: int = 0
    bad_steps: int = 0          # steps skipped for a non-finite loss, whole run
    history: list = field(default_factory=list)
    partial: dict = field(default_factory=dict)   # a stopped epoch's sums so far: loss_sum, images, seconds


class StopFlag:
    """While training (`with flag:`), SIGTERM / SIGINT set a flag that the loop reads after each step; a second
    signal stops at once. On leaving, the handlers that were there before come back, so a run started from
    Python (a notebook, a test) leaves Ctrl-C and SIGTERM working as they did."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum


def seed_epoch(seed, epoch, rank):
    """Every random draw of an epoch (augmentation, Mixup, drop path) follows from (seed, epoch, rank), so a
    run resumed at an epoch boundary needs no saved RNG state (mid-epoch resume restores the saved one)."""
    s = (seed * 100_003 + epoch) * 1024 + rank
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def resolve_device(cfg, local_rank):
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA GPU is visible (use --device cpu)")
    if "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        return torch.device("cuda", local_rank)
    if cfg.gpu >= torch.cuda.device_count():
        raise UsageError(f"--gpu {cfg.gpu} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", cfg.gpu)


def set_backend_flags(deterministic):
    """Process-wide kernel choices of a training run (tools/benchmark.py times its step with the same ones): TF32
    for fp32 matrix multiplies and convolutions, and cuDNN's autotuner, which times the candidate algorithms for
    each convolution shape once and keeps the fastest (a run's shapes never change: the stem's convolutions are
    tuned in the first step); with --deterministic, deterministic kernels and no autotuner (it may pick
    differently from run to run)."""
    if deterministic:
        torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = not deterministic


def default_compile(device, deterministic):
    """--compile left out: on with CUDA, where it made the training step 1.6-1.9x faster (docs/SPEED.md); off on the
    CPU (minutes of compiling for a test-sized run) and with --deterministic (inductor's kernels are not)."""
    return device.type == "cuda" and not deterministic


def cuda_graph_skips():
    """How many compiled graphs torch.compile ran without CUDA graphs under mode="reduce-overhead" (it says why only
    in its `cudagraphs` debug log, TORCH_LOGS=cudagraphs), so that --cuda_graphs never falls back silently."""
    from torch._dynamo.utils import counters
    return counters["inductor"]["cudagraph_skips"]


def find_resume(cfg):
    if cfg.resume != "auto":
        return cfg.resume
    last = checkpoint_paths(cfg.save_dir, cfg.arch, cfg.dataset)["last"]
    return last if os.path.isfile(last) else None


class Run:
    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world, local_rank = ddp.init_distributed("cuda" if self._wants_cuda() else "cpu")
        self.device = resolve_device(cfg, local_rank)
        if cfg.compile is None:
            cfg.compile = default_compile(self.device, cfg.deterministic)
        if cfg.cuda_graphs and (self.device.type != "cuda" or self.world > 1):
            # one process only: compiled DDP splits the graph at its gradient buckets, untested with CUDA graphs here
            where = f"this run: {self.world} processes" if self.world > 1 else f"device: {self.device}"
            raise UsageError(f"--cuda_graphs needs a CUDA device and a single process ({where})")
        try:  # a --scan backend this machine cannot run is bad input (one line, exit 2), not a crash
            resolve_scan(cfg.scan, self.device)
        except ValueError as e:
            raise UsageError(str(e)) from None
        self.is_main = self.rank == 0
        self.pretrained_shape, self.pretrained_info = {}, None
        self.stop = StopFlag()

    def _wants_cuda(self):
        return self.cfg.device == "cuda" or (self.cfg.device == "auto" and torch.cuda.is_available())

    # ---- setup -------------------------------------------------------------------------------------------
    def setup(self):
        cfg, device = self.cfg, self.device
        if cfg.num_workers:
            torch.set_num_threads(cfg.num_workers)
        set_backend_flags(cfg.deterministic)
        self.amp = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        self.paths = checkpoint_paths(cfg.save_dir, cfg.arch, cfg.dataset)

        if cfg.pretrained:
            self._resolve_pretrained_shape()
        resume_path = find_resume(cfg) if cfg.resume else None
        self.ckpt = load_checkpoint(resume_path) if resume_path else None
        if self.ckpt:
            if cfg.stem_auto:  # --stem left at its default: the run goes on with the stem it was made with
                cfg.stem = self.ckpt["config"].get("stem", SAVED_DEFAULTS["stem"])
            if cfg.patch_size_auto and not cfg.pretrained:  # likewise its patch size (the conv stem's stride)
                cfg.patch_size = self.ckpt["config"]["patch_size"]
            check_compatible(self.ckpt, cfg, resume_path)
            done = self.ckpt["position"]
            if done["epoch"] >= cfg.epochs and done["step_in_epoch"] == 0:
                raise UsageError(f"{resume_path} is a finished run ({done['epoch']}/{cfg.epochs} epochs, best "
                                 f"{done['best_acc']:.2f}%); nothing to resume")
        self.resume_path = resume_path

        data = load_cifar(cfg.dataset, cfg.data_dir, download=self.is_main)
        # after the data, so that a bad data folder is what gets reported, also over an existing run
        if not cfg.resume and os.path.isfile(self.paths["last"]):
            raise CheckpointError(f"{cfg.save_dir} already holds a run ({os.path.basename(self.paths['last'])}); "
                                  "add --resume auto to continue it, or use another --save_dir (nothing was "
                                  "overwritten)")
        (xtr, ytr), (xte, yte) = data["train"], data["test"]
        if cfg.train_subset:
            xtr, ytr = xtr[:cfg.train_subset], ytr[:cfg.train_subset]
        if cfg.test_subset:
            xte, yte = xte[:cfg.test_subset], yte[:cfg.test_subset]
        self.val_data, self.split = None, None
        if cfg.val_size:  # held out of the (subset of the) training set, on the CPU, before anything goes to the device
            try:
                train_idx, val_idx = validation_split(ytr, cfg.val_size, cfg.num_classes, cfg.split_seed)
            except ValueError as e:
                raise UsageError(str(e)) from None
            self.split = {"val_size": cfg.val_size, "split_seed": cfg.split_seed, "held_out": split_hash(val_idx)}
            self.val_data = DeviceData(xtr[val_idx], ytr[val_idx], device)
            xtr, ytr = xtr[train_idx], ytr[train_idx]
        if self.ckpt:
            check_split(self.ckpt, self.split, resume_path)
        self.train_data = DeviceData(xtr, ytr, device)
        self.test_data = DeviceData(xte, yte, device)
        self.steps_per_epoch = self.train_data.steps_per_epoch(cfg.batch_size * cfg.accum_steps, self.world)
        if self.steps_per_epoch == 0:
            raise UsageError(f"{len(self.train_data)} training images are fewer than one step's "
                             f"{cfg.batch_size * cfg.accum_steps * self.world}; lower --batch_size")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = build_model(cfg.arch, cfg.num_classes, embed_dim=cfg.embed_dim, depth=cfg.depth,
                                 patch_size=cfg.patch_size, img_size=cfg.input_size, drop_path=cfg.drop_path,
                                 stem=cfg.stem,
                                 **self.pretrained_shape).to(device)
        self.scan = resolve_scan(cfg.scan, device)
        self.causal_conv = use_causal_conv1d(self.scan, cfg.compile)
        self.model.set_kernels(self.scan, self.causal_conv)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, device)
        self.pos = Position()
        if self.ckpt:
            try:  # tensors that do not fit this model (edited file, other code version): bad input, not a crash
                self.model.load_state_dict(self.ckpt["model"])
                self.optimizer.load_state_dict(self.ckpt["optimizer"])
                self.pos = Position(**self.ckpt["position"])
                self.saved_world = len(self.ckpt.get("per_rank") or [None])  # None in a 1-process checkpoint
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                why = " ".join(str(e).split())[:300] or type(e).__name__
                raise CheckpointError(f"{resume_path} does not fit this model or optimizer ({why})") from None
            if self.pos.step_in_epoch and self.saved_world != self.world:
                raise CheckpointError(f"{resume_path} was saved mid-epoch by {self.saved_world} process(es); resume "
                                      f"it with {self.saved_world}, or from an epoch-boundary checkpoint")
        elif cfg.pretrained:  # a resumed run has its weights already: the pretrained ones only seed a new run
            self.pretrained_info = []  # its two summary lines, logged once the log is open
            load_pretrained(self.model, cfg.pretrained, log=self.pretrained_info.append)
        self.ema = None
        if cfg.model_ema:
            # A copy of the weights as they now are (fresh, pretrained or resumed), on the training device. Every
            # rank holds the same weights, so every rank keeps its own identical EMA: no communication.
            self.ema = ModelEmaV3(self.model, decay=cfg.model_ema_decay, use_warmup=True)
            if self.ckpt and self.ckpt.get("model_ema") is not None:
                try:
                    self.ema.module.load_state_dict(self.ckpt["model_ema"])
                except (RuntimeError, ValueError, KeyError, TypeError) as e:
                    why = " ".join(str(e).split())[:300] or type(e).__name__
                    raise CheckpointError(f"{resume_path} holds EMA weights that do not fit this model ({why})") \
                        from None
        self.train_model = self.model
        if self.world > 1:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)

        if cfg.compile:
            self.train_model = torch.compile(self.train_model, mode="reduce-overhead" if cfg.cuda_graphs else None)
        # ImageNet weights expect ImageNet's normalisation; from scratch, the data set's own statistics.
        # (a file exported by evaluate.py --export names its own)
        mean, std = (pretrained_normalisation(cfg.pretrained) or IMAGENET_MEAN_STD) if cfg.pretrained \
            else MEAN_STD[cfg.dataset]
        self.normalisation = {"mean": mean, "std": std}  # in every checkpoint: evaluate.py normalises the same way
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.step = TrainStep(self.model, self.optimizer, num_classes=cfg.num_classes, mean=mean, std=std,
                              use_randaugment=cfg.use_randaugment, use_crop=cfg.use_crop, use_flip=cfg.use_flip,
                              mixup_alpha=cfg.mixup_alpha if cfg.use_mixup else 0.0,
                              cutmix_alpha=cfg.cutmix_alpha if cfg.use_cutmix else 0.0,
                              label_smoothing=cfg.label_smoothing, amp=self.amp, clip_grad=cfg.clip_grad,
                              input_size=cfg.input_size, train_model=self.train_model, cuda_graphs=cfg.cuda_graphs)
        self._open_log()

    def _resolve_pretrained_shape(self):
        """With --pretrained the checkpoint fixes width, depth, patch size and (unless --input_size) resolution;
        they are written into the config so the log and every checkpoint record the real model."""
        cfg = self.cfg
        shape = pretrained_model_config(cfg.pretrained, cfg.input_size)
        variant = matching_variant(shape)
        if variant is not None and variant != cfg.arch:
            raise UsageError(f"{cfg.pretrained} holds a {variant} model (width {shape['embed_dim']}, depth "
                             f"{shape['depth']}); pass --arch {variant}")
        cfg.embed_dim, cfg.depth, cfg.patch_size = shape.pop("embed_dim"), shape.pop("depth"), shape.pop("patch_size")
        cfg.input_size = shape.pop("img_size")
        stem = shape.pop("stem")  # an exported file of this project may hold the conv stem
        if not cfg.stem_auto and cfg.stem != stem:
            raise UsageError(f"{cfg.pretrained} holds {'the conv stem' if stem == 'conv' else 'a patch embedding'}, "
                             f"not the --stem {cfg.stem} asked for; leave --stem out to take the file's")
        cfg.stem = stem
        self.pretrained_shape = shape  # d_state, d_conv, expand, in_chans

    def _open_log(self):
        cfg = self.cfg
        # Each invocation writes its own .log (the launcher prints its path); on resume the new .jsonl starts
        # with the checkpoint's whole history, so it alone holds every epoch of the run.
        log_path, jsonl_path = log_paths(cfg.log_dir, cfg.arch, cfg.dataset, cfg.run_id)
        self.log = RunLog(log_path, jsonl_path, enabled=self.is_main)
        if cfg.resume == "auto" and not self.ckpt:
            self.log.info(f"--resume auto: no checkpoint in {cfg.save_dir} yet, starting a new run")
        if self.ckpt:
            self.log.rewrite_jsonl(self.pos.history)
            self.log.info(f"resumed from {self.resume_path} (log {self.ckpt['log_path']}): epoch {self.pos.epoch}, "
                          f"step {self.pos.step_in_epoch} of {self.steps_per_epoch}, best {'val ' * bool(self.split)}"
                          f"{self.pos.best_acc:.2f}%")
            self._note_changed_settings()
        n_params = sum(p.numel() for p in self.model.parameters())
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        step_batch = cfg.batch_size * cfg.accum_steps * self.world
        self.log.info(f"command: {cfg.command}")
        self.log.info("config: " + " ".join(f"{k}={v}" for k, v in sorted(vars(cfg).items()) if k != "command"))
        self.log.info(f"model: {cfg.arch} {n_params:,} parameters, {self.model.cfg.num_patches + 1} tokens "
                      f"({'conv stem, stride' if cfg.stem == 'conv' else 'patch'} {cfg.patch_size}), "
                      f"width {self.model.cfg.embed_dim}, depth {self.model.cfg.depth}")
        conv = "triton" if self.scan == "triton" else "causal-conv1d" if self.causal_conv else "PyTorch"
        self.log.info(f"device: {gpu} x{self.world} | scan kernel: {self.scan} | conv kernel: {conv} | precision: "
                      f"{'bf16 autocast' if self.amp else 'fp32'}{' | torch.compile' if cfg.compile else ''}"
                      f"{' (CUDA graphs)' if cfg.cuda_graphs else ''}")
        val = f"{len(self.val_data)} val (held out: {self.split['held_out']}) / " if self.split else ""
        self.log.info(f"data: {len(self.train_data)} train / {val}{len(self.test_data)} test images | global batch "
                      f"{step_batch} = {cfg.batch_size} x {cfg.accum_steps} accum x {self.world} process(es) | "
                      f"lr {cfg.lr:g} (not rescaled with the batch) | {self.steps_per_epoch} steps/epoch, "
                      f"{self.warmup_steps} warmup steps")
        for line in self.pretrained_info or []:
            norm = "ImageNet" if tuple(self.normalisation.values()) == IMAGENET_MEAN_STD else "the file's"
            self.log.info(f"{line} | input {cfg.input_size}x{cfg.input_size}, {norm} normalisation")
        self.log.info(f"log: {self.log.log_path} | metrics: {self.log.jsonl_path} | checkpoints: {cfg.save_dir}")

    def _note_changed_settings(self):
        saved = self.ckpt["config"]
        has_ema = self.ckpt.get("model_ema") is not None
        recipe = ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "use_randaugment", "use_mixup",
                  "use_cutmix", "mixup_alpha", "cutmix_alpha", "label_smoothing", "accum_steps", "clip_grad",
                  "min_lr", "warmup_lr", "seed", "drop_path", "train_subset") + \
            (("model_ema_decay",) if has_ema and self.cfg.model_ema else ())
        changed = [f"{k} {saved.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in recipe
                   if k in saved and saved[k] != getattr(self.cfg, k)]
        # what the recipe means is the global batch: a run moved to more processes (or from accumulation to
        # processes) at the same global batch keeps its recipe
        saved_global = saved["batch_size"] * saved.get("accum_steps", 1) * self.saved_world
        here_global = self.cfg.batch_size * self.cfg.accum_steps * self.world
        if saved_global == here_global:
            changed = [c for c in changed if not c.startswith(("batch_size ", "accum_steps "))]
            if self.saved_world != self.world:
                self.log.info(f"resuming over {self.world} process(es); the checkpoint's run had "
                              f"{self.saved_world}: the same global batch {here_global}")
        else:
            if self.saved_world != self.world:
                changed.append(f"processes {self.saved_world} -> {self.world}")
            changed.append(f"global batch {saved_global} -> {here_global}")
        if changed:
            self.log.info("warning: resuming with settings that differ from the checkpoint's: " + "; ".join(changed))
        if self.cfg.model_ema and not has_ema:
            self.log.info("warning: --model_ema is on but the checkpoint holds no EMA weights: the EMA starts from "
                          f"the resumed weights at step {self.pos.global_step}")
        elif has_ema and not self.cfg.model_ema:
            self.log.info("warning: the checkpoint holds EMA weights but --model_ema is off: they are dropped (the "
                          "next checkpoints hold none)")

    # ---- checkpoints -------------------------------------------------------------------------------------
    def checkpoint_state(self):
        return {"format": "vim-cifar-checkpoint/1", "model": self.model.state_dict(),
                "model_ema": self.ema.module.state_dict() if self.ema is not None else None,  # --model_ema
                "optimizer": self.optimizer.state_dict(), "position": vars(self.pos).copy(),
                "rng": rng_state(), "scaler": None,  # bf16 autocast needs no loss scaling
                "config": {k: v for k, v in vars(self.cfg).items()}, "log_path": self.log.log_path,
                "normalisation": self.normalisation,
                "split": self.split}  # --val_size's held-out images (None without): a resume must hold out the same

    def save(self, *kinds):
        """Rank 0 writes. Under DDP every rank calls this at the same step: each rank's RNG state and epoch sums
        go into the checkpoint too, so that a mid-epoch resume gives each rank back its own."""
        per_rank = ddp.gather_objects({"rng": rng_state(), "partial": dict(self.pos.partial)}) \
            if self.world > 1 else None
        if not self.is_main:
            return
        state = self.checkpoint_state()
        state["per_rank"] = per_rank
        for kind in kinds:
            path = self.paths[kind] if kind != "epoch" else self.paths["epoch"].format(self.pos.epoch)
            save_checkpoint(state, path)

    # ---- the loop ----------------------------------------------------------------------------------------
    def train_one_epoch(self, epoch):
        cfg, pos, device = self.cfg, self.pos, self.device
        start = pos.step_in_epoch
        if start == 0:
            seed_epoch(cfg.seed, epoch, self.rank)
            pos.partial = {"loss_sum": 0.0, "images": 0, "seconds": 0.0}
        else:  # mid-epoch resume: this rank's RNG and sums exactly as they were at the stop
            mine = self.ckpt["per_rank"][self.rank] if self.ckpt.get("per_rank") else self.ckpt
            set_rng_state(mine["rng"])
            if self.ckpt.get("per_rank"):
                pos.partial = dict(mine["partial"])
        self.model.train()
        # the epoch's running float32 loss sum, continued (not restarted) after a mid-epoch save or resume, so
        # that a stopped + resumed epoch adds the same numbers in the same order: an identical train_loss
        loss_sum = torch.tensor(pos.partial["loss_sum"], dtype=torch.float32, device=device)
        bad_streak = torch.zeros((), device=device)
        max_streak = torch.zeros((), device=device)
        bad_total = torch.zeros((), device=device)
        batches = self.train_data.train_batches(cfg.batch_size, cfg.seed, epoch,
                                                start_step=start * cfg.accum_steps, rank=self.rank,
                                                world_size=self.world)
        t0, last_save = time.perf_counter(), time.monotonic()
        images = 0
        steps = progress(range(start, self.steps_per_epoch), self.steps_per_epoch - start,
                         self.is_main and not cfg.no_progress, f"epoch {epoch + 1}")
        for step in steps:
            lr = lr_at(pos.global_step, base_lr=cfg.lr, total_steps=self.total_steps,
                       warmup_steps=self.warmup_steps, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr)
            step_loss, bad = self.step([next(batches) for _ in range(cfg.accum_steps)], lr)
            images += cfg.batch_size * cfg.accum_steps
            loss_sum += step_loss * (cfg.batch_size * cfg.accum_steps)
            bad_streak = (bad_streak + bad) * bad
            max_streak = torch.maximum(max_streak, bad_streak)
            bad_total += bad
            pos.global_step += 1
            if self.ema is not None:
                # the decay follows from the step count on the host: no sync. A skipped (non-finite) step left
                # the weights as they were, so the EMA averages in finite, unchanged weights.
                self.ema.update(self.model, step=pos.global_step)
            pos.step_in_epoch = step + 1
            if (step + 1) % SYNC_EVERY == 0 or step + 1 == self.steps_per_epoch:
                if max_streak.item() >= cfg.max_bad_steps:
                    raise NonFiniteLoss(f"the loss was not finite for {int(max_streak.item())} steps in a row "
                                        f"(epoch {epoch + 1}, step {step + 1}); stopped. The last checkpoint "
                                        f"({self.paths['last']}) is from before; try a lower --lr or --clip_grad 1")
            stop = self.stop.signum is not None
            save_due = cfg.save_every_minutes > 0 and time.monotonic() - last_save > 60 * cfg.save_every_minutes
            if self.world > 1 and (step + 1) % 10 == 0:  # ranks must agree, or they wait on each other forever
                flags = ddp.all_reduce_sum(torch.tensor([float(stop), float(save_due)], device=device))
                stop, save_due = bool(flags[0] > 0), bool(flags[1] > 0)
                if stop and self.stop.signum is None:
                    self.stop.signum = signal.SIGTERM  # another rank was signalled: stop together
            elif self.world > 1:
                stop = save_due = False
            if (stop or save_due) and step + 1 < self.steps_per_epoch:
                self._flush_partial(loss_sum, bad_total, images, t0)
                bad_total.zero_()
                images, t0 = 0, time.perf_counter()
                self.save("last")
                last_save = time.monotonic()
                if stop:
                    raise Stopped(self.stop.signum or signal.SIGTERM)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self._flush_partial(loss_sum, bad_total, images, t0)
        p = pos.partial
        totals = ddp.all_reduce_sum(torch.tensor([p["loss_sum"], p["images"]], dtype=torch.float64, device=device))
        return {"train_loss": totals[0].item() / max(1.0, totals[1].item()), "images": int(totals[1].item()),
                "seconds": p["seconds"], "lr": lr}

    def _flush_partial(self, loss_sum, bad_total, images, t0):
        p = self.pos.partial
        p["loss_sum"] = loss_sum.item()  # the running sum (see train_one_epoch)
        p["images"] += images
        p["seconds"] += time.perf_counter() - t0
        self.pos.bad_steps += int(bad_total.item())

    @torch.no_grad()
    def evaluate(self, model=None, data=None):
        """-> (mean loss, top-1 %, top-5 %) of ``model`` (default: the trained one) over the whole of ``data``
        (default: the test set)."""
        model = self.model if model is None else model
        data = self.test_data if data is None else data
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, top1, top5, count
        for x, y in data.eval_batches(self.cfg.eval_batch_size, self.rank, self.world):
            x = resize((x.float() / 255 - self.mean) / self.std, self.cfg.input_size)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = model(x).float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top5 == y[:, None]
            sums += torch.stack([F.cross_entropy(logits, y, reduction="sum"), hit[:, 0].sum(), hit.any(1).sum(),
                                 torch.tensor(len(y), device=self.device)]).double()
        loss, top1, top5, n = ddp.all_reduce_sum(sums).tolist()
        return loss / n, 100 * top1 / n, 100 * top5 / n

    def evaluate_all(self):
        """-> the epoch's metrics: test_loss/acc/acc5, val_* with --val_size, and the EMA's as ema_* and ema_val_*
        with --model_ema (top-5 None on CIFAR-10)."""
        models = [("", self.model)] + ([("ema_", self.ema.module)] if self.ema is not None else [])
        sets = [("test_", self.test_data)] + ([("val_", self.val_data)] if self.val_data is not None else [])
        out = {}
        for owner, model in models:
            for name, data in sets:
                key = owner + ("" if owner and name == "test_" else name)  # the EMA's test metrics: ema_loss ...
                loss, acc, acc5 = self.evaluate(model, data)
                out.update({key + "loss": loss, key + "acc": acc, key + "acc5": acc5 if self.cfg.num_classes > 10
                            else None})
        return out

    def fit(self):
        cfg, pos = self.cfg, self.pos
        if self.is_main:
            self.log.info(f"training epochs {pos.epoch + 1}..{cfg.epochs}")
        first = pos.epoch
        for epoch in range(first, cfg.epochs):
            train = self.train_one_epoch(epoch)
            skips = cuda_graph_skips() if cfg.cuda_graphs and epoch == first else 0  # after the first epoch's compiling
            if skips:
                self.log.info(f"warning: --cuda_graphs: torch.compile ran {skips} graph(s) without CUDA "
                              "graphs (TORCH_LOGS=cudagraphs says why); training goes on without them there")
            t_eval = time.perf_counter()
            m = self.evaluate_all()
            eval_seconds = time.perf_counter() - t_eval
            pos.epoch, pos.step_in_epoch = epoch + 1, 0
            # with a validation split the best epoch is chosen on it, and the test set only measures (issue 22)
            chosen, ema_chosen = ("val_acc", "ema_val_acc") if self.val_data is not None else ("test_acc", "ema_acc")
            improved = m[chosen] > pos.best_acc or pos.best_epoch == 0
            if improved:
                pos.best_acc, pos.best_epoch = m[chosen], epoch + 1
            rec = {"epoch": epoch + 1, "lr": train["lr"], "train_loss": train["train_loss"], **m,
                   "best_acc": pos.best_acc, "epoch_time": train["seconds"] + eval_seconds,
                   "images_per_s": train["images"] / max(train["seconds"], 1e-9), "bad_steps": pos.bad_steps}
            if self.ema is not None:  # _best.pth follows the trained model, not the EMA
                if m[ema_chosen] > pos.best_ema_acc or pos.best_ema_epoch == 0:
                    pos.best_ema_acc, pos.best_ema_epoch = m[ema_chosen], epoch + 1
                rec["best_ema_acc"] = pos.best_ema_acc
            pos.history.append(rec)
            pos.partial = {}
            kinds = ["last"] + (["best"] if improved else []) + (["epoch"] if (epoch + 1) % cfg.save_freq == 0
                                                                  else [])
            self.save(*kinds)  # the checkpoint first: a crash before the log line loses no work
            self.log.epoch(rec, cfg.epochs)
            if self.stop.signum is not None and epoch + 1 < cfg.epochs:
                raise Stopped(self.stop.signum)  # asked during the epoch's last step: its checkpoint is saved
        self.log.info(f"finished: {self._best_summary()}; checkpoints in {cfg.save_dir}")

    def _best_summary(self):
        """'best top-1 94.10% at epoch 280', with a validation split 'best val top-1 ... (test top-1 there ...)'."""
        pos, val = self.pos, self.val_data is not None
        at = {r["epoch"]: r for r in pos.history}
        line = f"best {'val ' if val else ''}top-1 {pos.best_acc:.2f}% at epoch {pos.best_epoch}"
        if val and pos.best_epoch in at:
            line += f" (test top-1 there {at[pos.best_epoch]['test_acc']:.2f}%)"
        if self.ema is not None:
            line += f", EMA {pos.best_ema_acc:.2f}% at epoch {pos.best_ema_epoch}"
            if val and pos.best_ema_epoch in at and "ema_acc" in at[pos.best_ema_epoch]:
                line += f" (test {at[pos.best_ema_epoch]['ema_acc']:.2f}%)"
        return line


def out_of_memory_advice(cfg, run):
    """One line for a run whose batch did not fit on its GPU: what was asked, what the GPU has, what to change.
    Out of memory during setup (no model yet), the GPU is likely full of other processes' memory: the peak says so."""
    memory = ""
    if run.device.type == "cuda":
        gib = 2 ** 30
        total = torch.cuda.get_device_properties(run.device).total_memory / gib
        memory = f" ({torch.cuda.max_memory_allocated(run.device) / gib:.1f} of {total:.0f} GiB at the peak)"
    tokens = f" and {run.model.cfg.num_patches + 1} tokens" if hasattr(run, "model") else " (setting up the run)"
    return (f"the GPU ran out of memory{memory} at --batch_size {cfg.batch_size}, --eval_batch_size "
            f"{cfg.eval_batch_size}{tokens}; use a smaller --batch_size (--accum_steps keeps the global batch) or "
            f"--eval_batch_size, or fewer tokens (--stem conv --patch_size 4: 65). Checkpoints of finished epochs "
            f"are kept")


def train(cfg):
    """Runs the whole training; -> exit code. Raises UsageError / DataError / CheckpointError for bad input."""
    try:  # Run() joins the process group (torchrun) and may then refuse the config: cleanup must follow it too
        run = Run(cfg)
        if run.is_main:
            try:
                os.makedirs(cfg.save_dir, exist_ok=True)
                probe = os.path.join(cfg.save_dir, ".write_test")
                open(probe, "w").close()
                os.remove(probe)
            except OSError as e:
                raise CheckpointError(f"cannot write to --save_dir {cfg.save_dir}: {e.strerror}") from None
        lock = RunLock(cfg.save_dir) if run.is_main else contextlib.nullcontext()
        with lock:
            try:
                run.setup()  # inside: an out-of-memory error here (a GPU that other processes fill) is one line too
                with run.stop:
                    run.fit()
            except Stopped as s:
                name = signal.Signals(s.signum).name
                run.log.info(f"stopped by {name} at epoch {run.pos.epoch + 1}, step {run.pos.step_in_epoch}; "
                             f"the last checkpoint is {run.paths['last']}. Resume with the same command plus "
                             f"--resume auto")
                return 128 + s.signum
            except NonFiniteLoss as e:
                run.log.info(f"error: {e}")
                return 3
            except torch.cuda.OutOfMemoryError:
                message = out_of_memory_advice(cfg, run)
                if hasattr(run, "log"):  # for `tail -f`; the command line prints it
                    run.log.info(f"error: {message}", echo=False)
                raise UsageError(message) from None
            finally:
                if hasattr(run, "log"):
                    run.log.close()
        return 0
    finally:
        # as PyTorch asks before exit (NCCL's threads stop here); gloo's can still race the interpreter's shutdown
        # on the CPU, rarely (docs/SPEED.md, Several GPUs)
        ddp.cleanup()
