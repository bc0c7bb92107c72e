"""The console output of training: the epoch line's throughput and the stage bars, on a
clock the tests set."""

import pytest

from protomask_jax import logs


def _clock(*times):
    return iter(times).__next__


def test_epoch_line_leaves_the_first_step_out_of_images_per_second(capsys):
    # 4 steps of 8 images: the first ends at 110 s (10 s, compiling), the epoch at 112 s.
    # The 3 later steps trained 24 images in 2 s: 12 images/s (all 32 in 12 s would say 2.7).
    bar = logs.ProgressBar("joint", steps_per_epoch=4, global_batch=8, clock=_clock(100, 110, 112))
    bar.start_epoch(3)
    for _ in range(4):
        bar.advance()
    bar.set_metrics({"loss": 1.25, "accuracy": 0.5})
    bar.end_epoch()
    assert capsys.readouterr().out == (
        "joint epoch 3 done in 12.0 s: 12 images/s after the first step (10.0 s), "
        "acc=0.500, loss=1.250\n"
    )


def test_epoch_line_of_a_resumed_epoch_counts_only_its_steps(capsys):
    # Resumed after 2 of 4 steps: 2 steps trained here, the second's 16 images in 0.5 s.
    bar = logs.ProgressBar("finetune", 4, 16, clock=_clock(0.0, 4.0, 4.5))
    bar.start_epoch(7, done=2)
    bar.advance()
    bar.advance()
    bar.end_epoch()
    assert capsys.readouterr().out == (
        "finetune epoch 7 done in 4.5 s: 32 images/s after the first step (4.0 s)\n"
    )


def test_epoch_line_of_one_step_says_its_rate_includes_the_start_up():
    line = logs.epoch_line("warmup", 0, 16, first_step_s=7.5, rest_s=0.5, images_per_step=16)
    assert line == "warmup epoch 0 done in 8.0 s (one step, 2 images/s including its start-up)"


def test_stage_progress_counts_images_not_filler_and_prints_its_line(capsys):
    # 12 images in batches of 8: the second batch holds 4 images and 4 filler rows.
    batches = [{"weight": [1] * 8}, {"weight": [1] * 4 + [0] * 4}]
    with logs.StageProgress("push, training images", 12, clock=_clock(50.0, 52.5)) as stage:
        seen = list(stage.track(batches))
        assert stage._bar.n == 12
    assert seen == batches
    captured = capsys.readouterr()
    assert captured.out == "push, training images: 12 images in 2.5 s\n"
    assert "push, training images (12 images)" in captured.err  # the bar's label


def test_stage_progress_prints_no_line_for_a_stage_that_failed(capsys):
    with pytest.raises(KeyboardInterrupt), logs.StageProgress("test, final", 8) as stage:
        for _ in stage.track([{"weight": [1] * 8}]):
            raise KeyboardInterrupt
    assert capsys.readouterr().out == ""
