"""One optimizer step exactly as training runs it; the engine and the benchmark both call this.

micro-batches of uint8 images -> augment (crop, flip, RandAugment) -> Mixup/CutMix -> forward (bf16 autocast
on CUDA) -> loss -> backward; then optional clipping and one fused AdamW update, skipped on the device when
the loss (or the gradient norm) is not finite. Nothing here reads a value back to the host.
"""
import contextlib

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from training.augment import TrainAugment


class TrainStep:
    def __init__(self, model, optimizer, *, num_classes, mean, std, use_randaugment=True, use_crop=True,
                 use_flip=True, input_size=32, mixup_alpha=0.8,
                 cutmix_alpha=1.0, label_smoothing=0.1, amp=False, clip_grad=0.0, train_model=None, cuda_graphs=False):
        self.model = model                              # the module whose parameters the optimizer holds
        # what runs forward: the model itself, or it compiled and/or DDP-wrapped
        self.train_model = model if train_model is None else train_model
        self.optimizer, self.amp, self.clip_grad, self.input_size = optimizer, amp, clip_grad, input_size
        self.cuda_graphs = cuda_graphs  # train_model compiled with mode="reduce-overhead"
        self.device_type = next(model.parameters()).device.type
        self.augment = TrainAugment(use_randaugment=use_randaugment, use_crop=use_crop, use_flip=use_flip,
                                    mean=mean, std=std)
        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=label_smoothing,
                           num_classes=num_classes) if (mixup_alpha > 0 or cutmix_alpha > 0) else None
        self.criterion = SoftTargetCrossEntropy() if self.mixup else \
            torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward_backward(self, x, y, scale, sync=True):
        """One micro-batch. x: uint8 (B, 3, H, W), y: (B,). -> the loss (detached, on the device)."""
        x = resize(self.augment(x), self.input_size)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        no_sync = getattr(self.train_model, "no_sync", None)
        with (no_sync() if (no_sync and not sync) else contextlib.nullcontext()):
            with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.amp):
                loss = self.criterion(self.train_model(x), y)
            (loss * scale).backward()
        return loss.detach()

    def __call__(self, micro_batches, lr):
        """micro_batches: list of (x uint8, y). -> (mean loss, bad) as 0-d device tensors; bad is 1.0 when
        the step was skipped because the loss or gradient norm was not finite."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if self.cuda_graphs:  # a new training iteration: the last step's graph outputs may be reused from here on
            torch.compiler.cudagraph_mark_step_begin()
        n = len(micro_batches)
        loss = sum(self.forward_backward(x, y, 1.0 / n, sync=i == n - 1) for i, (x, y) in enumerate(micro_batches)) / n
        finite = torch.isfinite(loss)
        if self.clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad, foreach=True)
            finite &= torch.isfinite(norm)
        bad = (~finite).float()
        self.optimizer.found_inf = bad  # fused AdamW skips the whole update on the device when it is 1
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.where(finite, loss, 0.0), bad


def resize(x, size):
    """Augmentation runs at CIFAR's 32x32 (cheap); a model made for larger inputs (fine-tuning from ImageNet
    weights) gets the batch resized up on the device. x: (B, C, H, W) float."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
