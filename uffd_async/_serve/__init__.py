"""Serving faults: the resolvers, the fault server and its worker pool, their statistics."""
