"""tcplab's benchmarks: ``python -m bench WORKLOAD`` from the repository root (see docs/benchmarks.md)."""


class BenchError(Exception):
    """A workload could not measure: a server or client failed; the message says which and why."""
