"""What a person sees: a progress bar redrawn in place on a terminal, no broken-image icon before the
first plot, library loading bars as text, a before/after table that shows empty answers as such."""
import io

import pytest
from PIL import Image

from gemmatune.generation.evaluate import image_table
from gemmatune.training import dashboard as training_dashboard
from tests.helpers import FakeClock, widget_dashboard


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv("GEMMATUNE_DASHBOARD", raising=False)


def test_on_a_terminal_the_progress_is_one_bar_redrawn_in_place_with_an_eta():
    clock, terminal = FakeClock(), Terminal()
    dash = training_dashboard.make_dashboard(50, mode="text", clock=clock, stream=terminal)
    for step in range(1, 21):
        clock.t += 2.0
        dash.update(step, 3.0 - step * 0.05, 2e-4, 1000)
    dash.note("checkpoint saved to run1/checkpoint-20")
    dash.close("done")
    text = terminal.getvalue()
    bar = text.split("training summary")[0]
    assert "\r" in bar and bar.count("\n") <= 3  # redrawn, not one line per step
    assert "20/50" in bar and "ETA 1:00" in bar and "loss 2.000" in bar
    assert "checkpoint saved to run1/checkpoint-20" in text and "training summary" in text


def test_in_a_log_file_the_progress_stays_lines():
    clock, log = FakeClock(), io.StringIO()
    dash = training_dashboard.make_dashboard(5, mode="text", clock=clock, stream=log)
    for step in range(1, 6):
        clock.t += 2.0
        dash.update(step, 1.0, 2e-4, 100)
    assert "\r" not in log.getvalue() and log.getvalue().count("step ") == 5


def test_the_loss_plot_is_hidden_until_it_has_a_picture():
    """An empty image widget is a broken-image icon in JupyterLab for the first seconds of every run."""
    clock = FakeClock()
    dash, shown, handle = widget_dashboard(clock)
    plot = dash.view.plot
    assert plot.layout.display == "none" and not plot.value
    clock.t += 1.0
    dash.update(1, 2.5, 2e-4, 100)
    assert plot.value[:8] == b"\x89PNG\r\n\x1a\n" and plot.layout.display != "none"


def test_transformers_loading_bars_become_text(capsys):
    from transformers.utils import logging as transformers_logging

    previous = None
    try:
        training_dashboard.text_loading_bars()
        previous = transformers_logging._tqdm_hook
        bar = transformers_logging.tqdm(range(3), desc="Loading weights")
        list(bar)
        bar.close()
    finally:
        transformers_logging.set_tqdm_hook(None)
    assert previous is training_dashboard.text_progress_bar
    assert type(bar).__module__ == "tqdm.std"  # not tqdm.notebook's widget
    assert "Loading weights" in capsys.readouterr().out


def test_the_before_after_table_shows_empty_answers_and_aligns_headers_with_cells():
    images = [Image.new("RGB", (20, 10), "white")] * 2
    table = image_table(images, {"reference": ["x^2", "y"], "before": ["", "  "], "after": ["x^2", None]}).data
    assert table.count("(empty answer)") == 3 and "<code></code>" not in table
    headers = table.split("<tr>")[1]
    assert headers.count("text-align:left;vertical-align:top") == 4  # image, reference, before, after
    assert table.count("<td style='text-align:left;vertical-align:top") == 8
