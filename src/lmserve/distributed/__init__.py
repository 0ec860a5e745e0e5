"""Tensor and expert parallelism on torch.distributed: the per-engine process groups
(group.py) and the executor that runs the model on several ranks (executor.py)."""
