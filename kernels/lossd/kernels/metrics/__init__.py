"""Metric families; each module registers its functions on import."""
