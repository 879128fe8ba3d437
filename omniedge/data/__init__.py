"""omni-mini's training and evaluation data, built from packages that install here (no model hub).

`build.build_dataset()` makes it; `build.load_split()` reads it; docs/data.md is the layout contract.
"""

from omniedge.data.build import build_dataset, load_split

__all__ = ["build_dataset", "load_split"]
