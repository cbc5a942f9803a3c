"""A local stand-in for COS and CI: develop and test with the real SDK and no cloud account.

It stores objects on disk, checks request signatures, runs NoiseReduction jobs (a simple
low-pass and resampling of WAV files) and POSTs CI-shaped callbacks when they finish. Faults
(errors, slow answers, broken bodies, wrong checksums) can be injected into chosen requests:
see :mod:`webhook.sandbox.faults` and :mod:`webhook.sandbox.server`.
"""

from webhook.sandbox.audio import noisy_wav
from webhook.sandbox.faults import Fault, FaultError, Faults
from webhook.sandbox.jobs import SentCallback
from webhook.sandbox.server import Sandbox, serve

__all__ = ["Fault", "FaultError", "Faults", "Sandbox", "SentCallback", "noisy_wav", "serve"]
