"""TVM backend: bit-packed XNOR-popcount kernels and whole-network Relax compilation."""
