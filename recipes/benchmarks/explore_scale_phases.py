"""Where the scale benchmark's memory goes: its child (``bench_selection.py --scale-child``) under a phase profiler.

Runs the same child on a cache that ``bench_selection.py --parts scale --keep --work-dir WORK`` built, with each
registered score's ``compute``, each step of the duplicate search (``hf_clipsel.duplicates``: grouping the rows by
class, the thumbnails' vectors, the searches within and across classes, the groups; called once per class, so not
printed, only their peak and summed time kept), the projection and the stores' writes (``modeling.image_features``,
``FeatureStore.write``: per block, likewise), the table's build (``scores_table.scores_table``) and each step of
``scores_table.select_stage`` wrapped as a phase, and a thread that samples every 20 ms the process's resident
memory and glibc malloc's own accounting (``mallinfo2``: bytes handed out and not freed, "live", and bytes freed but
kept in its heap, "free"). Prints, per phase, its RSS at start and end and at its peak, and its seconds summed over
its calls, with the live and free bytes and the kernel's split of resident memory (``RssAnon``: heap, mmaps,
Python's and Arrow's allocators; ``RssFile``: mapped files, mostly shared libraries) at that peak. Live bytes that
track RSS mean arrays alive at the peak; free bytes that grow with N would mean the heap keeps freed arrays.

    python recipes/benchmarks/explore_scale_phases.py WORK [--text-classes 100] [--knn-k 50] [--store-dtype float16]

glibc only (Linux); the sampling costs a few percent of a core.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import sys
import threading
import time
from pathlib import Path

import torch

GiB = 1024**3


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]  # fmt: skip


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2
_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def heap() -> tuple[int, int]:
    """(live, free) bytes of glibc malloc: handed out (heap and mmapped chunks), and freed but kept in its heap."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd, info.fordblks


def resident_split() -> dict[str, float]:
    with open("/proc/self/status") as status:
        return {
            line.split(":")[0]: round(int(line.split()[1]) / 1024**2, 3)
            for line in status
            if line.startswith(("RssAnon", "RssFile"))
        }


class Phases:
    def __init__(self):
        self.current = "outside"
        self.peaks: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}  # every call's, summed: the quiet steps' time
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            rss = resident()
            peak = self.peaks.setdefault(self.current, {"rss": 0})
            if rss > peak["rss"]:  # mallinfo2 walks the heap under malloc's lock: only for a new peak
                live, free = heap()
                peak.update(rss=rss, live=live, free=free, split=resident_split())
            time.sleep(0.02)

    def wrap(self, name: str, function, quiet: bool = False):
        """``function`` run as the phase ``name``; ``quiet``: a step called many times (the duplicate search's, once
        per class), whose peak and summed time are kept but whose calls are not printed."""

        @functools.wraps(function)
        def wrapped(*args, **kwargs):
            outer, self.current = self.current, name
            start, started = resident(), time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
                if not quiet:  # mallinfo2 (see _sample) not on every call of a step called once per class
                    live, free = heap()
                    print(
                        f"phase {name}: {time.perf_counter() - started:.1f} s, RSS {start / GiB:.3f} -> "
                        f"{resident() / GiB:.3f} GiB, live {live / GiB:.3f}, free {free / GiB:.3f}",
                        flush=True,
                    )
                self.current = outer

        return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", help="a work folder of bench_selection.py --parts scale --keep")
    parser.add_argument("--text-classes", type=int, default=100)
    parser.add_argument("--knn-k", type=int, default=50)
    parser.add_argument(
        "--store-dtype",
        default="float32",
        help="the feature store's dtype (float16: as a run with feature_store_dtype float16)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    import _scale

    import hf_clipsel.duplicates as duplicates
    import hf_clipsel.modeling as modeling
    import hf_clipsel.scores_table as scores_table
    from hf_clipsel.features import FeatureStore
    from hf_clipsel.scores import registered_scores

    phases = Phases()
    for score in registered_scores():
        type(score).compute = phases.wrap("score " + score.name, type(score).compute)
    steps = ("feature_store", "measured_statistics", "score_values", "scores_table", "arrow_dataset", "score_flags",
             "selection_inputs", "explained_drops", "select", "drop_reasons", "concatenate_datasets",
             "select_stage")  # fmt: skip
    for name in steps:  # looked up in the module when called: the child and select_stage call the wrapped ones
        setattr(scores_table, name, phases.wrap(name, getattr(scores_table, name)))
    # the duplicate search's steps (hf_clipsel.duplicates looks them up in its module when it calls them): what
    # find_duplicates holds between them is its own phase, "score duplicate"
    for name in ("group_rows_by_label", "thumbnail_vectors", "cells", "nearest_in_group", "nearest_across",
                 "groups_of_pairs", "nearest_partner"):  # fmt: skip
        setattr(duplicates, name, phases.wrap("search: " + name, getattr(duplicates, name), quiet=True))
    # per block: the projection (the child imports it when called) and every store's writes (features, thumbnails)
    modeling.image_features = phases.wrap("projection", modeling.image_features, quiet=True)
    FeatureStore.write = phases.wrap("store: write", FeatureStore.write, quiet=True)
    # reads by row ids (a class, a cell, a block; scattered rows read span by span)
    FeatureStore.rows = phases.wrap("store: rows", FeatureStore.rows, quiet=True)
    _scale.child(Path(args.work), args.text_classes, args.knn_k, args.store_dtype)  # prints its JSON line
    print("seconds per phase, all its calls (a step inside another phase counts in both):")
    for name, seconds in phases.seconds.items():
        print(f"  {name:28s} {seconds:8.1f}")
    print("peak RSS per phase (innermost phase; GiB): rss, live and free malloc bytes at that moment, RssAnon/RssFile")
    for name, peak in phases.peaks.items():
        if "live" in peak:
            print(f"  {name:28s} {peak['rss'] / GiB:6.3f} {peak['live'] / GiB:6.3f} {peak['free'] / GiB:6.3f} "
                  f"{peak['split']}")  # fmt: skip


if __name__ == "__main__":
    main()
