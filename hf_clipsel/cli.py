"""`hf-clipsel <command>`: a thin layer over hf_clipsel.pipeline.

hf-clipsel run --config recipes/cifar10/select.yaml --selection_ratios 0.3 0.5
accelerate launch -m hf_clipsel.cli run --config ...      # embedding split across processes
hf-clipsel demo --output_dir demo_output                   # offline demonstration
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import warnings
import webbrowser
from pathlib import Path

COMMANDS = {
    "run": "the whole pipeline: embed, adapt, score, select, write (and push with --push_to_hub true)",
    "embed": "embed every image into the cache (output_dir/embeddings)",
    "adapt": "train the adapters on the cache and save them to output_dir/adapter",
    "score": "compute the scores with the saved adapters and write output_dir/scores",
    "select": "select subsets from output_dir/scores and write them",
    "push": "push output_dir to the Hub: a dataset repo (subsets + scores) and a model repo (adapters)",
    "demo": "run the whole pipeline offline on a bundled sample, with a tiny CLIP trained for seconds",
    "report": "plots and an HTML page of a finished run: what was kept, what was dropped and why",
    "export": "a CSV of the files a finished run dropped (or kept) at one ratio, with the reasons and scores",
    "clean": "remove the embedding caches in output_dir that its run does not use",
    "env": "print library versions and devices, for bug reports",
}

logger = logging.getLogger("hf_clipsel")


def _usage() -> str:
    lines = ["usage: hf-clipsel <command> [--config FILE] [--field value ...]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    lines += ["", "`hf-clipsel <command> --help` lists every field."]
    return "\n".join(lines)


def _print_summary(summary, output_dir: str) -> None:
    """A finished selection (a :class:`~hf_clipsel.summary.RunSummary`) in a few lines."""
    from .kept_noise import describe_kept_noise

    print(f"\nScored {summary.num_rows} rows ({summary.num_flagged} flagged, kept out of selection).")
    check = summary.adapter_check
    if check:
        verdict = "scored with zero-shot features instead" if check["fell_back"] else "kept"
        print(
            f"Adapters: label agreement {check['adapted_agreement']:.3f} on {check['held_out_rows']} held-out rows "
            f"(zero-shot {check['zero_shot_agreement']:.3f}"
            + (f", sign test p = {check['sign_test_p_value']:.2g}" if "sign_test_p_value" in check else "")
            + f"): {verdict}."
        )
    for column, counts in summary.flags.items():
        if counts:
            found = ", ".join(f"{count} {kind}" for kind, count in counts.items())
            print(
                f"Flagged ({column}): {found} (ranked after every other row; the scores' `{column}` column has them)."
            )
    noise = summary.injected_noise
    if noise:
        print(f"Injected noise (recorded in the source's columns) in the pool: {describe_kept_noise(noise['pool'])}")
    for ratio, info in summary.ratios.items():
        shortfall = f", {info.shortfall} short of the budget" if info.shortfall else ""
        dropped = ", ".join(f"{count} {reason}" for reason, count in info.dropped_by_reason.items())
        print(
            f"  ratio {ratio}: kept {info.kept} of {summary.num_rows} rows{shortfall}"
            + (f"; dropped: {dropped}" if dropped else "")
        )
        if noise:
            kept = noise["ratios"][ratio]
            print(f"    kept {describe_kept_noise(kept['selected'], kept['random'], 'random')}")
    if summary.ratio_overlap:
        shares = ", ".join(f"{pair} {share:.0%}" for pair, share in summary.ratio_overlap.items())
        print(f"Stability: the share of a subset that the next larger ratio keeps too: {shares}")
    if summary.seed_overlap:
        shares = ", ".join(f"{ratio} {share:.0%}" for ratio, share in summary.seed_overlap.items())
        print(f"Stability: the share of a subset that selections with adapters trained on other seeds keep: {shares}")
    entries = ("scores/", "subsets/", "adapter/", "report/index.html", "run_config.yaml", "README.md")
    written = [entry for entry in entries if (Path(output_dir) / entry).exists()]
    print(f"Outputs in {output_dir}: {', '.join(written)}")
    if summary.embedding_cache_bytes:
        clean = f"hf-clipsel clean --output_dir {output_dir}"
        size = summary.embedding_cache_bytes / 2**20
        print(f"Embedding caches: {size:.1f} MiB on disk (`{clean}` removes those the run does not use)")
    print(f'Load a subset: datasets.load_dataset("{output_dir}", "ratio_{next(iter(summary.ratios))}")')


def _stage(command: str, args: list[str]) -> None:
    from . import pipeline
    from .parser import build_parser, parse_config

    config = parse_config(args, build_parser(prog=f"hf-clipsel {command}", description=COMMANDS[command]))
    if command == "push" and not config.run.hub_dataset_id:
        raise ValueError("push needs --hub_dataset_id org/name (and --hub_model_id for the adapters).")
    command_line = ["hf-clipsel", command, *args]
    output_dir = config.run.output_dir
    if command == "push":
        result = pipeline.push(config)
        print(
            f"Pushed {output_dir} to {config.run.hub_dataset_id} ({len(result.dataset.commits)} commits)"
            + (f" and its adapters to {config.run.hub_model_id}" if config.run.hub_model_id else "")
        )
    elif command == "clean":
        removed = pipeline.clean(config)
        for path in removed:
            print(f"removed {path}")
        print(f"Removed {len(removed)} embedding cache(s) that the run in {output_dir} does not use.")
    elif command == "select":
        _print_summary(pipeline.select_from_scores(config, command_line), output_dir)
    else:
        accelerator = pipeline.make_accelerator()
        result = getattr(pipeline, command)(config, accelerator, command_line)
        if not accelerator.is_main_process:
            return
        if command == "run":
            _print_summary(result, output_dir)
        elif command == "embed":
            print(f"Embedded {len(result)} rows into the cache of {output_dir}; next: hf-clipsel adapt")
        elif command == "adapt":
            print(f"Adapters in {output_dir}/adapter; next: hf-clipsel score")
        else:
            print(f"Scores of {len(result)} rows in {output_dir}/scores; next: hf-clipsel select")


def _report(args: list[str]) -> None:
    from .pipeline import report

    parser = argparse.ArgumentParser(prog="hf-clipsel report", description=COMMANDS["report"])
    parser.add_argument("--output_dir", required=True, help="The output_dir of a finished run.")
    parser.add_argument(
        "--gallery_ratio",
        type=float,
        default=None,
        help="Ratio of the 'dropped as redundant' gallery (default: the smallest ratio of the run).",
    )
    parser.add_argument(
        "--thumbnails",
        choices=("sample", "all"),
        default="sample",
        help="Thumbnails of the page: every row of a small run and a sample per class and outcome of a large one "
        "(sample, the default), or every row (all).",
    )
    parser.add_argument("--open", action="store_true", help="Open the page in the web browser.")
    options = parser.parse_args(args)
    link = report(options.output_dir, options.gallery_ratio, options.thumbnails).resolve().as_uri()
    print(f"Report: {link}")
    if options.open and not webbrowser.open(link):  # no browser (a server, a container): the link is printed
        print(f"No web browser to open; open {link} in one.")


def _export(args: list[str]) -> None:
    from .export import export_rows

    parser = argparse.ArgumentParser(prog="hf-clipsel export", description=COMMANDS["export"])
    parser.add_argument("--output_dir", required=True, help="The output_dir of a finished run.")
    parser.add_argument("--ratio", type=float, required=True, help="One of the run's selection ratios, e.g. 0.5.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--dropped", action="store_true", help="Export the rows dropped at that ratio (the default).")
    which.add_argument("--kept", action="store_true", help="Export the rows kept at that ratio.")
    parser.add_argument(
        "--to", default=None, help="The CSV file to write (default: dropped_ratio_<r>.csv or kept_ratio_<r>.csv here)."
    )
    options = parser.parse_args(args)
    path = export_rows(options.output_dir, options.ratio, kept=options.kept, to=options.to)
    print(f"Wrote the {'kept' if options.kept else 'dropped'} rows of ratio {options.ratio:g} to {path}")


def _demo(args: list[str]) -> None:
    from .demo import NOTICE, demo_config
    from .pipeline import run

    parser = argparse.ArgumentParser(prog="hf-clipsel demo", description=COMMANDS["demo"])
    parser.add_argument("--output_dir", default="demo_output", help="Where the demo writes (default: demo_output).")
    output_dir = parser.parse_args(args).output_dir
    print(NOTICE)
    config = demo_config(output_dir)
    summary = run(config, command=["hf-clipsel", "demo", "--output_dir", output_dir])
    _print_summary(summary, output_dir)
    print(NOTICE)


def _env() -> None:
    """Our libraries and devices, then huggingface_hub's own environment dump (platform, endpoint, cache paths,
    whether a token is saved; never the token)."""
    import torch
    from huggingface_hub import dump_environment_info

    from .outputs import library_versions

    for name, version in library_versions().items():
        print(f"{name}: {version}")
    print(f"cpu threads: {torch.get_num_threads()}")
    print(f"cuda: {torch.cuda.is_available()} ({torch.cuda.device_count()} devices)")
    for index in range(torch.cuda.device_count()):
        print(f"  cuda:{index}: {torch.cuda.get_device_name(index)}")
    print(f"mps: {torch.backends.mps.is_available()}")
    dump_environment_info()


def setup_logging() -> None:
    """One line per message: the root handler prints hf_clipsel's (and other libraries'); huggingface_hub and
    datasets print theirs with handlers of their own, so they must not propagate to the root's as well (each retry
    on a flaky network was printed twice)."""
    from datasets.utils import logging as datasets_logging
    from huggingface_hub.utils import logging as hub_logging

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    hub_logging.disable_propagation()
    datasets_logging.disable_propagation()


def answer_every_ctrl_c() -> None:
    """Python drops a KeyboardInterrupt that lands while a weakref callback or a ``__del__`` runs (it prints
    "Exception ignored in ..." and goes on), so a Ctrl-C during garbage collection went unanswered and the run
    finished as if nothing was pressed. Such an interrupt is raised again in the main thread, from a helper thread
    (raised from the hook itself, it would land in the hook and be dropped again)."""
    import _thread

    if getattr(sys.unraisablehook, "answers_ctrl_c", False):  # main() called again in the same process
        return
    dropped = threading.Event()
    default_hook = sys.unraisablehook

    def hook(unraisable) -> None:
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            dropped.set()
        else:
            default_hook(unraisable)

    def raise_again() -> None:
        while True:
            dropped.wait()
            dropped.clear()
            _thread.interrupt_main()

    threading.Thread(target=raise_again, name="hf-clipsel-ctrl-c", daemon=True).start()
    hook.answers_ctrl_c = True
    sys.unraisablehook = hook


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hf-clipsel: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    setup_logging()
    answer_every_ctrl_c()
    # Raised inside peft's own calls into transformers 5; nothing a user can act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    try:
        if command == "demo":
            _demo(args)
        elif command == "env":
            _env()
        elif command == "report":
            _report(args)
        elif command == "export":
            _export(args)
        else:
            _stage(command, args)
    except (ValueError, OSError) as error:  # OSError covers a refused lock and a push that gave up
        # Input problems: one clear line, not a traceback.
        print(f"hf-clipsel {command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"hf-clipsel {command}: interrupted; the same command resumes where it stopped (finished embedding chunks "
            "are kept).",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
