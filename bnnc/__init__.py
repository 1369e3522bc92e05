"""bnnc: binary neural networks from PyTorch training to bit-packed kernels."""

__version__ = "0.1.0"
