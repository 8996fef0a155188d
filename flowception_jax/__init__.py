"""Flowception in JAX: variable-length video generation by interleaving frame insertions with flow matching."""
