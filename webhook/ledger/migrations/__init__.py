"""Alembic migrations of the ledger: one revision per schema change, applied by ``cos-webhook migrate``."""
