"""The small metric components: the sample log's resume truncation and the discriminator health check."""

from __future__ import annotations

import logging

from electra_scale.engine.metrics import DiscriminatorHealth, SampleLog, read_samples


def test_sample_log_drops_steps_past_the_resumed_one(tmp_path):
    ranks = [SampleLog(tmp_path, rank=r, world_size=2, start_step=0) for r in (0, 1)]
    for step in (1, 2, 3):
        for r, log in enumerate(ranks):
            log.log(step, [step * 10 + r])
    for log in ranks:
        log.close()  # "crashed" after step 3; the checkpoint was at step 2; resumed on 1 rank
    one = SampleLog(tmp_path, rank=0, world_size=1, start_step=2)
    one.log(3, [30, 31])
    one.close()
    assert read_samples(tmp_path) == {1: [10, 11], 2: [20, 21], 3: [30, 31]}


def test_health_warns_once_when_recall_stays_at_zero(caplog):
    health = DiscriminatorHealth(warmup_steps=10, total_steps=1000)
    with caplog.at_level(logging.WARNING, logger="electra_scale"):
        health.check(50, {"disc_recall": 0.0})  # too early (warmup x2 and 10% of the run: 100)
        assert not caplog.records
        health.check(100, {"disc_recall": 0.2})  # learning: fine
        health.check(110, {"disc_recall": 0.0})
        health.check(120, {"disc_recall": 0.0})
        health.check(130, {"gen_loss": 1.0})  # an MLM record has no recall
    assert len(caplog.records) == 1
    assert "recall on replaced tokens is 0.000 at step 110" in caplog.text and "generator" in caplog.text
