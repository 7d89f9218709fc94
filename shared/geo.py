"""~1 km grid tiles and the tiles covering a square around a point.

The grid: latitude bands of height ``TILE_DEG`` (1 km at 111.32 km per degree); band ``i`` holds
``n_lon(i)`` equal longitude cells, chosen so that a cell is at least ~1 km wide at the band's centre
latitude.  A tile id is ``band * 2**20 + cell`` (fits easily in int64; at most ~40,076 cells a band).

``tiles_covering_square`` returns every tile that can hold a point for which ``in_square`` is true, so
a filtered search over those tiles followed by the exact ``in_square`` check misses nothing —
including across the antimeridian and at the poles.
"""

from __future__ import annotations

import math

import numpy as np

M_PER_DEG_LAT = 111_320.0
TILE_DEG = 1.0 / 111.32  # 1 km of latitude, in degrees
N_BANDS = math.ceil(180.0 / TILE_DEG)  # 20038; the last band is partial and holds lat = 90
LON_SHIFT = 20  # tile = band << 20 | cell
EARTH_RADIUS_M = 6_371_008.8

# Safety margin, in units of a band / a cell (~0.1 mm): absorbs float rounding so that a point that
# is exactly on the square's edge is never lost.
_EPS_IDX = 1e-7


def _clamp_lat(lat: float) -> float:
    return min(90.0, max(-90.0, float(lat)))


def band_of(lat: float) -> int:
    """Latitude band index of ``lat`` (clamped to [-90, 90])."""
    i = math.floor((_clamp_lat(lat) + 90.0) / TILE_DEG)
    return min(max(i, 0), N_BANDS - 1)


def band_centre_lat(i: int) -> float:
    lo = -90.0 + i * TILE_DEG
    hi = min(90.0, lo + TILE_DEG)
    return (lo + hi) / 2.0


def _band_edges(i: int) -> tuple[float, float]:
    lo = -90.0 + i * TILE_DEG
    return lo, min(90.0, lo + TILE_DEG)


def n_lon(i: int) -> int:
    """Number of longitude cells in band ``i`` (>= 1)."""
    c = math.cos(math.radians(band_centre_lat(i)))
    return max(1, math.floor(360.0 * c / TILE_DEG))


def _cell_of(lon: float, n: int) -> int:
    return math.floor((float(lon) + 180.0) / 360.0 * n) % n


def tile_of(lat: float, lon: float) -> int:
    """The tile id holding the point (lat, lon); lon may be any value (taken modulo 360)."""
    i = band_of(lat)
    return (i << LON_SHIFT) + _cell_of(lon, n_lon(i))


def tile_band_cell(tile: int) -> tuple[int, int]:
    return tile >> LON_SHIFT, tile & ((1 << LON_SHIFT) - 1)


def tiles_covering_square(lat: float, lon: float, half_size_m: float = 500.0) -> list[int]:
    """Every tile that intersects the square of +-half_size_m (N/S and E/W) around (lat, lon).

    The east-west half-width of a band is taken at the latitude nearest the pole within the part of
    the square inside that band (the widest it can be there); a band where it reaches 180 degrees, or
    that touches a pole, contributes all its cells.  Sorted, without duplicates.
    """
    if half_size_m < 0 or not math.isfinite(half_size_m):
        raise ValueError(f"half_size_m must be finite and >= 0, got {half_size_m!r}")
    lat = _clamp_lat(lat)
    lon = float(lon)
    dlat = half_size_m / M_PER_DEG_LAT
    margin = _EPS_IDX * TILE_DEG
    lat_lo = max(-90.0, lat - dlat - margin)
    lat_hi = min(90.0, lat + dlat + margin)
    tiles: set[int] = set()
    for i in range(band_of(lat_lo), band_of(lat_hi) + 1):
        edge_lo, edge_hi = _band_edges(i)
        a = max(edge_lo, lat_lo)
        b = min(edge_hi, lat_hi)
        poleward = min(90.0, max(abs(a), abs(b)))
        n = n_lon(i)
        base = i << LON_SHIFT
        cos_p = math.cos(math.radians(poleward))
        if poleward >= 90.0 or cos_p <= 0.0:
            tiles.update(base + j for j in range(n))
            continue
        dlon = half_size_m / (M_PER_DEG_LAT * cos_p)
        if dlon >= 180.0:
            tiles.update(base + j for j in range(n))
            continue
        f_lo = (lon - dlon + 180.0) / 360.0 * n - _EPS_IDX
        f_hi = (lon + dlon + 180.0) / 360.0 * n + _EPS_IDX
        j_lo, j_hi = math.floor(f_lo), math.floor(f_hi)
        if j_hi - j_lo + 1 >= n:
            tiles.update(base + j for j in range(n))
        else:
            tiles.update(base + (j % n) for j in range(j_lo, j_hi + 1))
    return sorted(tiles)


def lon_diff_deg(lon: float, center_lon: float) -> float:
    """Signed longitude difference lon - center_lon, the shortest way round, in [-180, 180)."""
    return (float(lon) - float(center_lon) + 180.0) % 360.0 - 180.0


def in_square(
    lat: float, lon: float, center_lat: float, center_lon: float, half_size_m: float = 500.0
) -> bool:
    """Exact check that (lat, lon) lies in the +-half_size_m square around the centre.

    North-south: |lat - center_lat| * 111,320 m; east-west: the shortest longitude difference times
    111,320 m * cos(lat) (the point's own latitude), both at most half_size_m.
    """
    lat = _clamp_lat(lat)
    center_lat = _clamp_lat(center_lat)
    if abs(lat - center_lat) * M_PER_DEG_LAT > half_size_m:
        return False
    ew = abs(lon_diff_deg(lon, center_lon)) * M_PER_DEG_LAT * math.cos(math.radians(lat))
    return ew <= half_size_m


def in_square_mask(lats: np.ndarray, lons: np.ndarray, center_lats: np.ndarray, center_lons: np.ndarray,
                   half_size_m: float = 500.0) -> np.ndarray:
    """``in_square`` elementwise over arrays (broadcast): the same arithmetic, for a whole batch of points
    and centres at once. A NaN coordinate is outside."""
    lats = np.clip(lats, -90.0, 90.0)
    north_south = np.abs(lats - np.clip(center_lats, -90.0, 90.0)) * M_PER_DEG_LAT
    lon_diff = (np.asarray(lons, dtype=np.float64) - center_lons + 180.0) % 360.0 - 180.0
    east_west = np.abs(lon_diff) * M_PER_DEG_LAT * np.cos(np.radians(lats))
    return (north_south <= half_size_m) & (east_west <= half_size_m)


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres (mean Earth radius)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2.0 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))
