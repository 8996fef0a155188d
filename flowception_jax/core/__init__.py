"""The method: the Flowception process, its DiT, its samplers and baselines, and its tasks."""
