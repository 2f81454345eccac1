"""matplotlib for the benchmarks' plots, when it is installed (`pip install -e .[bench]`)."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a hint) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("(no plots: `pip install -e .[bench]` for matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
