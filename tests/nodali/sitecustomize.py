"""Hide NVIDIA DALI (and its wds2idx) from this interpreter and its children.

``make test-nodali`` puts this folder first on ``PYTHONPATH``, so the suite runs as it does on
the platforms the torch fallback exists for (macOS, ARM, Windows), subprocesses included.
"""

import sys
from importlib.abc import MetaPathFinder

_HIDDEN = ("nvidia.dali", "wds2idx")


class _HideDali(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == h or name.startswith(h + ".") for h in _HIDDEN):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by make test-nodali)", name=name)
        return None


sys.meta_path.insert(0, _HideDali())
