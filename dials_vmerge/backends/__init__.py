"""Compute backends beyond the CPU kernels: numba.cuda twins and MPI sharding."""
