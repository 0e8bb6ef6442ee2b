"""Metric modules shipped with hf_clipsel, loadable without the Hub."""

from __future__ import annotations

from pathlib import Path

ACCURACY_MODULE = Path(__file__).parent / "accuracy" / "accuracy.py"


def load_accuracy_metric(**kwargs):
    """Load the top-1/top-k accuracy metric from the module file shipped in this package.

    Loading by local path never touches the network, online or offline; ``kwargs`` go to ``evaluate.load``
    (e.g. ``experiment_id``, ``keep_in_memory``). The Hub's ``evaluate.load("accuracy")`` needs the network.
    """
    import evaluate

    return evaluate.load(str(ACCURACY_MODULE), **kwargs)


__all__ = ["ACCURACY_MODULE", "load_accuracy_metric"]
