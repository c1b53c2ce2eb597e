"""Numba feature kernels shared by the Flink jobs, the offline path and the online path.

Modules: scaling, encoding, time, spatial, arithmetic, windows (offline), drift, fused (a whole
transform chain in one call); reference holds a plain-NumPy twin of every kernel for the tests.
Kernels take float64 / int64 columns or (uint8 data, int64 offsets) strings;
featurestore.transforms names and chains them.
"""
