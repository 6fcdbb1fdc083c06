"""Data-parallel training with torchrun (2 CPU processes, gloo) equals one process."""
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def test_two_process_ddp_matches_single_process(tmp_path):
    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_train.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_file(str(out))

    sys.path.insert(0, str(HERE))
    from ddp_train import train

    single = train(batch_size=4).model.state_dict()  # same global batch in one process
    assert ddp.keys() == single.keys()
    for k, v in single.items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-6, msg=k)
