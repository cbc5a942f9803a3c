"""Intake: callbacks arrive (HTTP, TDMQ, reconcile), are parsed and triaged, and are recorded in the ledger."""
