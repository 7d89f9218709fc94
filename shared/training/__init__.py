"""Offline method: centroids and calibration (the offline-pipeline issue adds world, cleaning, training)."""
