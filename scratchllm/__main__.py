"""`scratchllm <command>` / `python -m scratchllm <command>`: one entry point for every stage and tool.

Each command lives in its own module as `main(argv: list[str]) -> int`; this file only dispatches,
importing lazily so `scratchllm --help` stays instant. It is also the one place where the project's own errors
(`errors.UserError`: a bad setting, data file, checkpoint or tokenizer) become one line on stderr and exit code 2;
`--debug` anywhere on the command line shows their traceback instead. Ctrl-C exits with 130, after the training
loop has saved its checkpoint, without a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import importlib
import sys

from scratchllm.errors import UserError

# command -> (module, one-line help). Order follows the data flow.
COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("scratchllm.tokenizer.cli", "train the byte-level BPE tokenizer on the bundled corpus"),
    "model": ("scratchllm.model.cli", "model info: parameter counts per part and FLOPs per token"),
    "pretrain": ("scratchllm.train.stages.pretrain", "pretrain a GPT on the bundled text corpus"),
    "sft": ("scratchllm.train.stages.sft", "supervised fine-tuning on chat conversations"),
    "reward": ("scratchllm.train.stages.reward", "train a reward model on preference pairs (Bradley-Terry)"),
    "dpo": ("scratchllm.train.stages.dpo", "direct preference optimisation against a frozen reference"),
    "ppo": ("scratchllm.train.stages.ppo", "RLHF with PPO against the reward model"),
    "grpo": ("scratchllm.train.stages.grpo", "GRPO with verifiable rewards"),
    "distill": ("scratchllm.train.stages.distill", "knowledge distillation from a teacher checkpoint"),
    "eval-tasks": ("scratchllm.eval.tasks_cli", "held-out task pass@1 of checkpoints, paired (won, lost, McNemar p)"),
    "pipeline": ("scratchllm.pipeline", "run every stage end to end and write a report"),
    "generate": ("scratchllm.infer.generate_cli", "generate text from a checkpoint"),
    "chat": ("scratchllm.infer.chat_cli", "interactive multi-turn chat with a checkpoint"),
    "serve": ("scratchllm.infer.server", "OpenAI-compatible HTTP server with a web chat page"),
    "export": ("scratchllm.export.hf", "export a checkpoint to the Hugging Face format"),
    "import-hf": ("scratchllm.export.import_hf", "import a local Llama-family Hugging Face checkpoint"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: scratchllm <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "`scratchllm <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from scratchllm import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"scratchllm: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    debug = "--debug" in rest
    rest = [arg for arg in rest if arg != "--debug"]
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except UserError as err:
        if debug:
            raise
        message = " ".join(str(err).split())  # one line, whatever the message's own layout
        print(f"scratchllm {command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\nscratchllm {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
