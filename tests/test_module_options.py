"""Per-module options on single-process tiny models: activation checkpointing really recomputes and keeps the
gradients, a compiled block equals the eager one, the options' config checks and FSDP resharding defaults.
(Distributed runs with the options: tests/test_oracle.py.)"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _tiny import tiny_config_dict
from mimo_titan.config import ConfigError, config_from_dict
from mimo_titan.models.decoder import DecoderLM
from mimo_titan.parallel.ac import apply_activation_checkpointing, apply_compile, check_module_options
from mimo_titan.parallel.fsdp import reshard_after_forward

MOE = {"num_experts": 4, "top_k": 2, "intermediate_size": 32, "aux_loss_coeff": 0.05}
MM = torch.ops.aten.mm.default
SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _cfg(language=None, vision=None, **sections):
    one = {"rank_offset": 0, "num_ranks": 1}
    d = tiny_config_dict({**one, **(vision or {})}, {**one, **(language or {})}, **sections)
    return config_from_dict(d)


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))


def _lm_step(lm, ids):
    """Loss, gradients and the ops run by the backward of one forward/backward of ``lm``."""
    lm.zero_grad()
    out = lm(ids)
    loss = out.float().pow(2).mean()
    with _OpCounter() as backward:
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}, backward.ops


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_activation_checkpointing_recomputes_and_keeps_gradients(moe):
    cfg = _cfg(model={"language": {"moe": MOE if moe else {}}})
    torch.manual_seed(0)
    lm = DecoderLM(cfg.model.language)
    lm.init_weights()
    ids = torch.randint(0, cfg.model.language.vocab_size, (2, 24))
    ref_loss, ref_grads, ref_ops = _lm_step(lm, ids)
    ref_counts = {n: m.tokens_per_expert.clone() for n, m in lm.named_modules() if hasattr(m, "tokens_per_expert")}
    assert ref_ops[SDPA] == 0  # without checkpointing the backward runs no forward attention
    names = [n for n, _ in lm.named_parameters()]
    recomputed = {}
    for mode in ("full", "selective"):
        m = copy.deepcopy(lm)
        for sub in m.modules():
            if hasattr(sub, "reset_stats"):
                sub.reset_stats()
        apply_activation_checkpointing(m.model.layers.values(), mode)
        loss, grads, ops = _lm_step(m, ids)
        assert [n for n, _ in m.named_parameters()] == names  # no wrapper module: names unchanged
        assert loss == ref_loss
        for n in names:
            torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-6, rtol=0, msg=f"{mode} {n}")
        for n, sub in m.named_modules():  # the recompute of a MoE layer does not count its tokens again
            if n in ref_counts:
                assert torch.equal(sub.tokens_per_expert, ref_counts[n]), f"{mode} {n}"
        recomputed[mode] = ops[MM] - ref_ops[MM]
        # full recomputes the attention kernel in the backward; selective keeps its output
        assert ops[SDPA] == (cfg.model.language.num_layers if mode == "full" else 0), mode
    # full re-runs every forward matmul the backward needs, selective about every second one, none nothing
    assert recomputed["full"] > recomputed["selective"] > 0, recomputed


def test_compiled_blocks_equal_eager():
    """``compile`` per block (the ``aot_eager`` backend here: inductor takes ~30 s on this CPU) under selective
    checkpointing, as a module with both options runs: the eager forward and gradients to 1e-5."""
    cfg = _cfg()
    torch.manual_seed(0)
    lm = DecoderLM(cfg.model.language)
    lm.init_weights()
    ids = torch.randint(0, cfg.model.language.vocab_size, (2, 24))
    compiled = copy.deepcopy(lm)
    apply_activation_checkpointing(compiled.model.layers.values(), "selective")
    apply_compile(compiled.model.layers.values(), backend="aot_eager")
    assert all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in compiled.model.layers.values())
    outs, grads = [], []
    for m in (lm, compiled):
        out = m(ids)
        out.float().pow(2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=0, msg=n)


def test_option_config_keys_and_checks():
    cfg = _cfg(
        language={"activation_checkpointing": "Selective", "fsdp_reshard_after_forward": True, "pp": 2},
        vision={"compile": True},
    )
    lang, vis = cfg.parallelism.language, cfg.parallelism.vision
    assert (lang.activation_checkpointing, lang.compile, lang.fsdp_reshard_after_forward) == ("selective", False, True)
    assert (vis.activation_checkpointing, vis.compile, vis.fsdp_reshard_after_forward) == ("none", True, None)
    with pytest.raises(
        ConfigError, match=r"'parallelism\.language\.activation_checkpointing'.*'none', 'full', 'selective'"
    ):
        _cfg(language={"activation_checkpointing": "some"})
    # defaults: off with pp = 1 (no re-gather per microbatch), on with pp > 1; an explicit value wins
    assert [reshard_after_forward(None, pp) for pp in (1, 2)] == [False, True]
    assert [reshard_after_forward(v, pp) for v in (True, False) for pp in (1, 2)] == [True, True, False, False]
    moe = _cfg(model={"language": {"moe": MOE}}, language={"compile": True})
    with pytest.raises(ConfigError, match=r"parallelism\.language\.compile = true with model\.language\.moe"):
        check_module_options("language", moe.parallelism.language, moe.model.language)
    ep = _cfg(model={"language": {"moe": MOE}}, language={"activation_checkpointing": "selective", "ep": 2})
    with pytest.raises(ConfigError, match=r"parallelism\.language\.activation_checkpointing = 'selective' with exp"):
        check_module_options("language", ep.parallelism.language, ep.model.language)
    cp = _cfg(language={"activation_checkpointing": "selective", "cp": 2})
    with pytest.raises(ConfigError, match=r"'selective' with cp=2 is not supported yet.*'full'"):
        check_module_options("language", cp.parallelism.language, cp.model.language)
    with pytest.raises(ConfigError, match=r"'selective' with data\.packing = true"):
        check_module_options(
            "language",
            ok_sel := _cfg(language={"activation_checkpointing": "selective"}).parallelism.language,
            None,
            packed=True,
        )
    check_module_options("language", ok_sel, None, packed=False)
    for ok in (
        _cfg(model={"language": {"moe": MOE}}, language={"activation_checkpointing": "full", "ep": 2}),
        _cfg(model={"language": {"moe": MOE}}, language={"activation_checkpointing": "selective"}),
        _cfg(language={"compile": True, "activation_checkpointing": "selective"}),
    ):
        check_module_options("language", ok.parallelism.language, ok.model.language)
