"""Helpers for tests: real service processes started on demand."""
