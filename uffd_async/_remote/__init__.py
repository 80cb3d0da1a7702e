"""Snapshots fetched over the network: the HTTP source, chunk scheduling, chunked copies."""
