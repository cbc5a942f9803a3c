"""cos-webhook: verified, durable delivery of Tencent Cloud Infinite noise-reduction callbacks.

Data flow: ``receive`` → ``ledger`` → ``worker`` → ``verify`` → ``fetch`` → ``sinks``.
"""

__version__ = "0.1.0"
