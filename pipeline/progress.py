"""Progress of a stage as it runs: a bar on a terminal, one readable line every few seconds otherwise."""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


class StageProgress:
    """Counts items of a stage plus free-form counters (frames, clips, rejects)."""

    def __init__(
        self,
        stage: str,
        total: int,
        unit: str = "videos",
        mode: str = "auto",
        log_interval_s: float = 10.0,
        stream: IO[str] | None = None,
        rate_counter: str | None = None,
    ):
        self.stage = stage
        self.total = total
        self.unit = unit
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "log"
        self.mode = mode
        self.log_interval_s = log_interval_s
        self.rate_counter = rate_counter
        self.done = 0
        self.counters: dict[str, int] = {}
        self.start = time.monotonic()
        self._last_log = self.start
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                unit=unit[:-1] if unit.endswith("s") else unit,
                desc=stage,
                file=self.stream,
                dynamic_ncols=True,
            )

    def update(self, items: int, **counters: int) -> None:
        self.done += items
        for key, value in counters.items():
            self.counters[key] = self.counters.get(key, 0) + value
        if self._bar is not None:
            self._bar.set_postfix({k: v for k, v in self.counters.items()}, refresh=False)
            self._bar.update(items)
        elif self.mode == "log":
            now = time.monotonic()
            if now - self._last_log >= self.log_interval_s:
                self._last_log = now
                self._write(self.line())

    def grow(self, items: int) -> None:
        """More items than the total said (a streaming stage learns its total as the stage before produces)."""
        self.total += items
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"[{self.stage}] {self.done}/{self.total} {self.unit}{pct}"]
        parts += [f"{v:,} {k}" for k, v in self.counters.items()]
        if self.rate_counter and elapsed > 0:
            parts.append(f"{self.counters.get(self.rate_counter, 0) / elapsed:,.0f} {self.rate_counter}/s")
        if 0 < self.done < self.total:
            parts.append(f"eta {_fmt_duration(elapsed / self.done * (self.total - self.done))}")
        parts.append(f"elapsed {_fmt_duration(elapsed)}")
        return " · ".join(parts)

    def _write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> float:
        elapsed = time.monotonic() - self.start
        if self._bar is not None:
            self._bar.close()
        if self.mode != "off":
            self._write(self.line() + " · done")
        return elapsed
