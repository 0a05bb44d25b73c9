"""The processes of `lungserve serve` with several workers: their entry points (docs/topology.md)."""
