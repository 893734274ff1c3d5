"""Layout-independent weight initialisation: every tensor drawn from its own seed, in fixed row blocks.

A model is built on the meta device, split into the pipeline stages a rank holds, parallelised (TP / EP / CP plans,
FSDP2) and only then materialised with ``to_empty``; :func:`init_module_` fills the *local* shard of every parameter
and buffer. The values of a shard are exactly the same elements of the tensor a single process would draw, whatever
the layout, because nothing depends on which rank draws them:

- each tensor has its own seed, :func:`tensor_seed` ``(module_seed, canonical name)`` (a stable hash; the module
  seed is the job seed plus the module's position in the config, :func:`module_init_seeds`);
- the tensor is cut along dim 0 into blocks of :func:`block_rows` rows (a function of the *full* shape only), and
  block ``b`` is drawn by its own CPU generator seeded with ``hash(tensor seed, b)``;
- a rank holding the box ``[offset, offset + local_shape)`` of the full tensor (its FSDP ``Shard(0)`` rows, its
  TP columns, its EP experts) draws only the blocks that overlap its rows, one at a time, and keeps the box's part
  of each: peak extra memory is one block (:data:`BLOCK_NUMEL` elements), never a whole matrix.

Which distribution each tensor gets (truncated normal std 0.02, ones, zeros, a fixed table) is declared by the
model classes themselves: a module with an ``init_rules()`` method returns ``{name relative to it: InitRule}`` for
every parameter and buffer under it (:class:`~mimo_titan.models.decoder.DecoderLM`,
:class:`~mimo_titan.models.vit.VisionEncoder`, :class:`~mimo_titan.models.audio.AudioEncoder`).

Method: torchtitan's meta-device initialisation (``to_empty`` then ``init_weights`` on the sharded model) with
Megatron-LM's layout-independent goal (``--use-cpu-initialization`` draws the full tensor and keeps a slice); here
the per-block generators make the slice cheap. Truncated normal as ``torch.nn.init.trunc_normal_``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

__all__ = [
    "BLOCK_NUMEL",
    "InitRule",
    "block_rows",
    "collect_init_rules",
    "fill_box",
    "init_module_",
    "local_box",
    "module_init_seeds",
    "resolve_seed",
    "tensor_seed",
]

#: Elements per random block (4 MiB of fp32): a tensor's rows are drawn ``block_rows(shape)`` at a time.
BLOCK_NUMEL = 1 << 20


@dataclass(frozen=True)
class InitRule:
    """How one parameter or buffer is initialised.

    Attributes:
        kind: ``"trunc_normal"`` (mean 0, ``std``, truncated to ``[-2·std, 2·std]``), ``"ones"``, ``"zeros"`` or
            ``"table"`` (``table(full_shape)`` returns the whole fp32 tensor, e.g. Whisper's sinusoids; for small
            deterministic buffers).
        std: standard deviation of ``"trunc_normal"``.
        seed_name: draw the tensor as the one of this name (relative to the same module), e.g. the last pipeline
            stage's copy of tied word embeddings (``lm_head.weight`` drawn as ``model.embed_tokens.weight``).
        table: the builder of ``"table"``.
    """

    kind: str
    std: float = 0.02
    seed_name: str | None = None
    table: Callable[[tuple[int, ...]], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("trunc_normal", "ones", "zeros", "table"):
            raise ValueError(f"unknown init kind {self.kind!r}")
        if self.kind == "table" and self.table is None:
            raise ValueError("an InitRule of kind 'table' needs its table builder")


def _hash63(text: str) -> int:
    """A stable (process-, platform- and version-independent) 63-bit hash of ``text``."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def module_init_seeds(job_seed: int, module_names: Sequence[str]) -> dict[str, int]:
    """The init seed of each module of a MIMO model: ``job_seed + k`` for the module at position ``k`` (encoders in
    config order, then the language model)."""
    return {name: job_seed + k for k, name in enumerate(module_names)}


def resolve_seed(seed: int | None) -> int:
    """``seed``, or with None one drawn from the global torch RNG (a module's ``init_weights()`` without a seed is
    deterministic given ``torch.manual_seed``)."""
    return int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)


def tensor_seed(module_seed: int, name: str) -> int:
    """The seed of tensor ``name`` (its canonical single-process name, ``language.model.norm.weight``) in a module
    initialised from ``module_seed``: a 63-bit hash of both."""
    return _hash63(f"{module_seed}/{name}")


def block_rows(full_shape: Sequence[int]) -> int:
    """Rows (along dim 0) per random block of a tensor of ``full_shape``: as many as fit in :data:`BLOCK_NUMEL`
    elements, at least one. Depends on the full shape only, so every layout cuts the tensor the same way."""
    row = math.prod(full_shape[1:]) if len(full_shape) > 1 else 1
    return max(1, BLOCK_NUMEL // max(row, 1))


def fill_box(
    out: torch.Tensor,
    rule: InitRule,
    seed: int,
    full_shape: Sequence[int],
    offset: Sequence[int],
) -> torch.Tensor:
    """Fill ``out`` in place with the box ``[offset, offset + out.shape)`` of the full tensor that ``rule`` and
    ``seed`` define.

    Args:
        out: the local tensor (any device, any floating dtype), shape ``local_shape`` with ``offset[d] +
            local_shape[d] <= full_shape[d]``.
        rule: the distribution.
        seed: :func:`tensor_seed` of the tensor.
        full_shape: the single-process shape of the tensor.
        offset: global offset of ``out``'s first element in every dim.

    Returns:
        ``out``. Random values are drawn in fp32 on CPU (bit-identical on every device), block by block
        (:func:`block_rows`): extra memory is one block.

    Raises:
        ValueError: a box outside the full tensor.

    Example: a ``[10, 4]`` tensor with ``block_rows = 4`` has blocks of rows 0-3, 4-7, 8-9; the FSDP shard of rank 1
    of 3 (rows 4-7, ``torch.chunk`` sizes 4/4/2) draws block 1 only; a TP column shard ``offset = (0, 2)`` draws
    all three blocks and keeps columns 2-3 of each.
    """
    full_shape, local_shape = tuple(full_shape), tuple(out.shape)
    offset = tuple(offset)
    if len(full_shape) != len(local_shape) or len(offset) != len(full_shape):
        raise ValueError(f"a box of shape {local_shape} at {offset} does not fit a tensor of shape {full_shape}")
    if any(o < 0 or o + s > f for o, s, f in zip(offset, local_shape, full_shape)):
        raise ValueError(f"a box of shape {local_shape} at {offset} lies outside a tensor of shape {full_shape}")
    with torch.no_grad():
        if rule.kind in ("ones", "zeros"):
            return out.fill_(1.0 if rule.kind == "ones" else 0.0)
        if out.numel() == 0:
            return out
        box = tuple(slice(o, o + s) for o, s in zip(offset, local_shape))
        if rule.kind == "table":
            assert rule.table is not None
            return out.copy_(rule.table(full_shape)[box])
        if not full_shape:  # a 0-dim tensor: one block of one element
            g = torch.Generator().manual_seed(_hash63(f"{seed}/0"))
            value = torch.empty(1)
            nn.init.trunc_normal_(value, std=rule.std, a=-2 * rule.std, b=2 * rule.std, generator=g)
            return out.copy_(value[0])
        k = block_rows(full_shape)
        first, last = offset[0], offset[0] + local_shape[0]  # rows [first, last) of the full tensor
        for b in range(first // k, (last - 1) // k + 1):
            start, stop = b * k, min((b + 1) * k, full_shape[0])
            g = torch.Generator().manual_seed(_hash63(f"{seed}/{b}"))
            block = torch.empty(stop - start, *full_shape[1:])
            nn.init.trunc_normal_(block, std=rule.std, a=-2 * rule.std, b=2 * rule.std, generator=g)
            lo, hi = max(first, start), min(last, stop)
            rows = (slice(lo - start, hi - start),)
            out[lo - first : hi - first].copy_(block[rows + box[1:]])
            del block
    return out


def local_box(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """``(local tensor, global shape, global offset)`` of ``t``: for a ``DTensor`` its local shard, the DTensor's
    shape and the shard's offset (``compute_local_shape_and_global_offset`` of its mesh and placements: FSDP
    ``Shard(0)``, TP ``Shard(d)``, ``Replicate``, and their 2-D combinations); a plain tensor is its own box."""
    if isinstance(t, DTensor):
        local = t.to_local()
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        assert tuple(shape) == tuple(local.shape), f"local shard {tuple(local.shape)} is not the expected {shape}"
        return local, tuple(t.shape), tuple(int(o) for o in offset)
    return t, tuple(t.shape), (0,) * t.dim()


def layer_init_rules(
    module: nn.Module, std: float = 0.02, norms: tuple[type[nn.Module], ...] = (nn.LayerNorm,)
) -> dict[str, InitRule]:
    """The usual transformer init of ``module``'s tensors, names relative to it: truncated normal(``std``) weights of
    ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Embedding``, zero biases, unit scales and zero biases of the
    ``norms`` classes; a submodule with its own ``init_rules(std)`` (an MoE layer, a fixed table) gives the rules of
    everything under it.

    Used by the models' ``init_rules`` (:class:`~mimo_titan.models.decoder.DecoderLM`, the ViT and audio encoders),
    which add their exceptions (tied embeddings).
    """
    normal = InitRule("trunc_normal", std)
    rules: dict[str, InitRule] = {}
    owners: list[str] = []  # prefixes of the submodules whose own rules cover everything under them
    for qual, m in module.named_modules():
        pre = f"{qual}." if qual else ""
        if any(pre.startswith(o) for o in owners):
            continue
        if m is not module and hasattr(m, "init_rules"):
            owners.append(pre)
            rules.update({pre + k: r for k, r in m.init_rules(std).items()})
        elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, *norms)):
            rules[pre + "weight"] = InitRule("ones") if isinstance(m, norms) else normal
            if getattr(m, "bias", None) is not None:
                rules[pre + "bias"] = InitRule("zeros")
    return rules


def collect_init_rules(module: nn.Module) -> dict[str, InitRule]:
    """``{name relative to module: InitRule}`` from every outermost submodule (``module`` itself included) that has
    an ``init_rules()`` method; rule names are prefixed with the submodule's qualified name."""
    rules: dict[str, InitRule] = {}
    owners: list[str] = []  # prefixes of the submodules whose rules cover everything under them
    for qual, sub in module.named_modules():
        if any(qual.startswith(o) for o in owners) or not hasattr(sub, "init_rules"):
            continue
        pre = f"{qual}." if qual else ""
        owners.append(pre)
        for name, rule in sub.init_rules().items():
            if rule.seed_name is not None:
                rule = InitRule(rule.kind, rule.std, pre + rule.seed_name, rule.table)
            rules[pre + name] = rule
    return rules


def init_module_(
    module: nn.Module,
    module_seed: int,
    canonical: Callable[[str], str] = lambda name: name,
    *,
    full_shapes: Mapping[str, Sequence[int]] | None = None,
    offsets: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """Initialise every parameter and buffer of ``module`` (a whole model, or one rank's parallelised part of it,
    already materialised with ``to_empty``) in place: each tensor's local shard gets exactly the values of the same
    elements of the single-process init.

    Args:
        module: the module; its parameters may be ``DTensor`` s (FSDP / TP shards).
        module_seed: the module's init seed (:func:`module_init_seeds`).
        canonical: maps a name relative to ``module`` to the tensor's canonical single-process name (the seed key,
            and the key of ``full_shapes`` / ``offsets``), e.g. ``language.model.layers.3.mlp.gate_proj.weight``.
        full_shapes: canonical name → single-process shape, for tensors whose global (DTensor) shape is itself a
            slice (expert-parallel experts); default: the tensor's global shape.
        offsets: canonical name → offset of the tensor's global shape inside the full tensor (the EP slice's first
            expert and expert-TP width); added to the shard's own offset. Default zero.

    Raises:
        ValueError: a parameter or buffer without an init rule (a module class that declares none).
    """
    rules = collect_init_rules(module)
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    for name, t in tensors.items():
        rule = rules.get(name)
        if rule is None:
            raise ValueError(
                f"{canonical(name)} ({type(module).__name__}) has no init rule: its module class must declare it in "
                "init_rules() (mimo_titan.models.init)"
            )
        key = canonical(name)
        local, shape, offset = local_box(t)
        full = tuple((full_shapes or {}).get(key, shape))
        base = tuple((offsets or {}).get(key, (0,) * len(shape)))
        seed = tensor_seed(module_seed, canonical(rule.seed_name) if rule.seed_name else key)
        fill_box(local, rule, seed, full, tuple(b + o for b, o in zip(base, offset)))
