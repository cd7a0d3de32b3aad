"""Run by tests/test_distributed.py in subprocesses, on PyTorch: one process
of a `torch.distributed` process group (gloo, on 127.0.0.1), or one process
alone.

    python torch_worker.py process OUT.npz RANK PORT
    python torch_worker.py reference OUT.npz

Keras has no distribution API on PyTorch; its guide trains a Keras model
with `torch.nn.parallel.DistributedDataParallel` in such a group, and
`recalibrate` pools its statistics over the group's processes.
"""

import os
import sys

import numpy as np
import shards


def process(out, rank, port):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = shards.make()
        np.savez(out, **shards.recalibrate_on_shard(model, rank, "torch.distributed"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ["KERAS_BACKEND"] = "torch"  # before Keras is imported (by shards, in each function)
    if sys.argv[1] == "process":
        process(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        np.savez(sys.argv[2], **shards.reference())
