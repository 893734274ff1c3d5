"""Expert parallelism of one MoE layer across ranks equals the single-process layer (forward and gradients).

Each rank feeds its own token slice through the EP/ETP dispatch (all-to-all over ep, all-gather /
reduce-scatter over etp); the output, the input gradient, this rank's slice of every expert-weight gradient and
the router / shared-expert gradients (summed over ranks) must equal those of the full layer on all tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch

from _launch import per_layout_backends, run_ranks

H = 16


def _full_moe(load_balance="aux_loss"):
    from mimo_titan.config import MoEConfig
    from mimo_titan.models.moe import MoE

    torch.manual_seed(3)
    m = MoE(
        H,
        MoEConfig(
            num_experts=8, top_k=2, intermediate_size=12, shared_expert_intermediate_size=8, load_balance=load_balance
        ),
    )
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m


def _ep_worker(rank, world, device, ep, etp, n_per_rank):
    import torch.distributed as dist

    from mimo_titan.parallel.ep import apply_ep
    from mimo_titan.topology import ModuleLayout, build_topology

    lay = ModuleLayout("language", 0, world, dp_shard=world, ep=ep, etp=etp, is_language=True)
    topo = build_topology({"language": lay}, world, rank, device.type)
    coord = topo.role.expert_coordinates("language")
    g = torch.Generator().manual_seed(11)
    x_all = torch.randn(world * n_per_rank, H, generator=g)
    w_all = torch.randn(world * n_per_rank, H, generator=g)
    mine = slice(rank * n_per_rank, (rank + 1) * n_per_rank)

    ref = _full_moe()
    x_ref = x_all.clone().requires_grad_(True)
    out_ref = ref(x_ref[None])[0]
    ref_grads = torch.autograd.grad((out_ref * w_all).sum(), [x_ref, *ref.parameters()])
    ref_grads = dict(zip(["x", *[n for n, _ in ref.named_parameters()]], ref_grads))

    moe = copy.deepcopy(_full_moe())
    apply_ep(
        moe,
        topo.ep_group("language"),
        ep,
        coord["ep"],
        topo.etp_group("language") if etp > 1 else None,
        etp,
        coord["etp"],
    )
    moe.stats_group = dist.group.WORLD
    x = x_all[mine].clone().requires_grad_(True)
    out = moe(x[None])[0]
    grads = torch.autograd.grad((out * w_all[mine]).sum(), [x, *moe.parameters()])
    torch.testing.assert_close(out, out_ref[mine].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], ref_grads["x"][mine], rtol=1e-5, atol=1e-6)
    L, w = 8 // ep, 12 // etp
    e_sl, w_sl = slice(coord["ep"] * L, (coord["ep"] + 1) * L), slice(coord["etp"] * w, (coord["etp"] + 1) * w)
    expect = {
        "experts.w_gate": ref_grads["experts.w_gate"][e_sl, :, w_sl],
        "experts.w_up": ref_grads["experts.w_up"][e_sl, :, w_sl],
        "experts.w_down": ref_grads["experts.w_down"][e_sl, w_sl, :],
    }
    checked = 0
    for (name, _), gr in zip(moe.named_parameters(), grads[1:]):
        if name in expect:  # expert grads: each (ep, etp) slice holds the sum over the edp replicas' tokens
            gr = gr.clone()
            dist.all_reduce(gr, group=topo.expert_mesh("language")["edp"].get_group())
            torch.testing.assert_close(gr, expect[name], rtol=1e-5, atol=1e-6, msg=name)
        else:  # dense params (router, shared expert): sum over all ranks
            gr = gr.clone()
            dist.all_reduce(gr)
            torch.testing.assert_close(gr, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
        checked += 1
    from mimo_titan.train.rng import module_seeds

    seeds = module_seeds(0, 1, {**topo.role.coordinates["language"], **coord})
    return {
        "checked": checked,
        "local_experts": moe.experts.w_gate.shape[0],
        "width": moe.experts.w_gate.shape[2],
        "coord": dict(coord),
        "seeds": seeds,
    }


EP_LAYOUTS = {"ep2": (2, 2, 1), "ep4": (4, 4, 1), "ep2_etp2": (4, 2, 2), "ep2_edp2": (4, 2, 1)}


@pytest.mark.multirank
@pytest.mark.parametrize("layout,backend", per_layout_backends({k: v[0] for k, v in EP_LAYOUTS.items()}))
def test_ep_layer_matches_single_process(layout, backend):
    world, ep, etp = EP_LAYOUTS[layout]
    res = run_ranks(_ep_worker, world, ep, etp, 5, backend=backend)
    n_params = len(list(_full_moe().parameters()))
    assert all(r["checked"] == n_params for r in res)
    assert all(r["local_experts"] == 8 // ep and r["width"] == 12 // etp for r in res)
    # RNG streams from the ranks' real coordinates: expert streams differ across (ep, etp), agree across edp
    for a in res:
        for b in res:
            same_shard = (a["coord"]["ep"], a["coord"]["etp"]) == (b["coord"]["ep"], b["coord"]["etp"])
            assert (a["seeds"]["expert"] == b["seeds"]["expert"]) == same_shard
            assert a["seeds"]["default"] == b["seeds"]["default"]
