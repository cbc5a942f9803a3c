"""The worker: leases due work from the ledger and runs it (verify, fetch, deliver), with its side services."""
