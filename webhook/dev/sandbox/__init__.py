"""A local stand-in for COS and CI: develop and test with the real SDK and no cloud account.

It stores objects on disk, checks request signatures, runs NoiseReduction jobs (a simple
low-pass and resampling of WAV files) and POSTs CI-shaped callbacks when they finish. Faults
(errors, slow answers, broken bodies, wrong checksums) can be injected into chosen requests:
see :mod:`webhook.dev.sandbox.faults` and :mod:`webhook.dev.sandbox.server`.
"""

from webhook.dev.sandbox.audio import noisy_wav
from webhook.dev.sandbox.faults import Fault, FaultError, Faults
from webhook.dev.sandbox.jobs import SentCallback
from webhook.dev.sandbox.results import CallbackShape
from webhook.dev.sandbox.server import Sandbox, serve

__all__ = ["CallbackShape", "Fault", "FaultError", "Faults", "Sandbox", "SentCallback", "noisy_wav", "serve"]
