"""Process-level speed settings. Each changes the whole process, so each is applied
explicitly, once, by the code that owns that part of the process:

* :func:`retain_freed_memory` (glibc's ``mallopt``): by ``medvit.engine.trainer.Trainer``
  when ``train.retain_freed_memory`` is true (the default), since the study's training
  config chooses it. Reference: glibc's defaults (``train.retain_freed_memory: false``).
* :func:`fast_exit`: by ``medvit.cli.console_main``, the end of every ``medvit`` command.
  Reference: ``sys.exit``, which it falls back to when torch was never imported.

Torch-free: the ``medvit`` command imports this module whatever it runs. The gains are in
docs/performance.md (retained freed memory, job start).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from typing import NoReturn

# glibc's mallopt parameters (malloc.h) and its largest mmap threshold on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
RETAINED_BLOCK_BYTES = 32 << 20


def glibc_malloc() -> bool:
    """Whether this process allocates with glibc's malloc (Linux with glibc), whose ``mallopt``
    :func:`retain_freed_memory` tunes."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@functools.lru_cache(maxsize=1)
def retain_freed_memory() -> bool:
    """Keep freed CPU tensor memory in the process for the next training step (glibc only).

    By default glibc hands blocks above its (adaptive) mmap threshold back to the kernel when
    they are freed, and trims the heap's free top; the next step's tensors of the same sizes
    then page-fault fresh, zero-filled pages in, thousands per training step of medvit's models
    on the CPU (the cost: benchmarks/RESULTS.md, from benchmarks/bench_switches.py).
    This sets the mmap threshold to glibc's largest allowed value (32 MiB, blocks below it come
    from the reusable heap) and never trims, as the
    ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` variables would at startup. The
    process then keeps the memory it peaked at; the peak itself is unchanged. Process-wide and
    applied once (later calls return the first call's result); not calling it leaves glibc's
    defaults.

    Returns:
        Whether the setting took (``False`` off glibc, e.g. macOS, Windows, musl).
    """
    # here, not at the top: ctypes.util pulls in subprocess, tempfile, shutil, bz2, lzma (about
    # 20 ms with -X importtime), which every `medvit` command would pay for the fast exit alone
    import ctypes
    import ctypes.util

    if not glibc_malloc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # 2**31 - 1 (mallopt takes an int): freed memory is never returned by trimming
    return bool(mallopt(_M_MMAP_THRESHOLD, RETAINED_BLOCK_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def fast_exit(code: int) -> NoReturn:
    """End the process with exit status ``code``, skipping the interpreter's teardown once
    torch is loaded.

    With torch (and MONAI, timm, ultralytics) imported, the interpreter's own teardown takes
    seconds on a small machine, paid by every one of a study's jobs. The caller has written
    and closed every output; this flushes the logs and standard streams and leaves with
    ``os._exit``. Without torch in the process it is plain ``sys.exit(code)``.
    """
    if "torch" not in sys.modules:
        sys.exit(code)
    import logging  # torch has imported it by now; at the top it would cost torch-free commands ~10 ms

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to lose
            pass
    os._exit(code)
