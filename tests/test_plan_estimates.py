"""``diffprobe plan``'s time estimates: pool, probe and cka get a number from a measured sample
of their real work, before their inputs exist and after; the extrapolation is the sample
times the counted pieces (checked against counts computed here, never against a clock)."""

from __future__ import annotations

import math
import re

import pytest

from helpers import invoke, synthetic_store, write_extract_workflow

DOWNSTREAM = """\
  - {name: pooled, stage: pool, input: ex, sizes: [1, 2]}
  - name: probe
    stage: probe
    input: pooled
    heads:
      - {name: linear, head: {kind: linear}}
      - {name: mlp, head: {kind: mlp, hidden: 32}}
    train: {epochs: 3}
  - {name: cka, stage: cka, selections: [{input: ex}], route: gram}
"""

TIME_ROW = re.compile(r"time \(est\.\)\s+[\d.]+ (us|ms|s|min|h) on \d+ worker")


def _sections(out: str) -> dict[str, str]:
    parts = re.split(r"^== (\w+) ", out, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_plan_before_extract_estimates_every_dask_stage(tmp_path):
    """The demo's shape of workflow, planned before anything ran: a time for pool, probe and cka."""
    wf = write_extract_workflow(tmp_path / "wf")
    wf.write_text(wf.read_text() + DOWNSTREAM)
    code, out = invoke("plan", wf)
    assert code == 0, out
    assert "not estimated" not in out, out
    sections = _sections(out)
    for stage in ("pooled", "probe", "cka"):
        assert "planned from its stage's shapes" in sections[stage], sections[stage]
        assert TIME_ROW.search(sections[stage]), sections[stage]
        assert "measured as" in sections[stage] and "median of" in sections[stage]
    # 30 digits, 20 % test: 24 on the train side, 2 of them validation
    assert "fit 22, validation 2, test 6" in sections["probe"]
    assert "9 x 9 (within), linear, gram" in sections["cka"]
    assert not (wf.parent / "out").exists()


@pytest.fixture
def written(tmp_path):
    """A workflow whose extract output is already a synthetic 512-sample store (block b, 16 x 4 x 4,
    timesteps 1 and 2, units of 64), with pool, probe and cka stages after it."""
    from pipeline.workflow.config import load_workflow
    from pipeline.workflow.runner import Runner
    from stages import STAGES

    wf = write_extract_workflow(tmp_path / "wf")
    wf.write_text(wf.read_text() + DOWNSTREAM.replace("input: pooled", "input: ex")
                  .replace("heads:", "batch_size: 32\n    heads:"))
    synthetic_store(wf.parent / "out" / "ex.zarr")
    runner = Runner(load_workflow(wf, STAGES), progress=False)

    def estimate(name):
        entry = runner.wf.stage(name)
        return runner.stages[name].estimate(entry.config, runner.context(entry))

    return wf, estimate


def _is_sample_times_count(e):
    assert e.seconds == pytest.approx(e.sample.seconds * e.scale * e.count / e.workers)
    assert e.sample.timed >= 1 and e.sample.seconds > 0


def test_probe_estimate_counts_the_steps_a_grid_trains(written):
    wf, estimate = written
    estimates = estimate("probe")
    # 512 usable samples: test round(0.2 * 512) = 102; validation round(0.1 * 410) = 41; fit 369
    steps = 3 * math.ceil(369 / 32) * 2  # epochs x steps per epoch x timesteps
    evals = 3 * math.ceil(41 / 369) + math.ceil(102 / 369)  # per timestep, eval batch min(512, 369)
    kinds = {(e.what.split(" of ")[0], e.what.split("'")[1]): e for e in estimates}
    assert set(kinds) == {("step", "linear"), ("step", "mlp"), ("eval", "linear"), ("eval", "mlp")}
    for (kind, _), e in kinds.items():
        assert e.count == (steps if kind == "step" else evals * 2)
        assert "(16, 4, 4)" in e.what and e.workers == 1  # one (block, pool) group: one task
        _is_sample_times_count(e)
    code, out = invoke("plan", wf)
    assert code == 0, out
    section = _sections(out)["probe"]
    assert "fit 369, validation 41, test 102" in section and TIME_ROW.search(section)


def test_pool_estimate_is_one_unit_times_the_units(written):
    _, estimate = written
    (e,) = estimate("pooled")
    assert e.count == 8 and e.scale == 1.0  # 512 samples in units of 64, a whole unit timed
    assert e.what == "read + pool of 64 stored sample(s)" and e.workers == 2
    _is_sample_times_count(e)


def test_cka_estimate_is_grams_and_pairs(written):
    _, estimate = written
    by_kind = {e.what.split(" of ")[0].split(" ")[-1]: e for e in estimate("cka")}
    # within one store, 2 timesteps of one block: 2 Grams of 512 x 256, one pair (the diagonal is 1)
    assert by_kind["Gram"].count == 2 and by_kind["Gram"].scale == 1.0
    assert by_kind["product"].count == 1
    for e in by_kind.values():
        _is_sample_times_count(e)


def test_cka_pieces_larger_than_the_sample_scale_by_their_flops(monkeypatch):
    from pipeline.cka import estimate as cka_estimate

    monkeypatch.setattr(cka_estimate, "SAMPLE_N", 64)
    monkeypatch.setattr(cka_estimate, "SAMPLE_D", 32)
    monkeypatch.setattr(cka_estimate, "SAMPLE_D_FEATURE", 16)
    gram, dot = cka_estimate.cka_estimates("gram-cache", "linear", [100, 100, 100], [(0, 1), (0, 2), (1, 2)], 1000)
    assert gram.what == "Gram of 64 x 32" and gram.count == 3
    assert gram.scale == pytest.approx(1000 ** 2 * 100 / (64 ** 2 * 32))
    assert dot.count == 3 and dot.scale == pytest.approx((1000 / 64) ** 2)
    # stream: 1000 samples x 40 and 60 features take the feature route (co-moments)
    (pair,) = cka_estimate.cka_estimates("stream", "linear", [40, 60], [(0, 1)], 1000)
    assert pair.what == "feature-route pair of 64 x (16, 16)"
    assert pair.scale == pytest.approx(1000 * 100 ** 2 / (64 * 32 ** 2))


def test_measure_warms_up_takes_the_median_and_keeps_to_its_time_box(monkeypatch):
    """A fake clock: each call advances it by the next duration; no real time is measured."""
    from pipeline import estimate

    now = [0.0]
    durations = iter([10.0, 1.0, 3.0, 2.0, 100.0])
    monkeypatch.setattr(estimate.time, "perf_counter", lambda: now[0])

    def call():
        now[0] += next(durations)

    sample = estimate.measure(call, warmup=1, repeats=3, budget_s=50.0, min_timing_s=0.0)
    assert (sample.warmup, sample.timed, sample.seconds, sample.spread) == (1, 3, 2.0, 3.0)
    durations = iter([10.0, 1.0, 3.0, 2.0])
    now[0] = 0.0
    boxed = estimate.measure(call, warmup=1, repeats=3, budget_s=12.0, min_timing_s=0.0)
    assert (boxed.timed, boxed.seconds) == (2, 2.0)  # 10 + 1 + 3 > 12: the third timing is skipped
    durations = iter([0.001] * 50)
    now[0] = 0.0
    batched = estimate.measure(call, warmup=1, repeats=2, budget_s=1.0, min_timing_s=0.01)
    assert batched.timed == 2 and batched.seconds == pytest.approx(0.001)  # 10 calls per timing


def test_forward_flops_on_meta_equal_a_real_forward_and_shrink_with_truncation(tiny_unet_json):
    """Before the first attention the meta count equals a real forward's; after it the meta
    count is larger (CPU's fused attention kernel is not one FlopCounterMode counts)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.hooks import capture, run_truncated
    from pipeline.models import ModelConfig, load_model

    adapter = load_model(ModelConfig(config=str(tiny_unet_json), null_class=10))
    real = {}
    for block in ("down_blocks.0", "up_blocks.0"):
        counter = FlopCounterMode(display=False)
        x = torch.zeros(1, 1, 16, 16)
        cond = adapter.dry_condition(1)
        with torch.no_grad(), counter, capture(adapter.module, [block], stop_after=block):
            run_truncated(lambda: adapter.run(x, torch.zeros(1, dtype=torch.long), cond))
        real[block] = counter.get_total_flops()
    assert adapter.forward_flops("down_blocks.0") == real["down_blocks.0"] > 0
    assert adapter.forward_flops("up_blocks.0") >= real["up_blocks.0"] > real["down_blocks.0"]
