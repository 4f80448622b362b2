"""Calibration: ECE and its variants, the reliability diagram and temperature, as mergeable bins.

:mod:`~lossd.kernels.calibration.bins` holds the bin rule, the roles and the
scores every statistic reads; :mod:`~lossd.kernels.calibration.ece` the ECE
family; :mod:`~lossd.kernels.calibration.temperature` temperature scaling.
"""
