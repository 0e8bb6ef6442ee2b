"""`hf-clipsel <command>`: a thin layer over hf_clipsel.pipeline.

hf-clipsel run --config recipes/cifar10/select.yaml --selection_ratios 0.3 0.5
accelerate launch -m hf_clipsel.cli run --config ...      # embedding split across processes
hf-clipsel demo --output_dir demo_output                   # offline demonstration
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from .hub import HubPushError

COMMANDS = {
    "run": "the whole pipeline: embed, adapt, score, select, write (and push with --push_to_hub true)",
    "embed": "embed every image into the cache (output_dir/embeddings)",
    "adapt": "train the adapters on the cache and save them to output_dir/adapter",
    "score": "compute the scores with the saved adapters and write output_dir/scores",
    "select": "select subsets from output_dir/scores and write them",
    "push": "push output_dir to the Hub: a dataset repo (subsets + scores) and a model repo (adapters)",
    "demo": "run the whole pipeline offline on a bundled sample with a tiny random CLIP",
    "report": "plots and an HTML page of a finished run: what was kept, what was dropped and why",
    "env": "print library versions and devices, for bug reports",
}

logger = logging.getLogger("hf_clipsel")


def _usage() -> str:
    lines = ["usage: hf-clipsel <command> [--config FILE] [--field value ...]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    lines += ["", "`hf-clipsel <command> --help` lists every field."]
    return "\n".join(lines)


def _print_summary(summary: dict, output_dir: str) -> None:
    from .noise import describe_kept_noise

    print(f"\nScored {summary['num_rows']} rows ({summary['num_flagged']} flagged, kept out of selection).")
    check = summary.get("adapter_check")
    if check:
        verdict = "scored with zero-shot features instead" if check["fell_back"] else "kept"
        print(
            f"Adapters: label agreement {check['adapted_agreement']:.3f} on {check['held_out_rows']} held-out rows "
            f"(zero-shot {check['zero_shot_agreement']:.3f}"
            + (f", sign test p = {check['sign_test_p_value']:.2g}" if "sign_test_p_value" in check else "")
            + f"): {verdict}."
        )
    if summary.get("damaged"):
        found = ", ".join(f"{count} {kind}" for kind, count in summary["damaged"].items())
        print(f"Damage check: {found} (ranked after every other row; the scores' `damage` column lists them).")
    noise = summary.get("injected_noise")
    if noise:
        print(f"Injected noise (hf_clipsel.noise columns) in the pool: {describe_kept_noise(noise['pool'])}")
    for ratio, info in summary["ratios"].items():
        shortfall = f", {info['shortfall']} short of the budget" if info["shortfall"] else ""
        dropped = ", ".join(f"{count} {reason}" for reason, count in info.get("dropped_by_reason", {}).items())
        print(
            f"  ratio {ratio}: kept {info['kept']} of {summary['num_rows']} rows{shortfall}"
            + (f"; dropped: {dropped}" if dropped else "")
        )
        if noise:
            kept = noise["ratios"][ratio]
            print(f"    kept {describe_kept_noise(kept['selected'], kept['random'], 'random subset of that size')}")
    print(f"Outputs in {output_dir}: scores/, subsets/, adapter/, report/index.html, run_config.yaml, README.md")
    print(f'Load a subset: datasets.load_dataset("{output_dir}", "ratio_{next(iter(summary["ratios"]))}")')


def _stage(command: str, args: list[str]) -> None:
    from . import pipeline
    from .outputs import ADAPTER_DIR
    from .parser import build_parser, parse_config

    config = parse_config(args, build_parser(prog=f"hf-clipsel {command}", description=COMMANDS[command]))
    if command == "push" and not config.run.hub_dataset_id:
        raise ValueError("push needs --hub_dataset_id org/name (and --hub_model_id for the adapters).")
    command_line = ["hf-clipsel", command, *args]
    accelerator = pipeline.make_accelerator()
    if command == "run":
        summary = pipeline.run(config, accelerator, command_line)
        if summary is not None:
            _print_summary(summary, config.run.output_dir)
        return
    if command == "push":
        result = pipeline.push_outputs(
            config.run.output_dir, config.run.hub_dataset_id, config.run.hub_model_id, private=config.run.hub_private
        )
        print(
            f"Pushed {config.run.output_dir} to {config.run.hub_dataset_id} ({len(result.dataset.commits)} commits)"
            + (f" and its adapters to {config.run.hub_model_id}" if config.run.hub_model_id else "")
        )
        return
    if command == "select":
        summary = pipeline.select_from_scores(config, command_line)
        _print_summary(summary, config.run.output_dir)
        return
    context = pipeline.load_context(config, accelerator)
    embeddings = pipeline.embed_stage(context)
    if command == "embed":
        if accelerator.is_main_process:
            print(f"Embedded {len(embeddings)} rows; cache in {context.cache_dir}")
        return
    if command == "adapt":
        pipeline.adapt_stage(context, embeddings)
        if accelerator.is_main_process:
            print(f"Adapters in {context.output_dir / ADAPTER_DIR}")
        return
    model = pipeline.trained_model(context)
    embeddings = pipeline.scoring_embeddings(context, model, embeddings)
    if accelerator.is_main_process:
        scores, _ = pipeline.score_stage(context, model, embeddings)
        pipeline.write_scores(context.output_dir, scores)
        print(f"Scores of {len(scores)} rows in {context.output_dir / 'scores'}; next: hf-clipsel select")


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
    import platform

    import torch

    from .outputs import library_versions

    for name, version in library_versions().items():
        print(f"{name}: {version}")
    print(f"platform: {platform.platform()}")
    print(f"cpu threads: {torch.get_num_threads()}")
    print(f"cuda: {torch.cuda.is_available()} ({torch.cuda.device_count()} devices)")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            print(f"  cuda:{index}: {torch.cuda.get_device_name(index)}")
    print(f"mps: {torch.backends.mps.is_available()}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hf-clipsel: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # Raised inside peft's own calls into transformers 5; nothing a user can act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    try:
        if command == "demo":
            _demo(args)
        elif command == "env":
            _env()
        elif command == "report":
            from .report import main as report_main

            return report_main(args)
        else:
            _stage(command, args)
    except (ValueError, OSError, HubPushError) as error:
        # Input problems: one clear line, not a traceback.
        print(f"hf-clipsel {command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
