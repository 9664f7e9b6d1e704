"""`kvmesh up` pieces: size parsing, the launch config, child processes, cluster probes."""
