"""Progress bars: tqdm's when tqdm is installed (it is in requirements.txt), else a silent stand-in
with the same calls, so a machine with only torch and torchvision (a bare GPU image) still runs
every script; the bars are the only thing that goes missing."""
from __future__ import annotations

try:
    from tqdm.auto import tqdm
except ImportError:  # a bare image: no bars, the same calls
    class tqdm:  # noqa: N801 - tqdm's own name, so callers read the same either way
        def __init__(self, iterable=None, total=None, **kwargs):
            self.iterable, self.total = iterable, total

        def __iter__(self):
            return iter(self.iterable if self.iterable is not None else ())

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

        def update(self, n: int = 1) -> None:
            pass

        def set_postfix(self, *args, **kwargs) -> None:
            pass

        def close(self) -> None:
            pass

__all__ = ["tqdm"]
