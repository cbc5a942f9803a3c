"""A local stand-in for COS and CI: develop and test with the real SDK and no cloud account.

It stores objects on disk, checks request signatures, runs NoiseReduction jobs (a simple
low-pass and resampling of WAV files) and POSTs CI-shaped callbacks when they finish.
"""

from webhook.sandbox.audio import noisy_wav
from webhook.sandbox.jobs import SentCallback
from webhook.sandbox.server import Sandbox, serve

__all__ = ["Sandbox", "SentCallback", "noisy_wav", "serve"]
