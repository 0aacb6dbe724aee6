"""Progress bars for the experiments' long phases: shown in a terminal or a notebook, silent in
logs and CI (tqdm's disable=None), so that a redirected run's output is what it was."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(total: int, desc: str, unit: str = "it", leave: bool = False) -> tqdm:
    """A bar of `total` steps; update it per finished request or per sweep point, never per
    engine step of a timed loop. leave=False: it is erased when closed, and the figures
    printed after it read as they did without it."""
    return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=leave)


def tracked(items, desc: str, unit: str = "point"):
    """items, iterated under a bar (for sweeps: one step per configuration)."""
    items = list(items)
    return tqdm(items, total=len(items), desc=desc, unit=unit, disable=None, leave=False)


def say(text: str) -> None:
    """print() for lines written while a bar is on screen: tqdm takes the bar off, prints,
    and draws it again below (a plain print would land on the bar's line)."""
    tqdm.write(text)
    sys.stdout.flush()  # as print(..., flush=True): logs see each line when it happens


def shown() -> bool:
    """Whether these bars show, for a library's own switch (LLM.generate's use_tqdm), whose
    bar is drawn whenever asked: in a notebook, or when stderr is a terminal."""
    from tqdm import autonotebook, std

    return autonotebook.tqdm is not std.tqdm or sys.stderr.isatty()
