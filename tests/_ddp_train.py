"""Worker for test_api.test_torchrun_ddp: trains a tiny model under torchrun, saves rank state."""
import sys

import torch

from test_api import correlated_table, tiny

if __name__ == "__main__":
    torch.set_num_threads(1)
    model = tiny(epochs=2).fit(correlated_table(300), validation=None)
    rank = torch.distributed.get_rank()
    torch.save({"log_w": model.schedule.log_w.detach(),
                "params": [p.detach() for p in model.denoiser.parameters()]}, f"{sys.argv[1]}/rank{rank}.pt")
    torch.distributed.destroy_process_group()
