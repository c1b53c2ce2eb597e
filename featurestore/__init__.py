"""Registry, LMDB online store, history log and Numba kernels; knows nothing of gRPC."""
