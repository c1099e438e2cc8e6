"""Block streaming: compress, run and save models whose weights stay off the execution device.

A *streamed* model is an ordinary transformers model (its own class, or the compressed format) whose
decoder blocks sit in a :class:`~compression.blockstore.StreamedLayers` list. Outside the blocks
(embeddings, rotary tables, final norm, head) everything is real and lives on the execution device;
exactly one block is resident at a time, the others are ``meta`` placeholders that know where their
weights are. Calibration activations are O(tokens × hidden) whatever the depth: the methods keep the
current block's on the execution device and drop the previous block's as they move on.

This module is the one name the rest of the project imports; each job has its own module:

- :mod:`compression.blockstore` — where each block's weights are (checkpoint, spill file, CPU memory)
  and which block is resident: ``BlockStore``, ``StreamedLayers``, :func:`is_streamed`, :func:`store_of`;
- :mod:`compression.streaming_build` — :func:`open_checkpoint` (a streamed model from safetensors) and
  the :func:`working_copy` a method rewrites (with :func:`finish` after it);
- :mod:`compression.memory` — when to stream (:func:`needs_offload`), :func:`weight_bytes`,
  :func:`return_large_frees`;
- :mod:`compression.streaming_save` — :func:`save_streamed`, shard by shard;
- :mod:`compression.streaming_eval` — :func:`measure_against`, perplexity and agreement block-major.
"""
from __future__ import annotations

from .blockstore import BlockStore, StreamedLayers, is_streamed, store_of
from .memory import needs_offload, return_large_frees, weight_bytes
from .streaming_build import finish, open_checkpoint, working_copy
from .streaming_eval import measure_against
from .streaming_save import save_streamed

__all__ = ["BlockStore", "StreamedLayers", "finish", "is_streamed", "measure_against", "needs_offload",
           "open_checkpoint", "return_large_frees", "save_streamed", "store_of", "weight_bytes", "working_copy"]
