"""dselectk: DSelect-k and other Mixture-of-Experts gates as C kernels on NumPy arrays."""
from . import _C

__version__ = "0.1.0"
