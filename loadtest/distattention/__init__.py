"""DistAttention benchmarks (issue 6): see loadtest/bench_distattention.py."""
