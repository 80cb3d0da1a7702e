"""Serving uffds handed over a Unix socket (Firecracker's protocol): wire, transfer, server."""
