"""The soft prompt's key/value cache: every request at one mechanism setting starts with the same soft prompt, so
its keys and values are computed once per artifact and copied into each batch instead of recomputed."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from transformers import DynamicCache, PreTrainedModel

from app.engine.request import SoftPromptPrefix


class PrefixKV:
    """One soft prompt's keys and values in every layer (batch of one, positions 0..m-1)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.layers = layers

    @property
    def length(self) -> int:
        return int(self.layers[0][0].shape[-2])

    def expand(self, batch: int) -> DynamicCache:
        """A fresh cache holding these keys and values for each of `batch` rows (generation appends to it)."""
        return DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.layers])


class PrefixCache:
    """PrefixKV by soft prompt name, computed on first use of each version of the artifact (a reload loads new
    tensors: the entry is kept with the tensor it was computed from, and recomputed for any other); the least
    recently used are dropped beyond `capacity`."""

    def __init__(self, model: PreTrainedModel, capacity: int = 16) -> None:
        self.model, self.capacity = model, capacity
        self._entries: OrderedDict[str, tuple[torch.Tensor, PrefixKV]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, prefix: SoftPromptPrefix) -> PrefixKV:
        with self._lock:
            source, computed = self._entries.get(prefix.name, (None, None))
            if source is prefix.embeddings:
                self._entries.move_to_end(prefix.name)
                return computed
        computed = compute_prefix(self.model, prefix.embeddings)
        with self._lock:
            self._entries[prefix.name] = (prefix.embeddings, computed)
            self._entries.move_to_end(prefix.name)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return computed


def compute_prefix(model: PreTrainedModel, embeddings: torch.Tensor) -> PrefixKV:
    """The keys and values of a forward pass over `embeddings` (m x b) alone."""
    with torch.inference_mode():
        out = model(inputs_embeds=embeddings[None].to(model.device, model.dtype), use_cache=True, logits_to_keep=1)
    return PrefixKV([(layer.keys, layer.values) for layer in out.past_key_values.layers])
