"""Latency and throughput of every artifact on every runtime."""
