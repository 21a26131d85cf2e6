"""Benchmarks: they print numbers and write JSON; they assert nothing (targets are checked by reading them)."""
