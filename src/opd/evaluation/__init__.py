"""Evaluation: generating and scoring images, per-image noise seeds, bootstrap intervals, controls and reports."""
