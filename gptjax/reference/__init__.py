"""PyTorch twins of the models and optimizer, weight conversion and nanoGPT checkpoints; needs the torch extra."""
