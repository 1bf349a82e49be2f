"""The machine and the process group this process computes on: CPU threads, caches, devices, dtypes,
torch.distributed and fairscale's model-parallel group."""
