"""Research tools: learning-curve studies, model probes, benchmark, cost and memory."""
