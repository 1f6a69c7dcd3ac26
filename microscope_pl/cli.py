"""The `microscope` command.

`fit`, `validate`, `test` and `predict` go to LightningCLI (configs under
`configs/`); everything else (`data`, `latents`, `run`, `generate`, `eval`, `bench`)
is a plain argparse subcommand. Errors a user can fix print one
line and exit 2; set MICROSCOPE_DEBUG=1 for the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
DEFAULT_RUN = "synth"  # phases.DEFAULT_RUN, written out so `microscope --help` does not import torch


def _user_errors() -> tuple[type[BaseException], ...]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from microscope_pl.checkpointing import CheckpointError

    return (CheckpointError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
            MisconfigurationException)


def model_args_named(argv: Sequence[str]) -> list[str]:
    """Model hyper-parameters given on a LightningCLI command line (`--model.init_args.X`, `--model.X`)."""
    keys = []
    for token in argv:
        for prefix in ("--model.init_args.", "--model."):
            if token.startswith(prefix):
                key = token[len(prefix):].split("=", 1)[0]
                if key not in ("class_path", "init_args", "dict_kwargs"):
                    keys.append(key)
                break
    return keys


def apply_run(config: Any) -> None:
    """Fill the run folders into a parsed fit/test config (jsonargparse Namespace): the
    ModelCheckpoint callbacks without a dirpath write to checkpoints/<run>/<phase>/, the
    TensorBoard logger without a name to logs/<run>/<phase>/, and an upstream checkpoint
    path left empty is looked for in checkpoints/<run>/<upstream phase>/."""
    from microscope_pl.phases import checkpoint_dir, check_run_name, phase_of_module, upstream_argument

    run = check_run_name(config.get("run") or DEFAULT_RUN)
    model = config.get("model")
    class_path = model.get("class_path") if model is not None else None
    phase = phase_of_module(class_path) if class_path else None
    if phase is None:
        return
    trainer = config.get("trainer")
    for callback in (trainer.get("callbacks") or []) if trainer is not None else []:
        if str(callback.get("class_path", "")).endswith("ModelCheckpoint") and not callback.init_args.get("dirpath"):
            callback.init_args.dirpath = str(checkpoint_dir(phase, run))
    logger = trainer.get("logger") if trainer is not None else None
    for item in logger if isinstance(logger, list) else [logger]:
        if item is not None and hasattr(item, "init_args") and str(item.get("class_path", "")).endswith(
                "TensorBoardLogger") and item.init_args.get("name") in (None, "lightning_logs"):
            item.init_args.name = f"{run}/{phase}"
    found = upstream_argument(class_path, model.get("init_args") or {})
    if found is not None:
        key, upstream = found
        if not model.init_args.get(key) and not model.init_args.get("upstream"):
            model.init_args[key] = str(checkpoint_dir(upstream, run))


def refuse_other_settings(ckpt: dict[str, Any], path: Any, model: Any) -> None:
    """Refuse, in one line, to resume a checkpoint whose network settings, image size or
    audio features are not those of the configured `model`."""
    from microscope_pl.checkpointing import CheckpointError
    from microscope_pl.phases import checkpoint_record, first_difference, normalized_networks

    ours = model.checkpoint_record() if hasattr(model, "checkpoint_record") else None
    if ours is None:
        return
    if ckpt.get("microscope_phase") != getattr(model, "phase", None):
        raise CheckpointError(f"{path} is a {ckpt.get('microscope_phase') or 'foreign'} checkpoint, "
                              f"this config trains {model.phase}")
    theirs = dict(checkpoint_record(ckpt, path))
    theirs["networks"], ours = normalized_networks(theirs.get("networks")), dict(ours)
    ours["networks"] = normalized_networks(ours.get("networks"))
    for key in ("image_size", "audio_features", "networks"):
        diff = first_difference(theirs.get(key), ours.get(key), key)
        if diff:
            raise CheckpointError(f"{path} was trained with other settings than this config ({diff}); "
                                  "use another --run, or pass the checkpoint's settings")


def _lightning_cli(argv: list[str] | None) -> int:
    """Run LightningCLI on `argv` (None: sys.argv, as the console script)."""
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    from microscope_pl.checkpointing import CheckpointError, read_checkpoint
    from microscope_pl.phases import find_checkpoint, phase_of_module, read_phase_checkpoint, upstream_argument

    class MicroscopeCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_argument("--run", type=str, default=DEFAULT_RUN,
                                help="run name: checkpoints go to checkpoints/<run>/<phase>/, logs to "
                                     "logs/<run>/<phase>/, and upstream phases are found in checkpoints/<run>/")

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand]
            apply_run(config)
            model = config.get("model")
            init_args = (model.get("init_args") or {}) if model is not None else {}
            found = upstream_argument(model.get("class_path", ""), init_args) if model is not None else None
            if found and init_args.get(found[0]) and not init_args.get("upstream"):
                # missing, truncated, not weights-only or of another phase: one line now, not a
                # parser dump when the module is instantiated
                read_phase_checkpoint(find_checkpoint(found[1], init_args[found[0]]), found[1])

        def _run_subcommand(self, subcommand: str) -> None:
            """`fit` holds its checkpoint folders (run_lock) from before the resume check to the end,
            so a second run into the same folder refuses in one line; rank 0 holds them for all."""
            from microscope_pl.run_lock import holding

            folders = [c.dirpath for c in self.trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
            if subcommand != "fit" or self.trainer.global_rank != 0 or self.trainer.fast_dev_run:
                folders = []
            with holding(folders):
                super()._run_subcommand(subcommand)

        def before_fit(self) -> None:
            """Resume from `<checkpoint dir>/last.ckpt` when no ckpt_path is given; either way the
            checkpoint's settings must be the config's."""
            config = self.config_init[self.subcommand]
            if config.get("ckpt_path"):
                refuse_other_settings(read_checkpoint(config["ckpt_path"]), config["ckpt_path"], self.model)
                return
            if self.trainer.fast_dev_run:
                # Lightning 2.6 still writes save_last at train end under fast_dev_run; a
                # smoke run must not leave a last.ckpt that the next real run resumes from
                for callback in self.trainer.checkpoint_callbacks:
                    callback.save_last = False
            callback = self.trainer.checkpoint_callback
            dirpath = getattr(callback, "dirpath", None)
            if dirpath and not self.trainer.fast_dev_run:
                last = Path(dirpath) / "last.ckpt"
                if last.exists():  # a truncated file or other settings fail here with one line
                    refuse_other_settings(read_checkpoint(last), last, self.model)
                    print(f"resuming from {last}", flush=True)
                    config["ckpt_path"] = str(last)

        def _parse_ckpt_path(self) -> None:
            """Lightning puts a checkpoint's hyper-parameters over the whole config, so
            `test --model.init_args.audio_scale 3 --ckpt_path ...` would silently sample
            with the trained scale: settings named on the command line win here."""
            sub = self.config.get("subcommand")
            path = self.config[sub].get("ckpt_path") if sub else None
            if path and path not in ("best", "last", "hpc"):
                # test/validate/fit: refused in one line before Lightning reads it (its parser would dump
                # the whole namespace for a checkpoint of another phase)
                theirs = read_checkpoint(path).get("microscope_phase")
                model = self.config[sub].get("model")
                ours = phase_of_module(model.get("class_path", "")) if model is not None else None
                if ours is not None and theirs != ours:
                    raise CheckpointError(f"{path} is a {theirs or 'foreign'} checkpoint, this config's model "
                                          f"is {ours}; pass a {ours} checkpoint or that phase's config")
            named = {}
            for key in model_args_named(sys.argv[1:] if argv is None else argv):
                try:
                    named[key] = self.config[f"{sub}.model.init_args.{key}"]
                except KeyError:
                    continue
            super()._parse_ckpt_path()
            for key, value in named.items():
                self.config[f"{sub}.model.init_args.{key}"] = value

    MicroscopeCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"prog": "microscope"},
    )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # a DDP process group left alive can abort the interpreter at exit (gloo: "terminate
        # called without an active exception"), failing a run that finished
        dist.destroy_process_group()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microscope",
        description="MICROSCOPE talking-head generation. Training: microscope {fit,validate,test,predict} "
        "--config configs/<phase>.yaml (LightningCLI; add --help for every option).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name} (see `microscope {name} --help`)", add_help=False)

    run = sub.add_parser("run", help="train the phases in order, skipping finished ones")
    run.add_argument("--until", default="diffusion", help="last phase to run (phase1, phase2, pbnet, diffusion)")
    run.add_argument("--only", default=None, help="run just this phase")
    run.add_argument("--force", action="store_true", help="train a phase even if its last.ckpt exists")
    run.add_argument("--overlays", default=None, metavar="DIR",
                     help="folder of per-phase overlay configs added to the base ones (e.g. configs/real)")
    run.add_argument("--run", dest="run_name", default=None,
                     help="run name (checkpoints/<run>/<phase>/; default: the configs' run)")
    run.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed to every `fit`, after --")
    run.set_defaults(func=_run_phases)

    for module in (  # each feature package registers its own subcommands
        "microscope_pl.data.cli",
        "microscope_pl.data.latent_cache",
        "microscope_pl.metrics.evaluate",
        "microscope_pl.inference.cli",
        "microscope_pl.inference.bench",
        "microscope_pl.inference.export",
        "microscope_pl.inference.app",
    ):
        importlib.import_module(module).register(sub)
    return parser


def _run_phases(args: argparse.Namespace) -> int:
    from microscope_pl.phases import run_phases

    extra = [a for a in args.extra if a != "--"]
    return run_phases(args.until, extra, force=args.force, only=args.only, run=args.run_name,
                      overlays=args.overlays)


def _guard(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except _user_errors() as err:
        if os.environ.get("MICROSCOPE_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return _guard(lambda: _lightning_cli(None if from_console else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not argv else 2
    return _guard(lambda: int(args.func(args) or 0))


if __name__ == "__main__":
    sys.exit(main())
