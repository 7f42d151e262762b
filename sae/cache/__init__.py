"""On-disk activation cache: what ``sae cache`` writes and ``sae train --cache DIR`` reads.

Layout of a cache directory::

    manifest.json                        what is there (below); the only source of truth
    <hookpoint>/shard_00000.safetensors  one tensor "activations", shape (rows, d_in)
    <hookpoint>/shard_00001.safetensors
    ...

Every hook point has the same shards: row ``i`` of shard ``k`` comes from the same token position
at every hook point. ``manifest.json`` holds the format name and version, the hook points, ``d_in``
per hook point, the storage dtype, ``shard_tokens``, the shard list (rows, and per hook point the
file's path, size and sha256), the total row count, free-form ``metadata`` (model, context size,
hook info, ...) and ``complete``.

Writes are atomic: each file is written under a temporary name, fsynced and renamed, and the
manifest is rewritten (the same way) after every shard. A writer that dies leaves a cache whose
manifest lists only complete shards; :func:`write_cache` with ``resume=True`` continues it.
"""

from .format import DTYPES, FORMAT, FORMAT_VERSION, MANIFEST, read_manifest, verify_cache
from .read import CachedActivations
from .write import write_cache

__all__ = [
    "DTYPES", "FORMAT", "FORMAT_VERSION", "MANIFEST", "CachedActivations", "read_manifest",
    "verify_cache", "write_cache",
]
