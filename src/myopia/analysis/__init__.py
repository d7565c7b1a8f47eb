"""Measurements: linear probes, confidence intervals, plots."""
