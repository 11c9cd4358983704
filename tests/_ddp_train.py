"""Worker for the torchrun tests: trains a tiny model under torchrun, saves rank state.

argv: output directory, then optionally a Parquet/CSV path to train from ("-" or nothing:
an in-memory table), then optionally TabularMDM's `order` (default static)."""
import sys

import torch

from test_api import correlated_table, tiny

if __name__ == "__main__":
    torch.set_num_threads(1)
    data = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else correlated_table(300)
    order = sys.argv[3] if len(sys.argv) > 3 else "static"
    model = tiny(epochs=2, order=order).fit(data, validation=None)
    rank = torch.distributed.get_rank()
    torch.save({"log_w": model.schedule.log_w.detach(),
                "params": [p.detach() for p in model.denoiser.parameters()]}, f"{sys.argv[1]}/rank{rank}.pt")
    torch.distributed.destroy_process_group()
