"""The training dashboard: text throttling, summaries, the widget without a frontend, and that a
broken display never reaches the training loop. CPU only; time is a fake clock throughout."""
import io
import math

import pytest

import gemmatune.training.dashboard as training_dashboard
from gemmatune.training.dashboard import TrainingSummary, ema_update, gpu_memory_stats, make_dashboard
from tests.helpers import FakeClock, widget_dashboard


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv("GEMMATUNE_DASHBOARD", raising=False)


def run(dash, clock, n, dt=0.25, tokens=100):
    """n steps, dt seconds apart (0.25 is exact in binary, so throttling is deterministic)."""
    for step in range(1, n + 1):
        clock.t += dt
        dash.update(step, 3.0 - 0.1 * step, 2e-4, tokens, grad_norm=1.5)


def test_ema_update():
    values, ema = [4.0, 2.0, 1.0, 1.0], None
    out = []
    for x in values:
        ema = ema_update(ema, x, 0.5)
        out.append(ema)
    assert out == [4.0, 3.0, 2.0, 1.5]
    assert ema_update(None, 7.0, 0.99) == 7.0
    assert ema_update(1.0, 2.0, 0.9) == pytest.approx(1.1)


def test_text_mode_throttles_lines_and_prints_summary():
    clock, out = FakeClock(), io.StringIO()
    dash = make_dashboard(10, mode="text", clock=clock, stream=out, smoothing=0.5)
    run(dash, clock, 10)
    dash.note("checkpoint saved to /tmp/x")
    clock.t += 0.25
    summary = dash.close()
    lines = out.getvalue().splitlines()
    steps = [ln.split("|")[0].strip() for ln in lines if ln.startswith("step ")]
    # first step, then at most one line a second (t=0.25, 1.25, 2.25), and always the last step
    assert steps == ["step 1/10", "step 5/10", "step 9/10", "step 10/10"]
    first = next(ln for ln in lines if ln.startswith("step 1/10"))
    assert "loss 2.900 (avg 2.900)" in first and "lr 2.0e-04" in first and "400 tok/s" in first
    assert "grad 1.50" in first and "ETA 0:02" in first  # 9 steps left at 0.25 s each
    assert "[gemmatune] checkpoint saved to /tmp/x" in lines
    assert summary == TrainingSummary(steps=10, total_steps=10, wall_time_s=2.75, tokens_trained=1000,
                                      tokens_per_s=pytest.approx(1000 / 2.75), first_loss=pytest.approx(2.9),
                                      last_loss=pytest.approx(2.0), peak_vram_allocated_gib=None,
                                      peak_vram_reserved_gib=None, status="done")
    text = out.getvalue()
    assert str(summary) in text
    assert "10 / 10" in text and "1,000 (364 tok/s)" in text and "2.9000 → 2.0000" in text
    assert dash.close("failed") is summary  # closing twice is harmless
    dash.update(11, 1.0, 1e-4, 5)  # and updates after close are ignored
    assert summary.steps == 10


def test_ema_in_dashboard_skips_non_finite_losses():
    clock = FakeClock()
    dash = make_dashboard(4, mode="off", clock=clock, smoothing=0.5)
    for step, loss in enumerate([2.0, float("nan"), 1.0, 0.0], start=1):
        clock.t += 1
        dash.update(step, loss, 1e-4, 10)
    assert dash.ema == pytest.approx(0.75)  # 2 -> (nan skipped) -> 1.5 -> 0.75
    assert dash.first_loss == 2.0 and dash.last_loss == 0.0


def test_tokens_per_s_and_eta_use_recent_steps_and_survive_resume():
    clock = FakeClock()
    dash = make_dashboard(200, mode="off", clock=clock)
    clock.t = 30.0  # a slow first step (compilation, warm-up) ...
    dash.update(101, 2.0, 1e-4, 1000)  # ... of a run resumed at step 100
    for step in range(102, 121):
        clock.t += 0.5
        dash.update(step, 2.0, 1e-4, 1000)
    assert dash.tokens_per_s() == pytest.approx(2000)  # the last 10 steps, not the warm-up
    assert dash.eta_s() == pytest.approx(80 * 0.5)


def test_off_mode_is_silent_and_still_summarises(capsys):
    clock = FakeClock()
    dash = make_dashboard(5, mode="off", clock=clock)
    run(dash, clock, 3, dt=1.0, tokens=7)
    dash.note("ignored")
    summary = dash.close("interrupted")
    assert capsys.readouterr().out == ""
    assert (summary.steps, summary.total_steps, summary.tokens_trained, summary.status) == (3, 5, 21, "interrupted")
    assert summary.first_loss == pytest.approx(2.9) and summary.last_loss == pytest.approx(2.7)
    assert summary.wall_time_s == 3.0 and summary.tokens_per_s == 7.0


def test_mode_selection(monkeypatch, capsys):
    assert isinstance(make_dashboard(3).view, training_dashboard._TextView)  # auto outside a kernel: text
    monkeypatch.setenv("GEMMATUNE_DASHBOARD", "off")
    assert isinstance(make_dashboard(3, mode="text").view, training_dashboard._NullView)  # the variable wins
    with pytest.raises(ValueError):
        monkeypatch.delenv("GEMMATUNE_DASHBOARD")
        make_dashboard(3, mode="fancy")


def test_memory_stats_on_cpu():
    stats = gpu_memory_stats()
    if not stats.cuda:
        assert stats.device == "CPU" and stats.allocated_gib is None and stats.total_gib is None


def test_widget_builds_updates_and_leaves_static_outputs():
    clock = FakeClock()
    dash, shown, handle = widget_dashboard(clock)
    view = dash.view
    assert isinstance(view, training_dashboard._WidgetView) and shown == [view.box]
    run(dash, clock, 30, dt=0.1)
    dash.note("checkpoint <saved>")
    assert view.bar.value == 30 and "30" in view.progress_text.value
    assert bytes(view.plot.value[:4]) == b"\x89PNG"
    assert "checkpoint &lt;saved&gt;" in view.log.value
    assert view._smooth.get_xdata()[-1] == 30  # the final step is always drawn
    summary = dash.close()
    static, kwargs = handle.updates[0]  # the live widget is replaced in place ...
    assert kwargs == {"raw": True} and "2.9000 → " in static["text/html"] and static["text/plain"] == str(summary)
    assert "image/png" in shown[-1]  # ... and the final figure follows as a plain PNG output
    assert isinstance(dash.view, training_dashboard._WidgetView)  # nothing fell back


def test_widget_redraws_at_most_twice_a_second(monkeypatch):
    drawn = []

    def fake_render(self, d):
        drawn.append(d.clock())
        return b"\x89PNG fake"

    monkeypatch.setattr(training_dashboard._WidgetView, "render_png", fake_render)
    clock = FakeClock()
    dash, _, _ = widget_dashboard(clock, total=40)
    run(dash, clock, 40, dt=0.125)  # 8 steps a second
    assert drawn == [0.125 + 0.5 * k for k in range(10)] + [5.0]  # every 4th step, plus the last


def test_update_never_raises_when_rendering_fails(monkeypatch, capsys):
    def broken(self, d):
        raise RuntimeError("frontend gone")

    monkeypatch.setattr(training_dashboard._WidgetView, "render_png", broken)
    clock = FakeClock()
    dash, _, _ = widget_dashboard(clock, total=5)
    run(dash, clock, 5, dt=2.0)
    summary = dash.close()
    out = capsys.readouterr().out
    assert isinstance(dash.view, training_dashboard._TextView)
    assert "frontend gone" in out and "continuing with text output" in out
    assert "step 1/5" in out and "step 5/5" in out and str(summary) in out  # the failed step still shows
    assert summary.steps == 5 and summary.tokens_trained == 500


def test_nothing_raises_when_even_text_output_fails(capsys):
    class Broken(io.StringIO):
        def write(self, s):
            raise OSError("stdout closed")

    clock = FakeClock()
    dash = make_dashboard(3, mode="text", clock=clock, stream=Broken())
    run(dash, clock, 3)
    dash.update(4, None, "x", 1)  # nonsense values are reported, not raised
    dash.note("still fine")
    assert dash.close().steps == 3 and isinstance(dash.view, training_dashboard._NullView)
    assert "bad update() values" in capsys.readouterr().err


def test_summary_str_is_a_table():
    s = TrainingSummary(60, 60, 83.2, 123456, 1483.9, 2.91, 1.2, 3.12, 4.0, "done")
    text = str(s)
    assert text.splitlines()[0] == "training summary"
    assert "wall time          1:23" in text
    assert "123,456 (1,484 tok/s)" in text and "3.12 GiB allocated, 4.00 GiB reserved" in text
    assert math.isclose(s.tokens_per_s, 1483.9)
