"""Key / value cache of the decoder LM for incremental decoding (inference only).

A :class:`KVCache` holds, for every attention layer of a :class:`~mimo_titan.models.decoder.DecoderLM`, the keys
(after RoPE) and values of every token seen so far, in buffers of a fixed capacity allocated at the first write.
``DecoderLM.forward(..., kv_cache=cache)`` then takes only the new tokens: their positions continue from
:attr:`KVCache.length`, each layer appends their keys / values and attends over the whole cached prefix (causal,
aligned to the last key), and the cache advances by the number of new tokens. A prefill is a forward of the prompt
into an empty cache; every decode step a forward of the token(s) just chosen.

Training never passes a cache: the decoder's training forward is unchanged.

Method: the standard autoregressive KV cache (e.g. Pope et al. 2022, "Efficiently Scaling Transformer
Inference"), with a preallocated buffer as HF transformers' ``StaticCache``.

Shape legend: B batch, nkv key/value heads, T capacity (tokens), hd head dim, s new tokens.
"""

from __future__ import annotations

import torch

__all__ = ["KVCache", "LayerKVCache"]


class LayerKVCache:
    """One attention layer's cached keys and values: ``[B, nkv, T, hd]`` buffers, the first ``length`` tokens filled.

    Args:
        capacity: T, the most tokens the layer can hold.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' keys / values and return every cached one.

        Args:
            k: ``[B, nkv, s, hd]`` keys of the new tokens (RoPE applied).
            v: ``[B, nkv, s, hd]`` values.

        Returns:
            ``(keys, values)``, each ``[B, nkv, length + s, hd]`` (views of the buffers), in k's dtype.

        Raises:
            ValueError: more tokens than the capacity, or a batch / head shape or dtype other than the first write's.
        """
        s = k.shape[2]
        if self.length + s > self.capacity:
            raise ValueError(
                f"the KV cache holds at most {self.capacity} tokens; {self.length} cached + {s} new do not fit "
                "(build the KVCache with a larger max_length)"
            )
        if self.keys is None or self.values is None:
            shape = (*k.shape[:2], self.capacity, k.shape[3])
            self.keys = k.new_empty(shape)
            self.values = v.new_empty((*v.shape[:2], self.capacity, v.shape[3]))
        elif k.shape[:2] != self.keys.shape[:2] or k.shape[3] != self.keys.shape[3] or k.dtype != self.keys.dtype:
            raise ValueError(
                f"keys {tuple(k.shape)} {k.dtype} do not fit the cache's {tuple(self.keys.shape)} {self.keys.dtype}"
            )
        end = self.length + s
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """The key / value cache of a whole decoder LM (one :class:`LayerKVCache` per layer, made on first use).

    Args:
        max_length: capacity in tokens (prompt plus every token to be generated).

    Attributes:
        length: tokens the model has seen so far (the position of the next token).

    Raises:
        ValueError: ``max_length < 1``.
    """

    def __init__(self, max_length: int):
        if max_length < 1:
            raise ValueError(f"KVCache max_length={max_length} must be >= 1")
        self.max_length = max_length
        self.length = 0
        self._layers: dict[str, LayerKVCache] = {}

    def layer(self, name: str) -> LayerKVCache:
        """The cache of layer ``name`` (the key in ``model.layers``), created empty on first use."""
        if name not in self._layers:
            self._layers[name] = LayerKVCache(self.max_length)
        return self._layers[name]

    def advance(self, n: int) -> None:
        """Record that the model has seen ``n`` more tokens (called by ``DecoderLM.forward`` after its layers).

        Raises:
            RuntimeError: a layer holds another number of tokens than ``length + n`` (a forward that did not run
                every layer, or a cache shared between two models).
        """
        self.length += n
        bad = {name: c.length for name, c in self._layers.items() if c.length != self.length}
        if bad:
            raise RuntimeError(f"KV cache out of step: the model has seen {self.length} tokens but layers hold {bad}")
