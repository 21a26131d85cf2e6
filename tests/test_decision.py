"""The decision rule chosen on validation (``clinseg.pipelines.engine.decision``): the threshold and the component
filter it picks where they help, the plain rule where they do not, and the rule applied the same way on any
image size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import AsDiscrete

from clinseg.pipelines.engine.decision import (
    PLAIN_RULE,
    ApplyDecisionRuled,
    apply_rule,
    choose_rule,
    remove_small_components,
    rule_of_record,
)


def case(seed: int, vessel_prob: float, speckle_prob: float, size: int = 96):
    """A reference of vertical lines that the 'network' calls at ``vessel_prob``, background at 0.1, and isolated
    3-pixel speckles at ``speckle_prob``; the valid region is a disc."""
    rng = np.random.default_rng(seed)
    reference = np.zeros((size, size), bool)
    for column in rng.choice(np.arange(4, size - 4), 6, replace=False):
        reference[8:-8, column : column + 2] = True
    probability = np.where(reference, vessel_prob, 0.1).astype(np.float32)
    for row, column in rng.integers(4, size - 4, (15, 2)):
        if not reference[row - 2 : row + 3, column - 2 : column + 3].any():
            probability[row, column : column + 3] = speckle_prob
    yy, xx = np.mgrid[:size, :size]
    valid = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2 - 1) ** 2
    return probability + rng.uniform(0, 0.01, probability.shape).astype(np.float32), reference, valid


def test_an_underconfident_network_gets_a_lower_threshold_and_speckles_removed():
    cases = [case(seed, vessel_prob=0.42, speckle_prob=0.6) for seed in range(4)]
    rule = choose_rule(cases)
    assert rule["threshold"] < 0.42 and rule["min_component_fraction"] > 0
    assert rule["validation_f1"] > rule["plain_validation_f1"] + 0.2 and rule["cases"] == 4
    # the rule reproduces its score on the same cases
    scores = [apply_rule(p, rule, v) for p, _, v in cases]
    assert all(not s[~v].any() for s, (_, _, v) in zip(scores, cases, strict=True))


def test_a_well_separated_network_keeps_the_plain_rule():
    cases = [case(seed, vessel_prob=0.95, speckle_prob=0.1) for seed in range(3)]
    rule = choose_rule(cases)
    assert {k: rule[k] for k in PLAIN_RULE} == PLAIN_RULE
    assert rule["validation_f1"] == rule["plain_validation_f1"] > 0.99
    found = rule.get("best_candidate")
    assert found is None or found["validation_f1"] - rule["plain_validation_f1"] < 0.002
    # a gain under min_gain is not kept, but what was found is said
    underconfident = [case(seed, vessel_prob=0.42, speckle_prob=0.6) for seed in range(2)]
    cautious = choose_rule(underconfident, min_gain=0.99)
    assert {k: cautious[k] for k in PLAIN_RULE} == PLAIN_RULE
    assert cautious["best_candidate"]["validation_f1"] > cautious["plain_validation_f1"] + 0.2
    with pytest.raises(ValueError, match="no validation cases"):
        choose_rule([])


def test_the_plain_rule_is_argmax_and_the_transform_keeps_the_meta():
    logits = torch.randn(2, 40, 50)
    prob = MetaTensor(torch.softmax(logits, 0), affine=torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0])))
    out = ApplyDecisionRuled("pred")({"pred": prob})["pred"]
    assert torch.equal(out, AsDiscrete(argmax=True)(prob))
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, prob.affine)
    onehot = ApplyDecisionRuled("pred", rule={"threshold": 0.3, "min_component_fraction": 0}, to_onehot=True)(
        {"pred": prob}
    )["pred"]
    assert onehot.shape == (2, 40, 50) and torch.equal(onehot[1] > 0, prob[1] > 0.3)
    assert torch.equal(onehot.sum(0), torch.ones(40, 50))
    with pytest.raises(ValueError, match="two channels"):
        ApplyDecisionRuled("pred")({"pred": torch.rand(3, 4, 4)})


def test_the_component_filter_means_the_same_on_a_larger_photograph():
    probability, _, valid = case(0, vessel_prob=0.9, speckle_prob=0.8)
    rule = {"threshold": 0.5, "min_component_fraction": 5 / valid.sum()}  # under 5 pixels of this field
    small = apply_rule(probability, rule, valid)
    assert small.sum() < apply_rule(probability, {**rule, "min_component_fraction": 0}, valid).sum()
    # three times larger each way (a CHASE photograph against a DRIVE one): speckles of 27 pixels, field 9 x larger
    large = apply_rule(np.kron(probability, np.ones((3, 3))), rule, np.kron(valid, np.ones((3, 3))).astype(bool))
    assert np.array_equal(large, np.kron(small, np.ones((3, 3))).astype(bool))


def test_components_are_counted_with_full_connectivity():
    mask = np.zeros((10, 10), bool)
    mask[2, 2] = mask[3, 3] = mask[4, 4] = True  # one diagonal component of 3
    assert remove_small_components(mask, 3).sum() == 3 and remove_small_components(mask, 4).sum() == 0


def test_a_record_without_a_rule_gives_the_plain_rule():
    assert rule_of_record(None) == PLAIN_RULE and rule_of_record({"decision_rule": None}) == PLAIN_RULE
    stored = {"threshold": 0.4, "min_component_fraction": 1e-4, "validation_f1": 0.8, "cases": 5}
    assert rule_of_record({"decision_rule": stored}) == {"threshold": 0.4, "min_component_fraction": 1e-4}


def test_the_best_epochs_cases_survive_a_checkpoint_and_choose_the_same_rule(caplog, monkeypatch):
    """A resumed training chooses its rule on the cases the latest checkpoint kept (16-bit probabilities, a bit
    per pixel for the reference and the valid region; loaded with weights only): the same rule as before. Cases
    larger than the limit are not kept, said once in the log."""
    import io

    from ignite.engine import Engine

    from clinseg.pipelines.engine import decision

    before, after = Engine(lambda engine, batch: None), Engine(lambda engine, batch: None)
    cases = [case(seed, vessel_prob=0.42, speckle_prob=0.6, size=97) for seed in range(3)]
    before.state.decision_cases = [(p.astype(np.float16), r, v) for p, r, v in cases]
    before.state.decision_cases_epoch = 7
    buffer = io.BytesIO()
    torch.save({"progress": {"decision_cases": decision.cases_state(before)}}, buffer)
    buffer.seek(0)
    decision.restore_cases(after, torch.load(buffer, weights_only=True)["progress"]["decision_cases"])
    assert after.state.decision_cases_epoch == 7
    for (p0, r0, v0), (p1, r1, v1) in zip(before.state.decision_cases, after.state.decision_cases, strict=True):
        np.testing.assert_array_equal(p0, p1)
        assert r1.dtype == v1.dtype == bool and (r0 == r1).all() and (v0 == v1).all()
    assert decision.rule_from(after) == decision.rule_from(before)
    assert decision.rule_of_epoch(after, 7) is not None and decision.rule_of_epoch(after, 6) is None

    monkeypatch.setattr(decision, "MAX_CHECKPOINT_CASES_BYTES", 1000)
    assert decision.cases_state(before) is None and decision.cases_state(before) is None
    assert sum("kept in the latest checkpoint" in r.getMessage() for r in caplog.records) == 1
