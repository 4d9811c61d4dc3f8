"""Live training dashboard: a widget in Jupyter, progress lines elsewhere, nothing when off.

    dash = make_dashboard(total_steps, title="gemmatune", mode="auto")  # auto|widget|text|off
    dash.update(step, loss, lr, tokens, grad_norm=None, ranks=None, extra=None,  # once per optimizer step
                useful_tokens=None, computed_tokens=None)  # tokens of rows / all computed (padding = the rest)
    dash.note("checkpoint saved to ...")
    summary = dash.close("done")                          # done|interrupted|failed -> TrainingSummary

The trainer never branches on where it runs (style habit 11). `Dashboard` keeps the numbers and
hands them to one view: `_WidgetView` (ipywidgets + matplotlib; "auto" picks it inside a Jupyter
kernel), `_TextView` (a progress bar redrawn in place on a terminal, throttled lines in a log file
or a pipe) or `_NullView` ("off"). A view that raises is swapped for
the text view, so display problems never reach the training loop. GEMMATUNE_DASHBOARD=widget|text|off
overrides `mode`. At close the widget is replaced in place (its display handle) by a static HTML
summary and a PNG of the final figure: an .ipynb keeps those, not widget state, so a notebook run
headless and saved still shows the loss curve.

With several processes (torchrun) rank 0 draws it and `ranks` carries every rank's (tokens, GiB)
of the step: the views add each rank's tokens/s and memory (peak GPU memory allocated, or RSS on
a CPU). The other ranks get `silent_dashboard`.

Other loops (GRPO) plot another value than the loss (`value_name="reward"`) and pass `extra`, a
dict of more per-step numbers ({"KL": 0.01, "rollout tok/s": 2100.0}), which the text line and
the widget's tiles show as they come.

`text_loading_bars()` makes transformers' own progress bars (loading weights) text: in a saved
notebook a widget shows "Error displaying widget: model not found" once the kernel that drew it
is gone, where text stays readable.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass

GIB = 1024**3
MODES = ("auto", "widget", "text", "off")
INK, MUTED, GRID = "#111827", "#6b7280", "#e5e7eb"  # figure colours; HTML text inherits the theme's
ACCENT, ACCENT_LIGHT, RESERVED, PEAK = "#4f46e5", "#b4bcf7", "#c7d2fe", "#dc2626"
STATUS_COLORS = {"running": "#2563eb", "done": "#16a34a", "interrupted": "#d97706", "failed": "#dc2626"}
FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif"
PANEL = "background:rgba(127,127,127,.07);border:1px solid rgba(127,127,127,.25);border-radius:8px"


@dataclass
class MemoryStats:
    """Accelerator memory in GiB (None without CUDA); RSS of this process on CPU runs."""
    cuda: bool
    device: str
    allocated_gib: float | None = None
    reserved_gib: float | None = None
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    total_gib: float | None = None
    rss_gib: float | None = None  # current RSS (psutil) or peak RSS (resource), when readable


def gpu_memory_stats(device: int = 0) -> MemoryStats:
    """CUDA memory counters of `device`; never raises. Does not import torch: if nothing imported
    it, this process holds no CUDA memory."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            c, props = torch.cuda, torch.cuda.get_device_properties(device)
            return MemoryStats(True, props.name, c.memory_allocated(device) / GIB,
                               c.memory_reserved(device) / GIB, c.max_memory_allocated(device) / GIB,
                               c.max_memory_reserved(device) / GIB, props.total_memory / GIB)
    except Exception:
        pass
    rss = None
    try:
        import psutil
        rss = psutil.Process().memory_info().rss / GIB
    except Exception:
        try:
            import resource  # peak RSS: KiB on Linux, bytes on macOS
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (GIB if sys.platform == "darwin" else 2**20)
        except Exception:
            pass
    return MemoryStats(False, "CPU", rss_gib=rss)


def ema_update(prev: float | None, x: float, beta: float) -> float:
    """Exponential moving average beta*prev + (1-beta)*x; the first value starts the average."""
    return x if prev is None else beta * prev + (1.0 - beta) * x


def _hms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    h, s = divmod(int(round(seconds)), 3600)
    return f"{h}:{s // 60:02d}:{s % 60:02d}" if h else f"{s // 60}:{s % 60:02d}"


def _gib(x: float) -> str:
    return f"{x:.1f} GiB" if x >= 1 else f"{x * 1024:.0f} MiB"


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


@dataclass
class TrainingSummary:
    steps: int
    total_steps: int
    wall_time_s: float  # from make_dashboard() to close()
    tokens_trained: int
    tokens_per_s: float  # tokens_trained / wall_time_s
    first_loss: float | None
    last_loss: float | None
    peak_vram_allocated_gib: float | None
    peak_vram_reserved_gib: float | None
    status: str
    per_rank: list | None = None  # several processes: [(tokens/s, GiB)] of each rank
    value_name: str = "loss"      # what first_loss / last_loss hold ("reward" for GRPO)
    useful_tokens_per_s: float | None = None  # tokens of rows (prompts, answers, media) per second
    padding_fraction: float | None = None     # of the tokens computed, the share that was padding

    def rows(self) -> list[tuple[str, str]]:
        vram = "n/a (no CUDA)" if self.peak_vram_allocated_gib is None else (
            f"{self.peak_vram_allocated_gib:.2f} GiB allocated, {_f(self.peak_vram_reserved_gib, '.2f')} GiB reserved")
        return [("status", self.status), ("steps", f"{self.steps:,} / {self.total_steps:,}"),
                ("wall time", _hms(self.wall_time_s)),
                ("tokens trained", f"{self.tokens_trained:,} ({self.tokens_per_s:,.0f} tok/s)"),
                (f"{self.value_name} first → last", f"{_f(self.first_loss, '.4f')} → {_f(self.last_loss, '.4f')}"),
                ("peak VRAM", vram)] + ([("per rank", rank_summary(self.per_rank))] if self.per_rank else []) + (
            [("useful tokens", f"{self.useful_tokens_per_s:,.0f} tok/s, {self.padding_fraction:.1%} padding")]
            if self.padding_fraction is not None else [])

    def __str__(self) -> str:
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        return "\n".join(["training summary"] + [f"  {k:<{width}}  {v}" for k, v in rows])


class Dashboard:
    """The numbers every view shows (EMA loss, tokens/s, ETA); create it with make_dashboard()."""

    def __init__(self, total_steps, title, view, *, clock=time.monotonic, smoothing=0.9, window=10, stream=None,
                 value_name="loss"):
        self.total_steps, self.title, self.view, self.value_name = int(total_steps), title, view, value_name
        self.clock, self.smoothing, self.stream = clock, smoothing, stream
        self.t0, self.status, self.summary = clock(), "running", None
        self.steps = self.tokens = 0
        self.first_loss = self.last_loss = self.ema = self.lr = self.grad_norm = None
        self.history: list[tuple[int, float, float]] = []  # (step, loss, smoothed loss)
        self.notes: list[str] = []
        self.extra: dict[str, float] = {}  # the latest step's extra values, by name
        self._recent: deque = deque(maxlen=window + 1)  # (time, step, tokens) of the last steps
        self._rank_tokens: deque = deque(maxlen=window)  # several processes: each rank's tokens, same steps
        self.rank_memory: list[float] = []                # and each rank's GiB at the last step
        self._useful: deque = deque(maxlen=window)        # tokens of rows of the same steps, when given
        self.useful_tokens = self.computed_tokens = 0
        self._show("open")

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def tokens_per_s(self) -> float:  # over the last `window` steps
        r = self._recent
        dt = r[-1][0] - r[0][0] if r else 0.0
        return sum(k for _, _, k in list(r)[1:]) / dt if dt > 0 else 0.0

    def useful_tokens_per_s(self) -> float | None:
        """Tokens of rows (not padding) per second over the same window as tokens_per_s."""
        r = self._recent
        dt = r[-1][0] - r[0][0] if r else 0.0
        return None if not self._useful else sum(self._useful) / dt if dt > 0 else 0.0

    def padding_fraction(self) -> float | None:
        return 1 - self.useful_tokens / self.computed_tokens if self.computed_tokens else None

    def rank_rates(self) -> list[tuple[float, float]]:
        """[(tokens/s, GiB)] of each rank over the same window as tokens_per_s (empty: one process)."""
        r = self._recent
        dt = r[-1][0] - r[0][0] if r else 0.0
        if not self._rank_tokens or dt <= 0:
            return [(0.0, gib) for gib in self.rank_memory]
        totals = [sum(step[i] for step in self._rank_tokens) for i in range(len(self.rank_memory))]
        return [(t / dt, gib) for t, gib in zip(totals, self.rank_memory)]

    def eta_s(self) -> float | None:
        r = self._recent
        if len(r) < 2 or r[-1][1] <= r[0][1]:
            return None
        return (r[-1][0] - r[0][0]) / (r[-1][1] - r[0][1]) * max(self.total_steps - self.steps, 0)

    def update(self, step: int, loss: float, lr: float, tokens: int, grad_norm: float | None = None,
               ranks: list | None = None, extra: dict | None = None, useful_tokens: int | None = None,
               computed_tokens: int | None = None) -> None:
        if self.summary is not None:
            return
        try:
            step, loss, tokens = int(step), float(loss), int(tokens)
            if not self._recent:  # start point, so the first step counts towards tokens/s and ETA
                self._recent.append((self.t0, step - 1, 0))
            self.steps, self.tokens, self.last_loss = step, self.tokens + tokens, loss
            self.lr, self.grad_norm = float(lr), None if grad_norm is None else float(grad_norm)
            if math.isfinite(loss):
                self.first_loss = loss if self.first_loss is None else self.first_loss
                self.ema = ema_update(self.ema, loss, self.smoothing)
            self.history.append((step, loss, math.nan if self.ema is None else self.ema))
            self._recent.append((self.clock(), step, tokens))
            self.extra = {str(k): float(v) for k, v in (extra or {}).items()}
            if ranks:
                self._rank_tokens.append([int(t) for t, _ in ranks])
                self.rank_memory = [float(gib) for _, gib in ranks]
            if computed_tokens:
                self._useful.append(int(useful_tokens))
                self.useful_tokens += int(useful_tokens)
                self.computed_tokens += int(computed_tokens)
        except Exception as e:  # a bad value costs one point on the dashboard, not the run
            return print(f"[{self.title}] dashboard: bad update() values ({e!r})", file=sys.stderr)
        self._show("step", self.steps >= self.total_steps)

    def note(self, message: str) -> None:
        self.notes.append(f"[{_hms(self.elapsed())}] {message}")
        self._show("note", str(message))

    def close(self, status: str = "done") -> TrainingSummary:
        if self.summary is None:
            wall, mem, self.status = self.elapsed(), gpu_memory_stats(), status
            self.summary = TrainingSummary(
                self.steps, self.total_steps, wall, self.tokens, self.tokens / wall if wall > 0 else 0.0,
                self.first_loss, self.last_loss, mem.peak_allocated_gib, mem.peak_reserved_gib, status,
                self.rank_rates() or None, self.value_name,
                self.useful_tokens / wall if self.computed_tokens and wall > 0 else None, self.padding_fraction())
            self._show("close", self.summary)
        return self.summary

    def _show(self, method: str, *args) -> None:
        try:
            getattr(self.view, method)(self, *args)
        except Exception as e:  # swap the failing view for text (failing text for nothing); go on
            why = f"{type(self.view).__name__}.{method} failed ({e!r})"
            if not isinstance(self.view, (_TextView, _NullView)):
                self.view = _TextView(self.stream)
                try:
                    self.view.say(self, f"dashboard: {why}; continuing with text output")
                    return getattr(self.view, method)(self, *args) if method != "open" else None
                except Exception:
                    pass
            self.view = _NullView()


class _NullView:
    def open(self, d): pass
    def step(self, d, final): pass
    def note(self, d, message): pass
    def close(self, d, summary): pass


class _TextView:
    """Lines every `interval` seconds; on a terminal, one progress bar (tqdm) redrawn in place."""

    def __init__(self, stream=None, interval: float = 1.0):
        self.stream, self.interval, self._last, self._bar = stream, interval, None, None

    def _print(self, text) -> None:
        if self._bar is not None:
            self._bar.write(str(text), file=self.stream or sys.stdout)
        else:
            print(text, file=self.stream or sys.stdout, flush=True)

    def open(self, d) -> None:
        out = self.stream or sys.stdout
        if getattr(out, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=d.total_steps, desc="training", unit="step", file=out, dynamic_ncols=True,
                             bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}")

    def say(self, d, line: str): self._print(f"[{d.title}] {line}")
    note = say

    def close(self, d, summary) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._print(summary)

    def step(self, d, final: bool) -> None:
        if self._bar is not None:  # redrawn in place; tqdm limits how often it writes
            self._bar.n = d.steps
            self._bar.set_postfix_str(progress_line(d, with_step=False))
            return
        now = d.clock()
        if final or self._last is None or now - self._last >= self.interval:
            self._last = now
            self._print(progress_line(d))


def text_loading_bars() -> None:
    """From now on, transformers' progress bars (loading weights) are text on stdout, not widgets
    (see the module docstring); a transformers without `set_tqdm_hook` gets them switched off."""
    from transformers.utils import logging as transformers_logging

    if hasattr(transformers_logging, "set_tqdm_hook"):
        transformers_logging.set_tqdm_hook(text_progress_bar)
    else:
        transformers_logging.disable_progress_bar()


def text_progress_bar(factory, args, kwargs):
    """The hook text_loading_bars gives transformers.utils.logging.set_tqdm_hook: a text tqdm on
    stdout where transformers would make a tqdm.auto one. Bars transformers switched off stay off."""
    from tqdm.auto import tqdm as auto_tqdm
    from tqdm.std import tqdm as text_tqdm

    if factory is not auto_tqdm:
        return factory(*args, **kwargs)
    return text_tqdm(*args, **{"file": sys.stdout, **kwargs})


def rank_summary(rates: list[tuple[float, float]]) -> str:
    """`0: 5,120 tok/s 3.1 GiB · 1: 5,090 tok/s 3.0 GiB` (memory: peak GPU allocated, or RSS)."""
    return " · ".join(f"{i}: {tps:,.0f} tok/s {_gib(gib)}" for i, (tps, gib) in enumerate(rates))


def progress_line(d: Dashboard, with_step: bool = True) -> str:
    """`step 12/60 | loss 2.314 (avg 2.401) | lr 1.8e-04 | 1,234 tok/s | VRAM 3.1 GiB (peak 4.0/8) | ETA 0:42`"""
    m = gpu_memory_stats()
    mem = (f"VRAM {m.allocated_gib:.1f} GiB (peak {m.peak_allocated_gib:.1f}/{m.total_gib:.0f})" if m.cuda
           else "" if m.rss_gib is None else f"RSS {_gib(m.rss_gib)}")
    parts = [f"step {d.steps}/{d.total_steps}" if with_step else "",
             f"{d.value_name} {_f(d.last_loss, '.3f')} (avg {_f(d.ema, '.3f')})",
             f"lr {_f(d.lr, '.1e')}", f"{d.tokens_per_s():,.0f} tok/s",
             "" if d.padding_fraction() is None else
             f"{d.useful_tokens_per_s():,.0f} useful tok/s ({d.padding_fraction():.0%} padding)",
             "" if d.grad_norm is None else f"grad {d.grad_norm:.2f}", mem, f"ETA {_hms(d.eta_s())}",
             f"ranks {rank_summary(d.rank_rates())}" if d.rank_memory else ""]
    parts += [f"{name} {extra_value(value)}" for name, value in d.extra.items()]
    return " | ".join(p for p in parts if p)


def extra_value(x: float) -> str:
    """An extra value, shortly: 0.0123, 4.56, 1,234."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _tile(label: str, value: str, sub: str = "") -> str:
    return (f'<div style="{PANEL};padding:5px 10px"><div style="font-size:10px;color:{MUTED};'
            f'text-transform:uppercase;letter-spacing:.05em">{label}</div><div style="font-size:17px;'
            f'font-weight:600;line-height:1.35">{value}</div><div style="font-size:11px;color:{MUTED}">'
            f'{sub or "&nbsp;"}</div></div>')


def _header(d: Dashboard, right: str) -> str:
    pill = (f'<span style="background:{STATUS_COLORS.get(d.status, MUTED)};color:white;border-radius:999px;'
            f'padding:1px 10px;font-size:12px;font-weight:600">{html.escape(d.status)}</span>')
    return (f'<div style="{FONT};display:flex;align-items:center;gap:10px"><span style="font-size:16px;'
            f'font-weight:700">{html.escape(d.title)}</span>{pill}<span style="margin-left:auto;'
            f'font-size:12px;color:{MUTED}">{html.escape(right)}</span></div>')


def _notes_html(d: Dashboard, last: int = 6) -> str:
    lines = "<br>".join(html.escape(n) for n in d.notes[-last:])
    return lines and (f'<div style="{PANEL};font-family:ui-monospace,Menlo,Consolas,monospace;'
                      f'font-size:11.5px;padding:5px 10px;margin-top:6px">{lines}</div>')


def _device(m: MemoryStats) -> str:
    return f"{m.device} · {m.total_gib:.0f} GiB" if m.cuda else "no GPU — running on CPU"


class _WidgetView:
    plot_interval, text_interval = 0.5, 0.2  # least seconds between figure redraws / text refreshes

    def __init__(self, display=None):
        import ipywidgets
        from IPython.display import display as ipython_display
        self.W, self.display = ipywidgets, display or ipython_display
        self._last_plot = self._last_text = self._fig = self._handle = None
        self.render_s = 0.0  # cost of the last redraw; redraws are spaced to keep them under ~20%

    def open(self, d):
        W = self.W
        self.header, self.log = W.HTML(), W.HTML()
        self.progress_text = W.HTML(layout=W.Layout(margin="0 0 0 12px"))
        self.cards = W.HTML(layout=W.Layout(width="250px", min_width="250px", margin="2px 0 0 12px"))
        self.bar = W.IntProgress(value=0, min=0, max=max(d.total_steps, 1), style={"bar_color": ACCENT},
                                 layout=W.Layout(flex="1 1 auto", width="auto", height="14px"))
        # hidden until its first PNG: an empty image shows as a broken-image icon in JupyterLab
        self.plot = W.Image(format="png", layout=W.Layout(width="100%", max_width="720px", display="none"))
        self.box = W.VBox([self.header, W.HBox([self.bar, self.progress_text], layout=W.Layout(align_items="center")),
                           W.HBox([W.Box([self.plot], layout=W.Layout(flex="1 1 auto")), self.cards],
                                  layout=W.Layout(align_items="flex-start")), self.log],
                          layout=W.Layout(border="1px solid rgba(127,127,127,.3)", padding="8px 14px"))
        self._refresh_text(d, gpu_memory_stats())
        self._handle = self.display(self.box, display_id=True)

    def step(self, d, final: bool) -> None:
        now = d.clock()
        if final or self._last_text is None or now - self._last_text >= self.text_interval:
            self._last_text = now
            self._refresh_text(d, gpu_memory_stats())
        if final or self._last_plot is None or now - self._last_plot >= max(self.plot_interval, 4 * self.render_s):
            self._last_plot = now
            self.plot.value = self.render_png(d)
            self.plot.layout.display = None

    def note(self, d, message):
        self.log.value = _notes_html(d)

    def close(self, d, summary):
        mem = gpu_memory_stats()
        self._refresh_text(d, mem)
        rows = "".join(f'<tr><td style="color:{MUTED};padding:2px 18px 2px 0;text-align:left">{k}</td>'
                       f'<td style="font-weight:600;text-align:left">{html.escape(v)}</td></tr>'
                       for k, v in summary.rows()[1:])
        panel = (f'<div style="{FONT};border:1px solid rgba(127,127,127,.3);padding:8px 14px;max-width:720px">'
                 f'{_header(d, _device(mem))}<table style="margin:6px 0 0;font-size:13px;border-collapse:collapse">'
                 f'{rows}</table>{_notes_html(d)}</div>')
        static = {"text/html": panel, "text/plain": str(summary)}
        if hasattr(self._handle, "update"):  # replace the live widget: its state is not saved
            self._handle.update(static, raw=True)
        else:
            self.display(static, raw=True)
        png = self.render_png(d)
        self.display({"image/png": base64.b64encode(png).decode(), "text/plain": f"<{d.value_name} curve>"}, raw=True)
        self.plot.value, self.box.layout.display = b"", "none"  # in any frontend; and keeps .ipynb small

    def _refresh_text(self, d, m: MemoryStats) -> None:
        self.header.value = _header(d, _device(m))
        self.bar.value = max(0, min(d.steps, self.bar.max))
        self.bar.style.bar_color = ACCENT if d.status == "running" else STATUS_COLORS.get(d.status, MUTED)
        self.progress_text.value = (f'<span style="{FONT};font-size:13px"><b>{d.steps:,}</b> / {d.total_steps:,}'
                                    f' &nbsp;·&nbsp; {_hms(d.elapsed())} elapsed &nbsp;·&nbsp; ETA '
                                    f'{_hms(d.eta_s())}</span>')
        mem = (_tile("VRAM", f"{m.allocated_gib:.1f} GiB", f"peak {m.peak_allocated_gib:.1f} / {m.total_gib:.0f} GiB")
               if m.cuda else _tile("memory (RSS)", "—" if m.rss_gib is None else _gib(m.rss_gib), "no GPU — CPU"))
        tiles = [_tile(html.escape(d.value_name), _f(d.last_loss, ".4f"), f"smoothed {_f(d.ema, '.4f')}"),
                 _tile("learning rate", _f(d.lr, ".2e")),
                 _tile("tokens / s", f"{d.tokens_per_s():,.0f}", f"{d.tokens:,} total"),
                 _tile("grad norm", _f(d.grad_norm, ".3f")), mem]
        if d.padding_fraction() is not None:
            tiles.append(_tile("useful tokens / s", f"{d.useful_tokens_per_s():,.0f}",
                               f"{d.padding_fraction():.1%} padding"))
        if d.rank_memory:  # several processes: one line per rank
            tiles.append(_tile("ranks", f"{len(d.rank_memory)} processes", "<br>".join(
                html.escape(line) for line in rank_summary(d.rank_rates()).split(" · "))))
        tiles += [_tile(html.escape(name), extra_value(value)) for name, value in d.extra.items()]
        self.cards.value = (f'<div style="{FONT};display:grid;grid-template-columns:1fr 1fr;gap:6px">'
                            + "".join(tiles) + "</div>")

    def render_png(self, d) -> bytes:
        """Loss curve (raw thin and light, EMA bold) above a VRAM gauge, as PNG bytes. Artists are
        made once and then moved: clearing axes rebuilds the ticks, which costs more than drawing."""
        t, m = time.perf_counter(), gpu_memory_stats()
        if self._fig is None:
            self._build(d, m.cuda)
        steps = [h[0] for h in d.history]
        self._raw.set_data(steps, [h[1] if math.isfinite(h[1]) else math.nan for h in d.history])
        self._smooth.set_data(steps, [h[2] for h in d.history])
        if d.history and d.ema is not None:
            self._dot.set_data([steps[-1]], [d.history[-1][2]])
            self._value.xy = (steps[-1], d.history[-1][2])
            self._value.set_text(f"{d.ema:.3f}")
        self._ax.relim()
        self._ax.autoscale_view()
        if steps:
            left = max(steps[0] - 1, 0)
            right = max(d.total_steps, steps[-1], left + 1)
            self._ax.set_xlim(left, right + 0.02 * (right - left))
        self._step_title.set_text(f"step {d.steps:,} / {d.total_steps:,}")
        if m.cuda and self._bars is not None:
            for bar, gib in zip(self._bars, (m.total_gib, m.reserved_gib, m.allocated_gib)):
                bar.set_width(gib)
            self._peak.set_xdata([m.peak_allocated_gib] * 2)
            self._gauge_title.set_text(f"VRAM  {m.allocated_gib:.1f} allocated · {m.reserved_gib:.1f} reserved"
                                       f" · peak {m.peak_allocated_gib:.1f} / {m.total_gib:.0f} GiB")
        else:
            rss = "" if m.rss_gib is None else f"  ·  process RSS {_gib(m.rss_gib)}"
            self._gauge_title.set_text(f"no GPU — running on CPU{rss}")
        buf = io.BytesIO()
        self._fig.savefig(buf, format="png", facecolor="white")
        self.render_s = time.perf_counter() - t
        return buf.getvalue()

    def _build(self, d, cuda: bool) -> None:
        from matplotlib.figure import Figure  # not pyplot: nothing gets auto-displayed
        fig = self._fig = Figure(figsize=(7.2, 3.9 if cuda else 3.3), dpi=110, facecolor="white")
        gs = fig.add_gridspec(2 if cuda else 1, 1, height_ratios=[7, 1] if cuda else [1], hspace=0.6,
                              left=0.08, right=0.97, top=0.91, bottom=0.07 if cuda else 0.16)
        ax = self._ax = fig.add_subplot(gs[0])
        self._raw, = ax.plot([], [], color=ACCENT_LIGHT, lw=1.0, label=d.value_name)
        self._smooth, = ax.plot([], [], color=ACCENT, lw=2.4, label=f"smoothed (EMA {d.smoothing:.2g})")
        self._dot, = ax.plot([], [], "o", color=ACCENT, ms=5, zorder=3)
        self._value = ax.annotate("", (0, 0), xytext=(-4, 9), ha="right", textcoords="offset points",
                                  color=ACCENT, fontsize=9, fontweight="bold")
        ax.legend(frameon=False, fontsize=8, loc="upper right")
        ax.set_title(f"training {d.value_name}", loc="left", fontsize=10, fontweight="bold", color=INK)
        self._step_title = ax.set_title("", loc="right", fontsize=9, color=MUTED)
        ax.grid(axis="y", color=GRID, lw=0.8)
        ax.set(axisbelow=True)
        ax.tick_params(colors=MUTED, labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
        ax.spines[["left", "bottom"]].set_color("#d1d5db")
        self._bars = None
        if not cuda:
            self._gauge_title = fig.text(0.08, 0.03, "", fontsize=9, color=MUTED)
            return
        g, total = fig.add_subplot(gs[1]), gpu_memory_stats().total_gib
        self._bars = [g.barh(0, w, height=0.8, color=c, label=lab)[0] for w, c, lab in
                      ((total, "#f3f4f6", None), (0, RESERVED, "reserved"), (0, ACCENT, "allocated"))]
        self._peak, = g.plot([0, 0], [-0.55, 0.55], color=PEAK, lw=2, label="peak allocated")
        g.set(xlim=(0, total), ylim=(-0.6, 0.6), yticks=[])
        g.spines[:].set_visible(False)
        g.tick_params(colors=MUTED, labelsize=7, length=2)
        self._gauge_title = g.set_title("", loc="left", fontsize=9, color=INK)
        g.legend(frameon=False, fontsize=7, ncol=3, loc="lower right", bbox_to_anchor=(1, 1), borderaxespad=0.2)


def _in_kernel() -> bool:
    ip = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None  # no IPython: no kernel
    return ip is not None and (getattr(ip, "kernel", None) is not None or type(ip).__name__ == "ZMQInteractiveShell")


def silent_dashboard(total_steps: int, title: str = "gemmatune") -> Dashboard:
    """A dashboard that shows nothing whatever GEMMATUNE_DASHBOARD says: the ranks other than 0."""
    return Dashboard(total_steps, title, _NullView())


def make_dashboard(total_steps: int, title: str = "gemmatune", mode: str = "auto", *, clock=time.monotonic,
                   stream=None, display=None, smoothing: float | None = None, value_name: str = "loss") -> Dashboard:
    """Pick the view for `mode` (GEMMATUNE_DASHBOARD, if set, wins) and start the clock.

    clock: monotonic seconds (tests pass a fake); stream: where text goes (stdout by default);
    display: IPython's display by default; smoothing: EMA beta of the smoothed loss, by default
    1 - 8/total_steps kept within [0.6, 0.95], so short runs are not drowned in lag; value_name: what
    update()'s `loss` holds, as the views name it ("reward" for GRPO)."""
    env = os.environ.get("GEMMATUNE_DASHBOARD", "").strip().lower()
    mode = env if env in MODES else mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if smoothing is None:
        smoothing = min(0.95, max(0.6, 1 - 8 / max(int(total_steps), 1)))
    view, why = None, None
    if mode == "widget" or (mode == "auto" and _in_kernel()):
        try:
            view = _WidgetView(display)
        except Exception as e:  # ipywidgets missing or broken: text always works
            why = f"dashboard: no widget ({e!r}); using text output" if mode == "widget" else None
    view = view or (_NullView() if mode == "off" else _TextView(stream))
    dash = Dashboard(total_steps, title, view, clock=clock, smoothing=smoothing, stream=stream, value_name=value_name)
    if why:
        dash.note(why)
    return dash
