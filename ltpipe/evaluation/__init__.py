"""Prediction, metrics, the evaluate and zeroshot stages, and the sweep report."""
