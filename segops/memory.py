"""segops' cache of large CPU blocks.

segops' CPU kernels put outputs of 2 MiB or more (loss gradients, filtered maps, marginals) on transparent huge
pages, and when such a tensor is freed its block is kept for the next output of the same size instead of being
unmapped: a training step then reuses memory that is already mapped and faulted in (see docs/install.md,
"Runtime settings"). At most ``SEGOPS_CPU_BLOCK_CACHE_MB`` MiB are kept (default 256; 0 keeps none), the oldest
blocks released first. These two functions are the CPU counterparts of ``torch.cuda.memory_reserved`` and
``torch.cuda.empty_cache`` for that cache.
"""

from __future__ import annotations

import torch


def cpu_cached_bytes() -> int:
    """Bytes of freed CPU blocks segops holds for reuse (not counting blocks in use by live tensors)."""
    return int(torch.ops.segops._cpu_block_cache(False))


def empty_cpu_cache() -> None:
    """Hand every cached CPU block back to the system (tensors in use are not affected)."""
    torch.ops.segops._cpu_block_cache(True)
