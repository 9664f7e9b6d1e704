"""A peer server (vLLM's CPU build) run beside kvmesh for side-by-side benchmarks."""
