"""The kernel at run time: resolves models, loads them, batches, fuses, times."""
