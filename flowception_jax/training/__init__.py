"""The trainer and what it stands on: config, input pipeline, meshes, checkpoints, logs."""
