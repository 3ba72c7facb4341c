"""Judging predictions: metrics, calibration, figures, the paired comparison and the gate's checks.
Imports model, data and core."""
