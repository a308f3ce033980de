"""The training progress bar of `idmr_jax.train.metric_writer.MetricWriter`: redrawn in place in a terminal, and
only every `NON_TERMINAL_REFRESH_S` into a file, where every redraw stays in the log."""

from __future__ import annotations

import io
import sys

from idmr_jax.train.metric_writer import MetricWriter


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _train(tmp_path, monkeypatch, stream: io.StringIO, steps: int = 200) -> str:
    monkeypatch.setattr(sys, "stderr", stream)
    writer = MetricWriter(tmp_path, steps, progress=True)
    for step in range(1, steps + 1):
        if step % 10 == 0:
            writer.write(step, {"loss": 1.0 / step})
        writer.advance(step)
    writer.close()
    return stream.getvalue()


def test_into_a_file_the_bar_draws_a_few_lines_not_one_per_step(tmp_path, monkeypatch):
    out = _train(tmp_path, monkeypatch, io.StringIO())
    assert out.count("\r") <= 4, out  # the start and the end (the loop takes well under 30 s)
    assert "200/200" in out and "loss=0.005" in out  # the last state still shows


def test_in_a_terminal_the_bar_shows_every_logged_loss(tmp_path, monkeypatch):
    out = _train(tmp_path, monkeypatch, _Terminal())
    assert out.count("\r") >= 20
    assert all(f"loss={1.0 / step:.4g}" in out for step in range(10, 201, 10))
    assert "200/200" in out
