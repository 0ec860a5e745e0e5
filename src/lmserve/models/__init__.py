"""Model families on shared layers, and the loaders that fill them from checkpoints."""
