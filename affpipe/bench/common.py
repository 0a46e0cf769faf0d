"""Pieces every benchmark shares: timing windows, the machine description, marked markdown.

Kept free of click, matplotlib and the heavier affpipe stages so ``affpipe.bench.gpu`` can
import it on a bare GPU host.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affpipe.dist import usable_cores

NEEDS_GPU = "needs a GPU"
NEEDS_DALI = "needs NVIDIA DALI"
# Set on a GPU host (the GPU benchmarks, ``pytest -m gpu``): a case that cannot run there —
# no CUDA device, no DALI — is a failure, not a skip, so the run cannot pass by testing nothing.
REQUIRE_GPU_ENV = "AFFPIPE_REQUIRE_GPU"


def gpu_required() -> bool:
    """True when ``AFFPIPE_REQUIRE_GPU`` is set (to anything but ``""``/``0``)."""
    return os.environ.get(REQUIRE_GPU_ENV, "") not in ("", "0")


def require_cuda(prog: str, smoke: bool) -> None:
    """Exit non-zero when the run cannot test what it is for: a GPU run without CUDA, or any
    run while ``AFFPIPE_REQUIRE_GPU`` is set and torch sees no CUDA device."""
    if cuda_available():
        return
    if gpu_required():
        raise SystemExit(f"{prog}: {REQUIRE_GPU_ENV} is set but torch sees no CUDA device "
                         "(driver too old for this torch build, or no GPU)")
    if not smoke:
        raise SystemExit(f"{prog}: torch sees no CUDA device (use --cpu-smoke to try the script on a CPU)")


def failed_rows(rows: list[dict]) -> list[str]:
    """``name: status`` of the rows that did not run: an error always; a case that needs a GPU
    or DALI too when ``AFFPIPE_REQUIRE_GPU`` is set."""
    required = gpu_required()
    return [f"{r.get('name', '?')}: {r.get('status')}" for r in rows
            if str(r.get("status", "")).startswith("error") or (required and r.get("status") in (NEEDS_GPU, NEEDS_DALI))]



def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def sync(device: Any) -> None:
    """Wait for queued GPU work so a timing window ends when the data is really ready."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Endless:
    """Iterate a loader forever: a new epoch (``set_epoch`` when it has one) when one ends.

    The time each new epoch takes to start (``set_epoch``, a new iterator, its first item) is
    summed in ``restart_s``: benchmark epochs are short, so ``measure`` reports it apart from
    the steady-state rate a 2.7M-frame epoch runs at.
    """

    def __init__(self, loader: Iterable):
        self.loader = loader
        self.epoch = 0
        self.restart_s = 0.0  # time spent starting new epochs (new iterator + its first batch)
        self._it: Iterator = iter(loader)

    def __iter__(self) -> Endless:
        return self

    def __next__(self):
        try:
            return next(self._it)
        except StopIteration:
            t0 = time.perf_counter()
            self.epoch += 1
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(self.epoch)
            self._it = iter(self.loader)
            item = next(self._it)  # an empty loader raises StopIteration again: a real error
            self.restart_s += time.perf_counter() - t0
            return item


@dataclass
class Window:
    """One timing window's outcome."""

    items: int
    steps: int
    seconds: float
    wait_s: float = 0.0
    restarts: int = 0  # epochs started inside the window
    restart_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("nan")

    @property
    def steady_rate(self) -> float:
        """The rate without the epoch starts: what an epoch of millions of frames sees."""
        busy = self.seconds - self.restart_s
        return self.items / busy if busy > 0 else float("nan")


@dataclass
class Measurement:
    """Median over repeats of a time-bounded case (frames/s), with every repeat kept."""

    windows: list[Window] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(w.rate for w in self.windows)

    @property
    def steady_rate(self) -> float:
        return statistics.median(w.steady_rate for w in self.windows)

    @property
    def wait_share(self) -> float:
        """Share of the window blocked on data, epoch starts excluded (see ``steady_rate``)."""
        return statistics.median(
            max(0.0, w.wait_s - w.restart_s) / (w.seconds - w.restart_s) for w in self.windows if w.seconds > w.restart_s
        )

    @property
    def restart_cost_s(self) -> float | None:
        """Mean seconds one epoch start costs (None when no window crossed an epoch end)."""
        n = sum(w.restarts for w in self.windows)
        return sum(w.restart_s for w in self.windows) / n if n else None

    def to_dict(self) -> dict:
        cost = self.restart_cost_s
        return {
            "fps": round(self.steady_rate, 1),
            "fps_with_epoch_starts": round(self.rate, 1),
            "fps_runs": [round(w.steady_rate, 1) for w in self.windows],
            "fps_with_epoch_starts_runs": [round(w.rate, 1) for w in self.windows],
            "steps_runs": [w.steps for w in self.windows],
            "seconds_runs": [round(w.seconds, 3) for w in self.windows],
            "epoch_starts_runs": [w.restarts for w in self.windows],
            "epoch_start_s": None if cost is None else round(cost, 3),
        }


def measure(
    step: Callable[[], tuple[int, float]],
    *,
    warmup: int,
    max_steps: int,
    seconds: float,
    repeats: int,
    device: Any = "cpu",
) -> Measurement:
    """Call ``step`` (→ items done, seconds of it spent waiting for data) in timed windows.

    ``warmup`` calls first (worker start-up, cudnn autotuning, allocator growth), then
    ``repeats`` windows, each ending after ``max_steps`` calls or once ``seconds`` have passed
    (at least one call), with a device sync before the clock stops. When ``step.source`` is
    an ``Endless``, the epoch starts inside each window are counted and timed, so the
    steady-state rate of a benchmark-sized epoch can be told from the cost of starting one.
    """
    src = getattr(step, "source", None)
    for _ in range(warmup):
        step()
    sync(device)
    m = Measurement()
    for _ in range(repeats):
        items = steps = 0
        wait = 0.0
        e0, r0 = (src.epoch, src.restart_s) if src is not None else (0, 0.0)
        t0 = time.perf_counter()
        while steps < max_steps and (steps == 0 or time.perf_counter() - t0 < seconds):
            n, w = step()
            items += n
            wait += w
            steps += 1
        sync(device)
        dt = time.perf_counter() - t0
        restarts, restart_s = (src.epoch - e0, src.restart_s - r0) if src is not None else (0, 0.0)
        m.windows.append(Window(items, steps, dt, wait, restarts, restart_s))
    return m


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict:
    """CPU model, cores, RAM, GPU (or none), library versions and the date."""
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": usable_cores(),
        "cores_host": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
    }
    for mod, key in (("torchvision", "torchvision"), ("nvidia.dali", "dali"), ("cv2", "opencv"), ("PIL", "pillow")):
        try:
            info[key] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:
            info[key] = None
    return info


def machine_line(m: dict) -> str:
    """One human line describing the machine of a results dict."""
    gpu = m.get("gpu") or "none"
    return (
        f"{m.get('cpu')} ({m.get('cores')} usable cores, {m.get('ram_gib')} GiB RAM), GPU: {gpu}; "
        f"Python {m.get('python')}, torch {m.get('torch')}, torchvision {m.get('torchvision')}, "
        f"DALI {m.get('dali') or 'not installed'}"
    )


def update_marked(md: Path, name: str, body: str, *, title: str | None = None) -> Path:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``md``.

    Missing markers (or a missing file) get a new section appended, so a fresh checkout's
    BENCHMARKS.md never needs hand editing before the first run.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + (f"## {title}\n\n" if title else "") + block + "\n"
    md.write_text(text)
    return md


def fmt_rate(x: float | None) -> str:
    """Frames/s for tables: thousands separated, no decimals."""
    if x is None or x != x:
        return "—"
    return f"{x:,.0f}"
