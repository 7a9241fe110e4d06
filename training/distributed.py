"""The little that knows about several processes: setup, rank, and sums across ranks."""
import os

import torch
import torch.distributed as dist


def init_distributed(device_type):
    """Joins the process group when started by torchrun; -> (rank, world_size, local_rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), world, local_rank


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t):
    """Sum a tensor over ranks in place (a no-op in a single process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj):
    """-> a list with every rank's ``obj`` (picklable), in rank order; [obj] in a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup():
    if is_distributed():
        dist.destroy_process_group()
