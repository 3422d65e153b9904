"""The benchmark suite: serving throughput and latency, batching, workers, startup, training."""
