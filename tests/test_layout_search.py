"""Layout search (mimo_titan.planning.search, scripts/plan_layout.py): ranked layouts that validate and fit, memory that
is the dry-run planner's, cost-model scaling, the homogeneous baselines, errors, and an emitted layout that trains."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mimo_titan.config import config_from_dict, load_config
from mimo_titan.errors import ConfigError
from mimo_titan.planning.costs import CostModel, Degrees, group_crosses_nodes
from mimo_titan.planning.devices import DEVICES, device_spec
from mimo_titan.planning.search import layout_overrides, search_layouts
from mimo_titan.train.flops import lm_flops_per_token

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "train_configs/debug_noncolocated.toml"
SIGLIP_8B = ROOT / "train_configs/siglip_qwen3_8b_64gpu.toml"


@pytest.fixture(scope="module")
def debug_result():
    return search_layouts(load_config(DEBUG), 8, device_spec("cpu"), top=5)


def test_ranked_layouts_validate_fit_and_are_priced_consistently(debug_result):
    from mimo_titan.train.trainer import validate_job

    cfg = load_config(DEBUG)
    r = debug_result
    assert 1 <= len(r.ranked) <= 5
    steps = [x.step_s for x in r.ranked]
    assert steps == sorted(steps)
    tokens = cfg.training.global_batch_size * cfg.training.seq_len
    for layout in r.ranked:
        assert layout.tokens_per_s == pytest.approx(tokens / layout.step_s)
        assert max(layout.mem_per_rank_gib.values()) <= r.budget_gib
        validate_job(config_from_dict(cfg.to_dict(), layout_overrides(layout)), 8)
        busy = layout.busy_fraction
        assert busy and all(0 < b <= 1 + 1e-9 for b in busy.values())
    assert r.budget_gib == pytest.approx(24.0 / 8 * 0.9)  # CPU: the machine's memory shared by its 8 ranks
    kinds = {k for k, v in r.homogeneous.items() if v is not None}
    assert kinds == {"same_layout", "folded"}
    h = r.best_homogeneous
    assert r.speedup == pytest.approx(r.best.tokens_per_s / h.tokens_per_s)
    j = r.to_json()
    assert set(j["best"]) >= {"modules", "tokens_per_s", "step_s", "mem_per_rank_gib"} and j["speedup"] > 0


def test_search_memory_is_the_dry_run_planners(debug_result):
    """Every ranked layout's memory per module equals plan_job's rank total for the emitted config (same model)."""
    from mimo_titan.train.planner import plan_job

    cfg = load_config(DEBUG)
    for layout in debug_result.ranked:
        plan = plan_job(config_from_dict(cfg.to_dict(), layout_overrides(layout)), 8, device_type="cpu")
        for name, gib in layout.mem_per_rank_gib.items():
            assert gib == pytest.approx(plan.modules[name].rank_total_gib, rel=1e-9), (layout.describe(), name)


def test_cost_model_scales_with_the_layout():
    cfg = load_config(SIGLIP_8B)
    cm = CostModel(cfg, DEVICES["h100"])
    one = cm.module_costs("language", Degrees(0, 8, dp_shard=8), samples=2)
    tp2 = cm.module_costs("language", Degrees(0, 8, dp_shard=4, tp=2), samples=2)
    pp2 = cm.module_costs("language", Degrees(0, 16, pp=2, dp_shard=8), samples=2)
    # FLOPs per rank: tp halves them; pp=2 keeps the busier stage (18 layers + the head, or 18 + nothing)
    assert tp2.flops == pytest.approx(one.flops / 2)
    assert one.flops / 2 < pp2.flops < one.flops
    seq = cfg.training.seq_len  # 2 samples of seq tokens at the flops module's training FLOPs per token
    assert one.flops == pytest.approx(2 * seq * lm_flops_per_token(cfg.model.language, seq))
    assert tp2.forward_s < one.forward_s and pp2.send_s > 0 and one.send_s == 0
    # compute at the device's MFU: the whole model's training FLOPs at peak x mfu x the size factor
    speed = one.flops / (one.forward_s + one.backward_s)
    assert 0.3 * 989e12 < speed < 0.45 * 989e12
    # a bridge across nodes is slower than one inside a colocated range; it grows with the microbatch
    enc, lm = Degrees(0, 8, dp_shard=8), Degrees(8, 8, dp_shard=8)
    far = cm.bridge_s("vision", enc, lm, samples_per_microbatch=16)
    near = cm.bridge_s("vision", enc, Degrees(0, 8, dp_shard=8), samples_per_microbatch=16)
    assert far > near and cm.bridge_s("vision", enc, lm, samples_per_microbatch=32) > far
    h = cfg.model.language.hidden_size
    expected = 16 / 8 * 729 * h * 2 / (50e9 * 0.8) + 20e-6  # 2 samples' 729 rows of bf16 over the 400 Gb/s NIC
    assert far == pytest.approx(expected)


def test_group_crosses_nodes():
    assert not group_crosses_nodes(0, 8, 1, 8)
    assert group_crosses_nodes(4, 8, 1, 8)
    assert group_crosses_nodes(0, 2, 8, 8)
    assert not group_crosses_nodes(3, 1, 8, 8)


def test_a_thousand_ranks_are_searched_in_seconds_and_fit():
    """1,024 H100s, SigLIP + Qwen3-8B at 8K: the search prunes to a few dozen simulated steps (its speed is in the
    note; here only that it prunes, and that its answer is valid)."""
    cfg = load_config(
        SIGLIP_8B, ["--training.seq_len=8192", "--data.max_images_per_sample=8", "--training.global_batch_size=1024"]
    )
    r = search_layouts(cfg, 1024, DEVICES["h100"])
    assert r.simulated < 300 and r.considered < 20000
    assert all(max(x.mem_per_rank_gib.values()) <= r.budget_gib for x in r.ranked)
    # the baselines are priced favourably (images split evenly even where mimo_titan needs whole samples per DP rank),
    # so the best runnable layout may trail them by a hair, not more
    assert r.best_homogeneous is not None and r.speedup >= 0.99


def test_no_layout_fits_names_the_module_and_the_shortfall():
    cfg = load_config(SIGLIP_8B, ["--training.seq_len=65536", "--training.global_batch_size=8"])
    with pytest.raises(ConfigError, match=r"module 'language' needs at least [0-9.]+ GiB per rank .* [0-9.]+ GiB more"):
        search_layouts(cfg, 2, DEVICES["h100"])
    with pytest.raises(ConfigError, match="--device 'tpu' is not a known device type; choose one of h100"):
        device_spec("tpu")


def _plan_layout(*args):
    return subprocess.run(
        [sys.executable, "scripts/plan_layout.py", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_plan_layout_cli_errors():
    out = _plan_layout("--config", str(DEBUG), "--world-size", "8", "--device", "tpu")
    assert out.returncode == 2 and "error: --device 'tpu' is not a known device type" in out.stderr
    out = _plan_layout("--config", str(DEBUG), "--world-size", "0", "--device", "cpu")
    assert out.returncode == 2 and "--world-size 0: it must be >= 1" in out.stderr
    # an output path that cannot be written is refused before the search, in one line (it was a traceback after it)
    out = _plan_layout("--config", str(DEBUG), "--world-size", "4", "--device", "cpu", "--json", "/absent/dir/x.json")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "--json /absent/dir/x.json: the folder /absent/dir does not exist" in out.stderr


def _import_script(name):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_plan_layout_overrides_tiny_steps_and_emitted_header(tmp_path, capsys):
    """A global batch the config's own training.microbatches does not divide is planned (the search picks M), a
    space-separated override works as in train.py, a step of well under a millisecond prints its digits, and the
    emitted TOML's first line is the command that planned it."""
    plan_layout = _import_script("plan_layout")
    js, emitted = tmp_path / "r.json", tmp_path / "best.toml"
    argv = ["--config", str(DEBUG), "--world-size", "4", "--device", "h100", "--training.global_batch_size=7"]
    argv += ["--training.seq_len", "128", "--json", str(js), "--emit-toml", str(emitted)]
    assert plan_layout.main(argv) == 0
    out = capsys.readouterr().out
    assert "7 samples x 128 tokens per step" in out
    best = json.loads(js.read_text())["best"]
    assert best["microbatches"] in (1, 7) and 0 < best["step_s"] < 1e-2
    row = re.search(r"^1 +([0-9,]+) +([0-9.]+) +([0-9.]+)  ", out, re.M)
    assert row is not None
    assert float(row.group(2)) == pytest.approx(best["step_s"], rel=0.05)
    assert float(row.group(3)) == pytest.approx(best["mem_per_rank_gib"], rel=0.05)
    head = emitted.read_text().splitlines()[0]
    assert head.endswith("--device h100 --training.global_batch_size=7 --training.seq_len 128")
    assert load_config(emitted).training.global_batch_size == 7


def test_layout_report_table_has_one_cell_per_column(monkeypatch, capsys):
    """layout_report.py's Markdown rows have as many cells as its header (a layout's " | " used to split its cell)."""
    layout_report = _import_script("layout_report")
    monkeypatch.setattr(layout_report, "MODELS", {"debug": str(DEBUG)})
    monkeypatch.setattr(layout_report, "WORLDS", (4,))
    monkeypatch.setattr(layout_report, "SEQUENCES", {64: (1, 12)})
    assert layout_report.main(["--device", "cpu"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("|")]
    assert len(lines) == 3 and {x.count("|") for x in lines} == {10}
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    r = search_layouts(load_config(DEBUG), 4, device_spec("cpu"), top=1)
    assert float(cells[4]) == pytest.approx(r.best.tokens_per_s / 1e6, abs=1e-3)
    assert float(cells[8]) == pytest.approx(r.speedup, abs=1e-3)


@pytest.mark.multirank
def test_emitted_layout_trains(tmp_path, capsys):
    """plan_layout.py --json / --emit-toml on 4 CPU ranks, then the emitted config trains 2 steps on 4 ranks (forked
    from the tests' forkserver: scripts/train.py's config parsing and training, without torchrun's start-up)."""
    from test_faults import forked_run

    emitted, js = tmp_path / "best.toml", tmp_path / "best.json"
    args = [
        "--config",
        str(DEBUG),
        "--world-size",
        "4",
        "--device",
        "cpu",
        "--json",
        str(js),
        "--emit-toml",
        str(emitted),
    ]
    assert _import_script("plan_layout").main(args) == 0
    out = capsys.readouterr().out
    result = json.loads(js.read_text())
    assert set(result) >= {"best", "best_homogeneous", "speedup"}
    cfg = load_config(emitted)
    best = result["best"]
    for name, mod in best["modules"].items():
        lay = cfg.parallelism.modules[name]
        assert {k: getattr(lay, k) for k in mod if k != "activation_checkpointing"} == {
            k: v for k, v in mod.items() if k != "activation_checkpointing"
        }
    assert cfg.training.microbatches == best["microbatches"]
    assert re.search(r"^1 +[0-9,]+ +[0-9.]+ +[0-9.]+  ", out, re.M)
    argv = ["--config", str(emitted), "--training.steps=2", "--lr_schedule.warmup_steps=0"]
    records, _log = forked_run([*argv, f"--job.output_dir={tmp_path}"], nproc=4)
    assert sorted(records) == [1, 2] and all(math.isfinite(r["loss"]) for r in records.values())


def test_measured_costs_are_used_and_a_foreign_costs_file_is_refused(tmp_path, capsys):
    import torch

    from mimo_titan.planning.profile import profile_modules

    plan_layout = _import_script("plan_layout")
    costs = tmp_path / "costs.json"
    measured = profile_modules(load_config(DEBUG), device=torch.device("cpu"), samples=(1,), repeats=1, warmup=0)
    costs.write_text(json.dumps(measured))
    assert (
        plan_layout.main(["--config", str(DEBUG), "--world-size", "4", "--device", "cpu", "--costs", str(costs)]) == 0
    )
    assert f"costs: measured ({costs})" in capsys.readouterr().out
    # the measured speed replaces the device's planning efficiency, module by module
    cm = CostModel(load_config(DEBUG), DEVICES["cpu"], measured=measured)
    point = measured["modules"]["language"]["points"][0]
    speed = point["train_flops"] / (point["forward_s"] + point["backward_s"])
    assert cm.efficiency["language"] * DEVICES["cpu"].peak_flops == pytest.approx(speed)
    other = ROOT / "train_configs/debug_vision_audio.toml"
    assert (
        plan_layout.main(["--config", str(other), "--world-size", "8", "--device", "cpu", "--costs", str(costs)]) == 2
    )
    assert "has no module 'audio'" in capsys.readouterr().err
    assert (
        plan_layout.main(["--config", str(DEBUG), "--world-size", "4", "--device", "h100", "--costs", str(costs)]) == 2
    )
    assert "was measured on cpu, not on a h100" in capsys.readouterr().err


def test_tied_embeddings_keep_the_language_tp_at_1():
    """validate_job refuses tp > 1 with tied embeddings, so the search must not rank (or prune by) such layouts: with
    --top 1 on 128 H100s they once filled the shortlist and the search said no layout splits the batch."""
    from mimo_titan.train.trainer import validate_job

    cfg = load_config(DEBUG, ["--model.language.tie_word_embeddings=true"])
    r = search_layouts(cfg, 8, device_spec("cpu"), top=5)
    assert len(r.ranked) == 5
    for layout in r.ranked:
        assert layout.modules["language"].tp == 1, layout.describe()
        validate_job(config_from_dict(cfg.to_dict(), layout_overrides(layout)), 8)
    big = load_config(
        ROOT / "train_configs/siglip_qwen3_8b_32k_cp_colocated.toml", ["--model.language.tie_word_embeddings=true"]
    )
    best = search_layouts(big, 128, DEVICES["h100"], top=1).best
    assert best.modules["language"].tp == 1, best.describe()
    validate_job(config_from_dict(big.to_dict(), layout_overrides(best)), 128)


def test_sequence_padding_is_each_searched_layouts_own():
    """training.seq_len = 62: the loader pads rows to what each layout's CP / SP split needs (64 for cp = tp = 2, as
    debug_tp_cp's own layout; 62 for cp = 1, tp <= 2), so the search prices each layout's own padding, not the input
    config's: memory equal to plan_job's for the emitted config, tokens/s of 62-token rows, and LM tp = 2 (no
    padding needed) among the layouts searched."""
    from mimo_titan.train.planner import plan_job

    cfg = load_config(ROOT / "train_configs/debug_tp_cp.toml", ["--training.seq_len=62"])
    r = search_layouts(cfg, 8, device_spec("cpu"), top=5)
    for layout in r.ranked:
        assert layout.tokens_per_s == pytest.approx(cfg.training.global_batch_size * 62 / layout.step_s)
        plan = plan_job(config_from_dict(cfg.to_dict(), layout_overrides(layout)), 8, device_type="cpu")
        for name, gib in layout.mem_per_rank_gib.items():
            assert gib == pytest.approx(plan.modules[name].rank_total_gib, rel=1e-9), (layout.describe(), name)
    odd = search_layouts(load_config(DEBUG, ["--training.seq_len=62"]), 8, device_spec("cpu"), top=5)
    assert any(x.modules["language"].tp == 2 for x in odd.ranked), [x.describe() for x in odd.ranked]


def test_measured_speed_holds_at_the_profiled_shape():
    """A costs file profiled with --seq-len 32 for a config of seq_len 64: a rank that multiplies as many rows as the
    profiled point (1 sample x 64 tokens = 2 samples x 32) computes at the measured FLOP/s (the size factor is relative
    to the profiled shape, not to the config's sequence)."""
    cfg = load_config(DEBUG)
    point = {"samples": 2, "forward_s": 0.01, "backward_s": 0.02, "train_flops": 3e9}
    measured = {"modules": {"language": {"seq_len": 32, "num_layers": 4, "points": [point]}}}
    cm = CostModel(cfg, DEVICES["cpu"], measured=measured)
    c = cm.module_costs("language", Degrees(0, 1), samples=1)
    assert cfg.training.seq_len == 64 and c.flops / (c.forward_s + c.backward_s) == pytest.approx(3e9 / 0.03)


def test_node_crossing_counts_every_group_of_a_module():
    """The slowest group sets a collective's time: tp = 4 from rank 2 puts ranks 6-9 in one group across the node
    boundary at 8 (its first group, 2-5, does not cross); pp = 4 with 4-rank stages in 16 ranks sends from stage 1
    (ranks 4-7) to stage 2 (8-11) over the network, though stage 0 to 1 stays inside node 0."""
    cfg = load_config(SIGLIP_8B)
    dev = DEVICES["h100"]
    cm = CostModel(cfg, dev)
    lm = cfg.model.language
    rows, h, layers = cfg.training.seq_len, lm.hidden_size, lm.num_layers  # 1 sample, bf16
    inside = cm.module_costs("language", Degrees(0, 12, dp_shard=3, tp=4), samples=1)
    across = cm.module_costs("language", Degrees(2, 12, dp_shard=3, tp=4), samples=1)
    slower = (
        4 * layers * 3 / 4 * rows * h * 2 * (1 / dev.bandwidth(inter_node=True) - 1 / dev.bandwidth(inter_node=False))
    )
    assert across.forward_s - inside.forward_s == pytest.approx(slower)
    assert across.backward_s - inside.backward_s == pytest.approx(slower)
    pp4 = cm.module_costs("language", Degrees(0, 16, pp=4, dp_shard=4), samples=1)
    assert pp4.send_s == pytest.approx(rows * h * 2 / dev.bandwidth(inter_node=True) + dev.latency_s)


def _brute_force_best(cfg, world: int, device):
    """The fastest layout that validates among every layout the search's own candidates make, with no pruning: every
    encoder rank count, every fitting LM option, every fitting encoder degree and AC choice, colocated or not."""
    import itertools

    from mimo_titan.planning import search as S
    from mimo_titan.train.trainer import validate_job

    s = S._Searcher(cfg, world, device, CostModel(cfg, device, ranks_per_node=world))
    lang, gbs = s.lang, s.gbs

    def options(name, cands, M, mode, lm_d, sched, v):
        out = []
        for d in cands:
            if (gbs // M) % d.dp == 0:
                for ac in ("none", "full"):
                    flight = s.encoder_in_flight(d, mode, lm_d, M, sched, v)
                    samples = gbs // M // d.dp
                    out.append(
                        (d, ac, s.module_cost(name, d, samples, 1, ac), s.module_mem(name, d, samples, 1, ac, flight))
                    )
        return out

    layouts = []
    for n_enc in range(world):  # 0: colocated
        for _, lm_d, M, sched, v, lm_ac, lm_c in s.lm_options(n_enc, world - n_enc):
            lm_mem = s.module_mem(lang, lm_d, gbs // M // lm_d.dp, v, lm_ac, S._lm_flight(lm_d, M, sched, v))
            if n_enc:
                plans = [("batch", "streamed", a) for a in S._encoder_assignments(s, n_enc, s.costs)]
            else:
                whole = dict.fromkeys(s.encoders, (0, world))
                plans = [("batch", "whole_batch", whole)] + ([("inline", "inline", whole)] if lm_d.pp == 1 else [])
            for mode, sim_mode, assign in plans:
                per = []
                for name, (off, n) in assign.items():
                    cands = s.encoder_degrees(name, off, n, colocated=not n_enc)
                    if any(o != name and a == (off, n) for o, a in assign.items()):
                        cands = [d for d in cands if d.pp == 1]
                    per.append(options(name, cands, M, sim_mode, lm_d, sched, v))
                for combo in itertools.product(*per):
                    enc = dict(zip(s.encoders, combo))
                    ranges: dict[int, float] = {0: lm_mem} if not n_enc else {}
                    for d, _ac, _c, mem in combo:
                        ranges[d.rank_offset] = ranges.get(d.rank_offset, 0.0) + mem
                    if max([*ranges.values(), lm_mem]) + s.runtime > s.budget:
                        continue
                    mods = {**{n: enc[n][0] for n in s.encoders}, lang: lm_d}
                    acs = {**{n: enc[n][1] for n in s.encoders}, lang: lm_ac}
                    layouts.append(s.simulate(S.Layout("heterogeneous", mods, M, sched, v, mode, acs), lm_c, enc))
    for layout in sorted(layouts, key=lambda x: x.step_s):
        try:
            validate_job(config_from_dict(cfg.to_dict(), layout_overrides(layout)), world)
        except ValueError:
            continue
        return layout
    return None


@pytest.mark.parametrize(
    "config,world,overrides",
    [
        ("debug_noncolocated", 8, ["--model.language.tie_word_embeddings=true"]),
        ("debug_tp_cp", 6, []),
        ("debug_moe_ep", 16, []),
    ],
)
def test_the_pruned_search_finds_the_brute_force_optimum(config, world, overrides):
    """On small CPU worlds the search's pruning (rank splits, LM shortlist, one encoder choice per LM option) keeps the
    fastest layout that its own candidates make (an encoder priced without its pipeline's fill once took pp = 2 on
    2 ranks over dp_shard = 2 with one microbatch: 3-6 % slower)."""
    cfg = load_config(ROOT / f"train_configs/{config}.toml", overrides)
    device = device_spec("cpu")
    brute = _brute_force_best(cfg, world, device)
    assert brute is not None
    best = search_layouts(cfg, world, device, top=1).best
    assert best.step_s <= brute.step_s * (1 + 1e-9), (best.describe(), brute.describe())


def test_no_fit_of_modules_sharing_ranks_is_called_memory():
    """2 H100s, SigLIP + Qwen3-8B at 4K: the LM fits only alone (pp = 2 fills the ranks) and the encoder fits only
    alone, so no layout fits memory; the error says so (and how much the modules sharing a rank need), not that the
    DP sizes share no factor with a global batch of 16 (dp = 2 divides it)."""
    cfg = load_config(
        SIGLIP_8B, ["--training.seq_len=4096", "--training.global_batch_size=16", "--training.microbatches=1"]
    )
    with pytest.raises(ConfigError) as err:
        search_layouts(cfg, 2, DEVICES["h100"])
    budget = DEVICES["h100"].memory_budget_gib(2)
    m = re.search(
        r"fits memory: .*module 'vision'.* needs at least ([0-9.]+) GiB per rank, ([0-9.]+) GiB more", str(err.value)
    )
    assert m and "global_batch_size=16" not in str(err.value), str(err.value)
    assert float(m.group(1)) - budget == pytest.approx(float(m.group(2)), abs=0.11) and float(m.group(2)) > 0


def test_device_memory_is_what_the_driver_reports_in_gib():
    """memory_gib is the device's total as nvidia-smi reports it (MiB / 1024), for every GPU type alike: H100 SXM
    81,559 MiB, H200 143,771 MiB, A100 80 GB 81,920 MiB, B200 183,359 MiB (a "180 GB" B200 is 167.6 GiB only if
    its GB were 10^9 bytes)."""
    smi_mib = {"h100": 81559, "h200": 143771, "a100": 81920, "b200": 183359}
    for name, mib in smi_mib.items():
        assert DEVICES[name].memory_gib == pytest.approx(mib / 1024, rel=0.015), name


def test_a_bridge_to_language_ranks_in_other_nodes_is_inter_node():
    """An encoder on ranks 0-3 feeds a language model on ranks 4-63: both first ranks sit in node 0, but 56 of the 60
    LM ranks that receive the embeddings are in other nodes, so the bridge runs at the network's speed."""
    cfg = load_config(SIGLIP_8B)
    dev = DEVICES["h100"]
    cm = CostModel(cfg, dev)
    enc, lm = Degrees(0, 4, dp_shard=4), Degrees(4, 60, dp_shard=60)
    per_sample = cm.lm_tokens_per_sample("vision") * cfg.model.language.hidden_size * 2  # bf16
    expected = 60 / 4 * per_sample / dev.bandwidth(inter_node=True) + dev.latency_s  # each encoder rank sends 15
    assert cm.bridge_s("vision", enc, lm, samples_per_microbatch=60) == pytest.approx(expected)
    # inside one node (ranks 0-3 to 4-7) it stays NVLink
    near = cm.bridge_s("vision", enc, Degrees(4, 4, dp_shard=4), samples_per_microbatch=4)
    assert near == pytest.approx(per_sample / dev.bandwidth(inter_node=False) + dev.latency_s)
