"""CPU fast paths: every place where medvit computes a standard operation in a non-standard
way because PyTorch's own kernel is slow on the CPU, and the process-level settings that
serve speed. Models and the engine import these by name from the submodules.

Each op has its plain PyTorch reference beside it (``reference_*``): the same function,
outputs and gradients, checked in ``tests/test_cpu_ops.py``. Why each fast path pays, and by
how much, is in docs/performance.md and benchmarks/RESULTS.md.

========================  =====================================  ==============================
module                    fast path                              reference
========================  =====================================  ==============================
:mod:`.conv`              ``PointwiseConv3d``,                   ``nn.Conv3d(kernel_size=1)``;
                          ``UnetBasicBlockLite``                 its Conv3d, GroupNorm, LeakyReLU
:mod:`.norm`              ``instance_norm_leaky_relu``           ``act(norm(x))``
:mod:`.attention`         ``flash_friendly_attention``,          ``F.scaled_dot_product_attention``
                          ``padded_attention``,                  (math backend)
                          ``UnfusedAttention``
:mod:`.process`           ``retain_freed_memory``, ``fast_exit`` glibc's defaults; ``sys.exit``
========================  =====================================  ==============================

Layering: this package imports no other medvit module (the models and the engine sit above
it), and this file imports nothing, so the ``medvit`` command's start-up can import the
torch-free :mod:`medvit.cpu_ops.process` alone.
"""
