"""Clients of the HTTP API: the Python client and `lungserve predict`."""
