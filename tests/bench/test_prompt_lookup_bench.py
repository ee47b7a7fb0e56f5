"""benchmarks/prompt_lookup.py: its projection arithmetic, and the cost of runs measured on a
real bundle (the timed parts run on the benchmark checkpoint by hand)."""

from __future__ import annotations

import pytest


def test_the_projection_prices_each_run_and_the_steps_no_run_covered(lookup_bench):
    cost = {1: 10.0, 2: 12.0, 3: 16.0, 5: 24.0}
    # 20 tokens: 19 feeds without drafting. Runs: 2 drafts, both confirmed (covers 3 feeds, costs S=3);
    # 4 drafts, 1 confirmed (covers 2, costs S=5); 1 draft confirmed that made the last token (covers 1, S=2)
    row = {"tokens": 20, "runs": [(2, 2, False), (4, 1, False), (1, 1, True)]}
    plain_steps = 19 - (3 + 2 + 1)
    expected = 19 * 10.0 / (16.0 + 24.0 + 12.0 + plain_steps * 10.0)
    assert lookup_bench.projection(row, cost) == pytest.approx(expected)
    assert lookup_bench.projection({"tokens": 20, "runs": []}, cost) == pytest.approx(1.0)
    # the first token, then one run of 3 drafts, all confirmed, the last of them the last token: 3 feeds
    # covered by one run of 4 ids, priced between the measured 3 and 5
    assert lookup_bench.projection({"tokens": 4, "runs": [(3, 3, True)]}, cost) == pytest.approx(30.0 / 20.0)


def test_the_prompts_repeat_their_context_or_do_not(lookup_bench):
    prompts = lookup_bench.prompts()
    assert set(prompts) == {"restated function", "repeated block", "continue a file", "new code"}
    assert prompts["restated function"].count("def softmax") == 2


def test_a_runs_cost_is_measured_against_a_step(lookup_bench, tiny_bundle):
    cost = lookup_bench.cost_table(tiny_bundle, [2, 3], rounds=2, threads=1, context=16)
    assert set(cost) == {1, 2, 3} and all(v > 0 for v in cost.values())
