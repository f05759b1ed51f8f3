"""The ``vlmr`` command: one entry point, thin dispatch to each command's ``main(argv)``.

Each subcommand owns its typed config and ``--help``; this file only maps names to modules,
imported lazily so that ``vlmr inspect`` does not pay for importing DeepSpeed.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# name -> (module, function, one-line summary)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "synth": ("dataengine.synth", "main", "render the synthetic video world (videos + annotations)"),
    "build-shards": ("dataengine.build", "main", "videos + annotations -> curriculum-sorted WebDataset shards"),
    "inspect": ("tools.inspect", "main", "look inside a shard set: summary, ls, show, head, verify, report"),
    "narrate": ("train.narrate", "main", "caption each clip with the SFT model -> shards with narratives"),
    "judge": ("train.judge", "main", "sample two answers, judge them with context -> preference shards"),
    "generate-qa": ("train.generate_qa", "main", "object-centric QA from Video Localized Narratives by an LLM"),
    "models": ("dataengine.models_cli", "main", "build a preset's models (tiny, small) into the model cache and print where they are"),
}
GROUPS: dict[str, dict[str, tuple[str, str, str]]] = {
    "train": {
        "sft": ("train.sft", "main", "curriculum SFT of the video LMM (easy, then hard)"),
        "rm": ("train.rm", "main", "reward model from preference shards (Bradley-Terry)"),
        "ppo": ("train.ppo", "main", "PPO against the reward model, QLoRA policy"),
    },
    "eval": {
        "synthetic": ("train.eval.run", "synthetic_main", "exact scoring on the synthetic world"),
        "qa": ("train.eval.run", "qa_main", "open-ended video QA judged by an LLM"),
        "generative": ("train.eval.run", "generative_main", "the five-criteria generative benchmark"),
        "retrieval": ("train.eval.run", "retrieval_main", "text-to-video retrieval by CLIP score"),
        "action": ("train.eval.run", "action_main", "zero-shot action recognition by CLIP score"),
        "rm": ("train.eval.rm", "eval_main", "held-out pairwise accuracy of a reward model"),
    },
}


def _usage() -> str:
    lines = ["usage: vlmr COMMAND [options]   (vlmr COMMAND --help for each)", "", "commands:"]
    for name, (_, _, summary) in COMMANDS.items():
        lines.append(f"  {name:<14} {summary}")
    for group, subs in GROUPS.items():
        for name, (_, _, summary) in subs.items():
            lines.append(f"  {group + ' ' + name:<14} {summary}")
    return "\n".join(lines)


def _dispatch(target: tuple[str, str, str], prog: str, argv: list[str]) -> int:
    module_name, func_name, _ = target
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"vlmr: '{prog}' is not available in this version", file=sys.stderr)
            return 2
        raise
    try:
        return getattr(module, func_name)(argv, prog=f"vlmr {prog}") or 0
    except OSError as exc:  # a path that cannot be read or written, a full disk: one line, not a traceback
        where = f"{exc.filename}: {exc.strerror or exc}" if exc.filename else str(exc)
        print(f"vlmr {prog}: error: {where}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing ever downloads
    logging.basicConfig(level=os.environ.get("VLMR_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name in COMMANDS:
        return _dispatch(COMMANDS[name], name, rest)
    if name in GROUPS:
        subs = GROUPS[name]
        if not rest or rest[0] not in subs:
            print(f"usage: vlmr {name} {{{','.join(subs)}}} [options]", file=sys.stderr)
            return 2
        return _dispatch(subs[rest[0]], f"{name} {rest[0]}", rest[1:])
    print(f"vlmr: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
