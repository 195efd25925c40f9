"""cai: Constitutional AI and RLAIF on a single GPU (or a CPU, slowly).

The library is a set of small modules with one job each; the `cai` command and the recipes
under `recipes/` compose them. Start with `cai --help`.
"""

from cai.errors import CaiError

__version__ = "0.1.0"
__all__ = ["CaiError", "__version__"]
