"""Helpers for the tests (importable as ``support.…``): real servers, processes and sample data.

Fixtures live in ``tests/conftest.py``; everything here is plain code a fixture or a test calls.
"""
