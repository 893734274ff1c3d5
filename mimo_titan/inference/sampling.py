"""Choosing the next token from the logits: greedy, or temperature sampling with nucleus (top-p) filtering.

Method: temperature-scaled softmax sampling; top-p ("nucleus") sampling of Holtzman et al. 2020, "The Curious Case
of Neural Text Degeneration": keep the smallest set of most likely tokens whose probabilities sum to at least p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "next_tokens"]


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens.

    Attributes:
        max_new_tokens: the most tokens to generate per sample (>= 1).
        temperature: 0 = greedy (argmax); > 0 divides the logits before the softmax.
        top_p: nucleus mass in ``(0, 1]``; 1 keeps every token (used only when ``temperature > 0``).
        seed: seed of the sampling generator (the same seed, prompts and batch give the same tokens).

    Raises:
        ValueError: a value out of range (the message names the command-line option).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: generate at least 1 token")
        if not self.temperature >= 0:
            raise ValueError(f"--temperature {self.temperature}: must be >= 0 (0 decodes greedily)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: must be in (0, 1]")


def next_tokens(
    logits_BV: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    allowed_V: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token of every row.

    Args:
        logits_BV: ``[B, V]`` float logits of the last position.
        params: temperature and top-p.
        generator: the random generator (on the logits' device) for sampling; unused when greedy.
        allowed_V: optional ``[V]`` bool, the tokens that may be chosen (others get probability 0).

    Returns:
        ``[B]`` int64 token ids.
    """
    logits = logits_BV.float()
    if allowed_V is not None:
        logits = logits.masked_fill(~allowed_V, float("-inf"))
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the more likely tokens
        sorted_p = sorted_p.masked_fill(before >= params.top_p, 0.0)  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
