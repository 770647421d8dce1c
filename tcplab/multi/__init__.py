"""Task 2: the broadcast echo hub: its line format, per-client send queues, the Redis backplane, its twistd glue."""
