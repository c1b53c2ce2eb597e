"""Great-circle distance kernels (haversine, km) over float64 degree columns."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

EARTH_RADIUS_KM = 6371.0088
DEG = math.pi / 180.0


@njit(nogil=True, cache=True)
def haversine_value(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Haversine distance in km between two points given in degrees.

    Out-of-range degrees wrap (latitude 91 is 89 across the pole); rounding can then push the
    haversine term a hair below 0, so it is clamped to [0, 1] like its overshoot above 1.
    """
    p1 = lat1 * DEG
    p2 = lat2 * DEG
    s_lat = math.sin((p2 - p1) * 0.5)
    s_lon = math.sin((lon2 - lon1) * DEG * 0.5)
    a = s_lat * s_lat + math.cos(p1) * math.cos(p2) * s_lon * s_lon
    if a > 1.0:
        a = 1.0
    elif a < 0.0:
        a = 0.0
    return 2.0 * EARTH_RADIUS_KM * math.asin(math.sqrt(a))


@njit(nogil=True, cache=True)
def haversine_km(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray):
    """Row-wise haversine distance in km between (lat1, lon1) and (lat2, lon2)."""
    out = np.empty(lat1.shape[0], np.float64)
    for i in range(lat1.shape[0]):
        out[i] = haversine_value(lat1[i], lon1[i], lat2[i], lon2[i])
    return out


@njit(nogil=True, cache=True)
def distance_to_point_km(lat: np.ndarray, lon: np.ndarray, lat0: float, lon0: float):
    """Haversine distance in km from every (lat, lon) to the fixed point (lat0, lon0)."""
    out = np.empty(lat.shape[0], np.float64)
    for i in range(lat.shape[0]):
        out[i] = haversine_value(lat[i], lon[i], lat0, lon0)
    return out
