from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shared.geo import (
    N_BANDS,
    TILE_DEG,
    band_of,
    haversine_m,
    in_square,
    in_square_mask,
    n_lon,
    tile_band_cell,
    tile_of,
    tiles_covering_square,
)

HALF = 500.0


def _wrap(lon: float) -> float:
    return (lon + 180.0) % 360.0 - 180.0


lats_any = st.one_of(
    st.floats(-90.0, 90.0),
    st.floats(89.9, 90.0),
    st.floats(-90.0, -89.9),
    st.sampled_from([-90.0, 90.0, 0.0, 89.995, -89.995]),
)
lons_any = st.one_of(
    st.floats(-180.0, 180.0),
    st.floats(179.9, 180.0),
    st.floats(-180.0, -179.9),
    st.sampled_from([-180.0, 180.0, 0.0]),
)
unit = st.floats(-1.0, 1.0)


def _point_in_square(clat, clon, u, v, half=HALF):
    lat = clat + u * half / 111_320.0
    lat = max(-90.0, min(90.0, lat))
    c = math.cos(math.radians(lat))
    dlon = v * half / (111_320.0 * c) if c > 1e-12 else v * 180.0
    return lat, _wrap(clon + dlon)


@settings(deadline=None, max_examples=400)
@given(clat=lats_any, clon=lons_any, u=unit, v=unit, half=st.sampled_from([HALF, 100.0, 1500.0]))
def test_point_in_square_is_covered(clat, clon, u, v, half):
    lat, lon = _point_in_square(clat, clon, u, v, half)
    assume(in_square(lat, lon, clat, clon, half))
    assert tile_of(lat, lon) in tiles_covering_square(clat, clon, half)


@settings(deadline=None, max_examples=300)
@given(clat=st.floats(-90.0, 90.0), clon=lons_any, lat=lats_any, lon=lons_any)
def test_arbitrary_point_in_square_is_covered(clat, clon, lat, lon):
    # Points far from the centre are mostly outside; near the poles many are inside.
    clat = max(-90.0, min(90.0, lat + (clat / 90.0) * 0.01))
    if in_square(lat, lon, clat, clon):
        assert tile_of(lat, lon) in tiles_covering_square(clat, clon)


@settings(deadline=None, max_examples=300)
@given(clat=st.floats(-80.0, 80.0), clon=lons_any)
def test_few_tiles_away_from_poles(clat, clon):
    tiles = tiles_covering_square(clat, clon)
    assert 1 <= len(tiles) <= 9
    assert tiles == sorted(set(tiles))
    assert tile_of(clat, clon) in tiles


@settings(deadline=None, max_examples=200)
@given(lat=st.floats(-90.0, 90.0), lon=st.floats(-180.0, 180.0))
def test_tile_of_is_valid(lat, lon):
    t = tile_of(lat, lon)
    i, j = tile_band_cell(t)
    assert 0 <= i < N_BANDS
    assert 0 <= j < n_lon(i)
    assert 0 <= t < 2**63


def test_cells_are_about_one_km():
    for lat in (0.0, 30.0, 60.0, 80.0):
        i = band_of(lat)
        width_m = 360.0 / n_lon(i) * 111_320.0 * math.cos(math.radians(lat))
        assert 990.0 < width_m < 1_020.0, (lat, width_m)
    assert TILE_DEG * 111_320.0 == pytest.approx(1000.0)


def test_antimeridian_wraps():
    tiles = tiles_covering_square(10.0, 179.999)
    # Covers both sides of the antimeridian.
    assert tile_of(10.0, -179.999) in tiles
    assert tile_of(10.0, 179.999) in tiles
    assert tile_of(10.0, 180.0) == tile_of(10.0, -180.0)
    assert in_square(10.0, -179.999, 10.0, 179.999)
    assert not in_square(10.0, -179.9, 10.0, 179.999)
    tiles2 = tiles_covering_square(-45.0, -180.0)
    assert tile_of(-45.0, 179.9995) in tiles2
    assert tile_of(-45.0, -179.9995) in tiles2
    assert len(tiles2) <= 9


def test_poles_take_whole_bands():
    for pole in (90.0, -90.0):
        tiles = tiles_covering_square(pole, 0.0)
        top = band_of(pole)
        assert {t >> 20 for t in tiles} >= {top}
        # The pole band is entirely included, whatever the longitude.
        for lon in (-180.0, -90.0, 0.0, 45.0, 179.99):
            assert tile_of(pole, lon) in tiles
            assert in_square(pole, lon, pole, 0.0)
        # A point 400 m from the pole on the far side is inside and covered.
        lat = pole - math.copysign(400.0 / 111_320.0, pole)
        for lon in (-180.0, 90.0, 179.0):
            if in_square(lat, lon, pole, 0.0):
                assert tile_of(lat, lon) in tiles
    # Square reaching the pole from 300 m away: the other side of the pole is covered.
    c = 90.0 - 300.0 / 111_320.0
    tiles = tiles_covering_square(c, 10.0)
    p = (90.0 - 100.0 / 111_320.0, -170.0)
    assert in_square(*p, c, 10.0)
    assert tile_of(*p) in tiles


def test_lat_is_clamped():
    assert tile_of(91.0, 0.0) == tile_of(90.0, 0.0)
    assert tile_of(-91.0, 0.0) == tile_of(-90.0, 0.0)
    assert band_of(90.0) == N_BANDS - 1
    assert band_of(-90.0) == 0
    assert n_lon(N_BANDS - 1) == 1


def test_in_square_basic():
    assert in_square(0.0, 0.0, 0.0, 0.0)
    assert in_square(0.0044, 0.0044, 0.0, 0.0)
    assert not in_square(0.0046, 0.0, 0.0, 0.0)
    assert not in_square(0.0, 0.0046, 0.0, 0.0)
    # At 60 degrees a degree of longitude is half as long.
    assert in_square(60.0, 0.0089, 60.0, 0.0)
    assert not in_square(60.0, 0.0091, 60.0, 0.0)


def test_haversine():
    assert haversine_m(0.0, 0.0, 1.0, 0.0) == pytest.approx(111_195.0, rel=1e-3)
    assert haversine_m(45.0, 10.0, 45.0, 10.0) == 0.0
    assert haversine_m(0.0, 179.5, 0.0, -179.5) == pytest.approx(111_195.0, rel=1e-3)
    assert haversine_m(90.0, 0.0, -90.0, 0.0) == pytest.approx(math.pi * 6_371_008.8, rel=1e-9)
    assert haversine_m(10.0, 20.0, 11.0, 21.0) == pytest.approx(haversine_m(11.0, 21.0, 10.0, 20.0))


@settings(deadline=None, max_examples=300)
@given(clat=lats_any, clon=lons_any, u=st.floats(-3.0, 3.0), v=st.floats(-3.0, 3.0),
       half=st.sampled_from([HALF, 100.0, 1500.0]))
def test_the_array_square_test_agrees_with_the_scalar_one(clat, clon, u, v, half):
    """The replica's whole-batch geo search (in_square_mask) keeps exactly what the decision rule's
    in_square keeps, inside and outside the square, across the antimeridian and at the poles."""
    lat, lon = _point_in_square(clat, clon, u, v, half)
    mask = in_square_mask(np.array([lat]), np.array([lon]), np.array([clat]), np.array([clon]), half)
    assert bool(mask[0]) == in_square(lat, lon, clat, clon, half)


def test_a_missing_coordinate_is_outside_every_square():
    assert not in_square_mask(np.array([np.nan, 10.0]), np.array([0.0, np.nan]), np.zeros(2), np.zeros(2)).any()
