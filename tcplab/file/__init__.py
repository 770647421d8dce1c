"""Task 3: the verified file drop: wire format, names, storage, receiver, sender, twistd glue."""
