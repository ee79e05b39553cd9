"""The `unigrpo` command line: one sub-command per job, each taking CONFIG [key=value ...].

CONFIG is a YAML file or ``builtin:NAME``, a config shipped in the package (`unigrpo configs`).
Every failure a user can meet is ONE line on stderr, ``unigrpo: MESSAGE`` naming the file / key /
reward / rank, and an exit status: 2 bad input, 1 a run that failed, 130 Ctrl-C (``_exit_code``;
docs/reliability.md). ``--debug`` (anywhere on the line) or ``UNIGRPO_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import yaml

from unigrpo.config import ConfigError, builtin_configs, load_config, resolve_rewards, to_dict
from unigrpo.utils.errors import InputError, RunError


def _load(args: argparse.Namespace, runs: bool = True):
    """The validated config, reward names resolved; ``runs``: also checks this machine can run it."""
    cfg = resolve_rewards(load_config(args.config, args.overrides))
    if runs:
        import torch

        try:
            device = torch.device(cfg.device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"device: {cfg.device!r} is not a torch device (cpu, cuda, cuda:0)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device: {cfg.device!r} but this torch build / machine has no CUDA (use device=cpu)")
    return cfg


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs="?" if not required else None,
                   help="YAML config file or builtin:NAME (list: unigrpo configs); omit to use the defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config keys, e.g. algo.group_size=8 sampler.num_steps=10")


def cmd_configs(args: argparse.Namespace) -> int:
    shipped = builtin_configs()
    width = max(len(name) for name in shipped) + len("builtin:")
    for name, description in shipped.items():
        print(f"{'builtin:' + name:<{width}}  {description}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from unigrpo.tasks import PromptsTask, build_task

    cfg = _load(args, runs=False)
    task = build_task(cfg)  # reads and checks the prompt files
    if args.print:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    algo = cfg.algo
    prompts = (f", {len(task.train)} training / {len(task.eval)} evaluation prompts"
               if isinstance(task, PromptsTask) else "")
    print(f"ok: {args.config or 'defaults'} (model {cfg.model.kind}, task {cfg.task.kind}{prompts}; "
          f"{algo.prompts_per_step} prompts x {algo.group_size} trajectories = "
          f"{algo.prompts_per_step * algo.group_size} trajectories per step)")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from unigrpo.recipes.pretrain import pretrain

    cfg = _load(args)
    out = args.out
    model = pretrain(cfg, out, log_path=str(out) + ".log.jsonl")
    print(f"saved {out}")
    if args.eval:
        from unigrpo.tasks.shapes import MODES, eval_tasks, evaluate_model, format_table, write_eval

        tasks = eval_tasks(cfg)
        results = {}
        for mode in MODES:
            results[mode], gen = evaluate_model(model.eval(), tasks, cfg, mode)
            write_eval(args.eval, f"sft_{mode}", results[mode], gen, tasks, cfg.eval.grid_prompts)
        print(format_table(results))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from unigrpo.models import build_model
    from unigrpo.tasks import build_task

    cfg = _load(args)
    _check_out_dir(args.out)
    model = build_model(cfg, checkpoint=args.checkpoint) if args.checkpoint else build_model(cfg)
    print(build_task(cfg).report(model, cfg, args.mode, Path(args.out) if args.out else None))
    return 0


def _fail(msg: str) -> int:
    print(f"unigrpo: {msg}", file=sys.stderr)
    return 2


def _check_out_dir(out) -> None:
    """``--out DIR`` must be a directory we can write (checked before the model loads)."""
    from pathlib import Path

    if out is None:
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: {parent} is not writable")


def cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from unigrpo.models import build_model
    from unigrpo.sampling import generate
    from unigrpo.tasks import Prompt
    from unigrpo.utils.images import read_image, resize_images, save_grid

    if not args.prompt.strip():
        return _fail("the prompt is empty")
    if args.n < 1:
        return _fail(f"--n must be >= 1, got {args.n}")
    if not str(args.out).lower().endswith(".png"):
        return _fail(f"--out {args.out}: must be a .png file")
    pixels = []
    for name in args.image or []:  # read before the model is built: a bad file costs nothing
        if not Path(name).is_file():
            return _fail(f"--image {name}: not found")
        try:
            pixels.append(read_image(name))
        except ValueError as e:
            return _fail(f"--image {name}: {e}")
    _check_out_dir(Path(args.out).parent)
    cfg = _load(args)
    model = build_model(cfg, checkpoint=args.checkpoint) if args.checkpoint else build_model(cfg)
    try:
        model.validate_prompts([args.prompt], cfg.text.max_reasoning_tokens)  # e.g. the tiny model's vocabulary
    except ValueError as e:
        return _fail(str(e))
    prompt, inputs = Prompt(args.prompt), None
    if pixels:
        if not (model.sees_images or model.edits):
            return _fail(f"--image: model.kind={cfg.model.kind!r} as configured neither sees nor edits images "
                         "(e.g. --config builtin:demo_edit)")
        inputs = torch.cat([resize_images(x[None], model.input_image_size) for x in pixels])
        prompt = prompt.with_images(inputs)
    gen = generate(model, [prompt] * args.n, thinking=cfg.text.thinking,
                   num_steps=cfg.sampler.eval_num_steps, shift=cfg.sampler.shift,
                   cfg_scale=cfg.sampler.eval_cfg_scale, seed=args.seed,
                   max_new_tokens=cfg.text.max_reasoning_tokens, temperature=cfg.text.temperature)
    for i, text in enumerate(gen.reasoning):
        print(f"[{i}] {text}" if cfg.text.thinking else f"[{i}] (thinking off)")
    shown, labels = gen.images, None
    if inputs is not None:  # the input(s) first, then the samples: what changed is seen at a glance
        shown = torch.cat([inputs, gen.images])
        labels = [f"in{j}" for j in range(len(inputs))] + [str(i) for i in range(args.n)]
    path = save_grid(shown, args.out, nrow=min(len(shown), 8), scale=4, labels=labels)
    print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from unigrpo.recipes.demo import DEMO_CONFIG, run_demo

    args.config = args.config or DEMO_CONFIG
    run_demo(_load(args))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from unigrpo.recipes.train import train

    cfg = _load(args)
    train(cfg, resume=args.resume, overwrite=args.overwrite)
    return _skipped_summary(cfg)


def _skipped_summary(cfg) -> int:
    """After a run that skipped steps (``on_failure: skip``): one line saying how many and which;
    exit 1 when more than ``max_skipped_share`` of the steps were skipped (the run finished and
    saved, but trained on too little to be trusted)."""
    from pathlib import Path

    from unigrpo.utils.logging import skipped_steps

    count, steps = skipped_steps(Path(cfg.output_dir) / "metrics.jsonl")
    if not count:
        return 0
    which = (f": step(s) {', '.join(map(str, steps[:20]))}{', ...' if len(steps) > 20 else ''}"
             if len(steps) == count else f"; not every step is logged (log_every={cfg.log_every})")
    line = f"{count} of {cfg.steps} steps skipped (rewards missing, on_failure=skip){which}"
    failed = count / max(cfg.steps, 1) > cfg.max_skipped_share
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 speaks, every rank exits alike
        print(f"unigrpo: {line}: more than max_skipped_share={cfg.max_skipped_share:g}; the run is saved, but "
              "check the reward service" if failed else f"[unigrpo] {line}", file=sys.stderr)
    return int(failed)


def cmd_serve_reward(args: argparse.Namespace) -> int:
    from unigrpo.rewards.server import serve

    try:
        kwargs = yaml.safe_load(args.kwargs) if args.kwargs else {}
        if not isinstance(kwargs, dict):
            return _fail(f"--kwargs: expected a mapping such as '{{threshold: 0.5}}', got {args.kwargs!r}")
        serve(args.reward, kwargs, host=args.host, port=args.port, max_batch=args.max_batch,
              max_queue=args.max_queue, workers=args.workers, max_body_mb=args.max_body_mb, token=args.token)
    except (ValueError, TypeError, RuntimeError, yaml.YAMLError) as e:
        return _fail(str(e).splitlines()[0])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from unigrpo.export import export

    out = export(args.source, args.out, args.format, overwrite=args.overwrite, overrides=args.overrides,
                 device=args.device)
    print(f"exported {args.source} to {out} (README.md says how to load it)")
    return 0


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a trained policy in the formats diffusers / transformers / peft / "
                                      "Bagel load (docs/after_training.md)")
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory (its final.safetensors) or a "
                                                                   "weight file written by unigrpo")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="change the recorded model section, e.g. model.pipeline=/new/place of the base")
    p.add_argument("--out", required=True, help="folder to write (must be empty or absent)")
    p.add_argument("--format", default=None, choices=["lora", "merged"],
                   help="lora: adapters in diffusers / peft format; merged: whole weights (default: lora for "
                        "a LoRA run, merged otherwise)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--device", default="cpu", help="where to load and merge (default cpu)")
    p.set_defaults(func=cmd_export)


def _add_serve_reward_parser(sub) -> None:
    p = sub.add_parser("serve-reward", help="serve a reward over HTTP (POST /score, GET /health, /info; "
                                            "docs/rewards.md; needs the 'serve' extra)")
    p.add_argument("reward", help="a built-in reward name or a dotted path pkg.module:callable")
    p.add_argument("--kwargs", default=None, help="factory kwargs as YAML/JSON, e.g. '{threshold: 0.5}'")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=256, help="most images in one request (larger: 400)")
    p.add_argument("--max-queue", type=int, default=8, help="requests waiting or running (more: 503)")
    p.add_argument("--workers", type=int, default=1, help="threads running the reward")
    p.add_argument("--max-body-mb", type=float, default=1024.0, help="largest request body (larger: 413)")
    p.add_argument("--token", default=None, help="shared secret the client must send (default: "
                                                 "$UNIGRPO_REWARD_TOKEN; none: anyone who reaches the port)")
    p.set_defaults(func=cmd_serve_reward)


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="UniGRPO RL training (data parallel: "
                                     "torchrun --nproc_per_node=N -m unigrpo.cli train ...)")
    _add_config_args(p, required=False)
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT_DIR/checkpoint.pt (= an uninterrupted run; what may change: "
                        "docs/reliability.md)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in OUTPUT_DIR (without it a new run refuses such a directory)")
    p.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unigrpo",
        description="UniGRPO: RL post-training of unified reason-then-draw models "
                    "(GRPO on reasoning tokens + FlowGRPO on flow-matching steps).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("validate", help="check a config (types, unknown keys, combinations) without running it")
    _add_config_args(p)
    p.add_argument("--print", action="store_true", help="print the fully resolved config as YAML")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("configs", help="list the shipped configs (use them as builtin:NAME)")
    p.set_defaults(func=cmd_configs)
    _add_train_parser(sub)
    _add_serve_reward_parser(sub)
    _add_export_parser(sub)

    p = sub.add_parser("pretrain", help="supervised (SFT) training of the tiny model from scratch")
    _add_config_args(p, required=False)
    p.add_argument("--out", default="runs/pretrain/tiny_sft.safetensors", help="checkpoint path to write")
    p.add_argument("--eval", metavar="DIR", default=None,
                   help="afterwards, evaluate (think / no_think / gt reasoning) and write results to DIR")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="held-out accuracy (overall + per category) with image grids")
    _add_config_args(p, required=False)
    p.add_argument("--checkpoint", default=None, help="model weights (default: model.checkpoint)")
    p.add_argument("--mode", default="think", choices=["think", "no_think", "gt", "all"],
                   help="own reasoning, no reasoning, ground-truth reasoning, or all three")
    p.add_argument("--out", default=None, help="directory for metrics JSON, grids and sampled reasoning")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the built-in demo: UniGRPO from the shipped SFT checkpoint + report")
    _add_config_args(p, required=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sample", help="reason about one prompt, print the reasoning, write the image(s)")
    p.add_argument("prompt", help='e.g. "a square the color of a lemon"')
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--config", default=None, help="YAML config file or builtin:NAME")
    p.add_argument("--checkpoint", default=None, help="model weights (default: model.checkpoint)")
    p.add_argument("--n", type=int, default=4, help="how many samples")
    p.add_argument("--seed", type=int, default=0, help="noise + reasoning seed")
    p.add_argument("--out", default="sample.png", help="PNG to write")
    p.add_argument("--image", action="append", metavar="PNG",
                   help="an input image (repeat for several): the prompt is an instruction about it, "
                        "for a model that sees or edits images")
    p.set_defaults(func=cmd_sample)
    return parser


def _overrides_from(args: argparse.Namespace) -> None:
    """Allow `unigrpo cmd key=value` with no config file: a first positional with '=' is an override."""
    cfg = getattr(args, "config", None)
    if not hasattr(args, "overrides"):
        return
    if cfg is not None and "=" in cfg and not cfg.endswith((".yaml", ".yml")):
        args.overrides = [cfg, *args.overrides]
        args.config = None


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_CONFIG_KEY = re.compile(r"^(model|task|text|sampler|algo|eval|rewards)(\[\d+\])?\.[\w.\[\]]+: ")


def _exit_code(e: BaseException) -> tuple[int, str]:
    """The error -> (exit status, one-line message) mapping of every sub-command."""
    from unigrpo.utils import dist

    if isinstance(e, ConfigError) or isinstance(e, (ValueError, NotImplementedError)) and _CONFIG_KEY.match(str(e)):
        return 2, f"config error: {e}"  # an adapter's check at build time names the key it refuses: bad input
    if isinstance(e, (InputError, RunError)):
        return e.exit_code, str(e)
    if isinstance(e, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return 2, str(e)
    if type(e).__module__.startswith("unigrpo.rewards"):  # e.g. RewardServiceError: names the service
        return 1, str(e)
    if (timeout := dist.as_rank_timeout(e)) is not None:
        return timeout.exit_code, str(timeout)
    if isinstance(e, OSError):
        return 1, f"{type(e).__name__}: {e}"
    return 1, f"failed: {type(e).__name__}: {e} (run with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("UNIGRPO_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    # argparse stops collecting positionals at the first option, so `sample "p" --n 8 threads=1`
    # leaves `threads=1` over: accept such trailing key=value tokens as overrides.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    _overrides_from(args)
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as e:
        if debug:
            raise
        code, msg = _exit_code(e)
        _close_bars()
        print(f"unigrpo: {_one_line(msg)}", file=sys.stderr)
        return code


def _close_bars() -> None:
    """A progress bar left open by the failure ends its line first: the message gets its own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
