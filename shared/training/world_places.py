"""Real city names and coordinates for the synthetic world (4 regions), and small geodesy helpers."""

from __future__ import annotations

import math

# (city, country, region, lat, lon)
CITIES = [
    # region 1: Europe
    ("Paris", "France", 1, 48.8566, 2.3522), ("Reims", "France", 1, 49.2583, 4.0317),
    ("Amiens", "France", 1, 49.8941, 2.2958), ("Berlin", "Germany", 1, 52.5200, 13.4050),
    ("Dresden", "Germany", 1, 51.0504, 13.7373), ("Munich", "Germany", 1, 48.1351, 11.5820),
    ("Bruges", "Belgium", 1, 51.2093, 3.2247), ("Rome", "Italy", 1, 41.9028, 12.4964),
    ("Florence", "Italy", 1, 43.7696, 11.2558), ("Madrid", "Spain", 1, 40.4168, -3.7038),
    ("Barcelona", "Spain", 1, 41.3874, 2.1686), ("London", "United Kingdom", 1, 51.5072, -0.1276),
    # region 2: Russia and Asia
    ("Saint Petersburg", "Russia", 2, 59.9311, 30.3609), ("Moscow", "Russia", 2, 55.7558, 37.6173),
    ("Anadyr", "Russia", 2, 64.7337, 177.4968), ("Beijing", "China", 2, 39.9042, 116.4074),
    ("Xi'an", "China", 2, 34.3416, 108.9398), ("Tokyo", "Japan", 2, 35.6762, 139.6503),
    ("Kyoto", "Japan", 2, 35.0116, 135.7681), ("Delhi", "India", 2, 28.6139, 77.2090),
    ("Agra", "India", 2, 27.1767, 78.0081),
    # region 3: the Americas
    ("New York", "United States", 3, 40.7128, -74.0060), ("Washington", "United States", 3, 38.9072, -77.0369),
    ("San Francisco", "United States", 3, 37.7749, -122.4194), ("Mexico City", "Mexico", 3, 19.4326, -99.1332),
    ("Rio de Janeiro", "Brazil", 3, -22.9068, -43.1729), ("Buenos Aires", "Argentina", 3, -34.6037, -58.3816),
    ("Lima", "Peru", 3, -12.0464, -77.0428),
    # region 4: Africa, the Middle East and Oceania
    ("Cairo", "Egypt", 4, 30.0444, 31.2357), ("Caesarea", "Israel", 4, 32.5000, 34.8917),
    ("Jerusalem", "Israel", 4, 31.7683, 35.2137), ("Cape Town", "South Africa", 4, -33.9249, 18.4241),
    ("Marrakesh", "Morocco", 4, 31.6295, -7.9811), ("Sydney", "Australia", 4, -33.8688, 151.2093),
    ("Suva", "Fiji", 4, -18.1416, 178.4419),
    ("Taveuni", "Fiji", 4, -16.8000, 179.9990),  # on the antimeridian
]
DENSE_CITY = "Paris"        # several landmarks within 1 km of each other
ANTIMERIDIAN_CITY = "Taveuni"  # landmarks on both sides of ±180°

EARTH_RADIUS_M = 6_371_000.0


def wrap_lon(lon: float) -> float:
    return (lon + 180.0) % 360.0 - 180.0


def destination(lat: float, lon: float, dist_m: float, bearing_deg: float) -> tuple[float, float]:
    """The point dist_m away from (lat, lon) along the bearing (great circle), longitude in [-180, 180)."""
    d = dist_m / EARTH_RADIUS_M
    b, p1, l1 = math.radians(bearing_deg), math.radians(lat), math.radians(lon)
    p2 = math.asin(math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(b))
    l2 = l1 + math.atan2(math.sin(b) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2))
    return round(math.degrees(p2), 6), round(wrap_lon(math.degrees(l2)), 6)


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))
