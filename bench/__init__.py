"""Benchmarks of billy-tools; `make bench` runs bench/run.py."""
