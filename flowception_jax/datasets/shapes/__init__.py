"""The shapes set: its source, its exact metrics, its task metrics and the tracker they share."""
