"""Scoring samples against their data: evaluators the trainer runs, FVD, and figures."""
