"""tomediff: training-free token merging for diffusion models."""
