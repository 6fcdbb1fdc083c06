"""Worker for tests/test_distributed.py: `torchrun --nproc_per_node 2 tests/ddp_train.py OUT`."""
import sys

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from engine_helpers import shortcut_task  # noqa: E402
from grazbids.engine import Architecture, Trainer, TrainingData, TrainSettings  # noqa: E402


def train(batch_size: int):
    x, m, y = shortcut_task(n=16, correlation=0.9, seed=3)
    data = TrainingData(x, m, y, 2)
    settings = TrainSettings(mode="grazplus", epochs=2, batch_size=batch_size, accumulation_steps=2,
                             learning_rate=1e-3, progress=False)
    result = Trainer(Architecture((16, 16, 16), n_blocks=2, channels=4), settings).fit(data, np.arange(12), np.arange(12, 16))
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = train(batch_size=2)  # per process: global batch 4
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, sys.argv[1])
        print("history", result.history)
    dist.destroy_process_group()
