"""Restoring from snapshots: the source interface, file and layered snapshots, working sets."""
