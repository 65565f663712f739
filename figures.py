"""Figures written to files: matplotlib on its file-only backend, and one figure's create, save and close."""

from contextlib import contextmanager


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend: every figure is written, none shown (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def figure(path: str, dpi: int = 110, **subplots_kwargs):
    """Yields (fig, axes) from plt.subplots(**subplots_kwargs); then lays the figure out and saves it to `path`.

    The figure is closed even when drawing it fails: pyplot keeps every figure it made until it is closed.
    """
    plt = pyplot()
    fig, axes = plt.subplots(**subplots_kwargs)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
