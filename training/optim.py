"""AdamW with decoupled weight-decay groups, and the learning rate as a pure function of the step."""
import math

import torch


def build_optimizer(model, lr, weight_decay, device):
    """AdamW; no decay on norms, biases (every 1-D tensor), pos_embed, cls_token and the SSM's A_log.

    The fused implementation reads ``optimizer.found_inf`` (a 0-d float tensor): when it is 1 the whole
    update is skipped on the device, which is how a non-finite loss skips a step without a host sync.
    """
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=True)


def lr_at(step, *, base_lr, total_steps, warmup_steps, warmup_lr=1e-6, min_lr=1e-5):
    """Linear warmup from warmup_lr to base_lr over warmup_steps, then cosine down to min_lr at total_steps."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
