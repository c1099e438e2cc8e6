"""The app's job runner: the time estimate follows each stage's own rate."""
import threading

from compression.pipeline import Stages
from ui import jobs
from ui.jobs import Job


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _job(monkeypatch) -> tuple[Job, Clock]:
    clock = Clock()
    monkeypatch.setattr(jobs.time, "monotonic", clock)
    monkeypatch.setattr(jobs, "LOST_AFTER", float("inf"))  # no page pulls here
    job = Job(lambda progress: None, threading.Event(), threading.Lock())
    return job, clock


def test_slow_first_stage_does_not_inflate_the_estimate(monkeypatch):
    """Self-chat text (weight 0.4) takes 300 s; the old whole-job extrapolation said ~18 min left at
    half of it. Per stage: 150 s left in "calibration text"; then the compression's own rate."""
    job, clock = _job(monkeypatch)
    stages = Stages(job, {"loading the model": 0.05, "calibration text": 0.4, "compressing": 1.0})
    stages.stage("loading the model")(1.0)
    text = stages.stage("calibration text")
    clock.now += 150
    text(0.5, "replies")
    seconds, stage = job.eta()
    assert stage == "calibration text" and abs(seconds - 150) < 1e-6
    text(1.0)
    compressing = stages.stage("compressing")
    clock.now += 10
    compressing(0.25, "block 8/30")
    seconds, stage = job.eta()
    assert stage is None and abs(seconds - 30) < 1e-6  # 10 s for a quarter: 30 s left, whole job


def test_estimate_waits_for_enough_progress(monkeypatch):
    job, clock = _job(monkeypatch)
    stages = Stages(job, {"a": 1.0, "b": 1.0})
    step = stages.stage("a")
    clock.now += 1
    step(0.5)
    assert job.eta() is None  # under 2 s into the stage
    clock.now += 5
    step(0.01)
    assert job.eta() is None  # under 3% of the stage


def test_without_stages_the_whole_job_rate_is_used(monkeypatch):
    job, clock = _job(monkeypatch)
    clock.now += 20
    job(0.5, "half")
    assert job.eta() == (20.0, None)
    assert "about 0:20 left" in jobs.progress_html(job, "Compress")


def test_progress_panel_names_the_stage(monkeypatch):
    job, clock = _job(monkeypatch)
    stages = Stages(job, {"calibration text": 1.0, "compressing": 1.0})
    step = stages.stage("calibration text")
    clock.now += 60
    step(0.25)
    assert "about 3:00 left in calibration text" in jobs.progress_html(job, "Compress")
