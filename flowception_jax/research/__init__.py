"""Research tools: learning-curve studies, model probes, the benchmark and cost and memory estimates."""
