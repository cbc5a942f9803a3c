"""CRC-64/ECMA-182 as COS computes it for ``x-cos-hash-crc64ecma``.

crcmod builds a C extension at install time; without it, hashing hundreds of MiB in pure
Python would dominate a worker's time (``tests/test_fetch.py`` checks it is in use).
"""

import crcmod

# Incremental: crc64ecma(chunk, previous) continues a running checksum.
crc64ecma = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, xorOut=0xFFFFFFFFFFFFFFFF, rev=True)
