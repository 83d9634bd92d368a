"""The command line: ``lightning-hypergrad fit --config configs/quickstart.yaml`` (also ``lightning ...``).

A :class:`lightning.pytorch.cli.LightningCLI` over any :class:`BilevelModule` subclass and any data module;
``fit``, ``validate``, ``test``, ``predict`` and ``--print_config`` work as in Lightning.
"""

from __future__ import annotations

import os
import time

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from lightning_hypergrad.module import BilevelModule


class SaveConfigToRun(SaveConfigCallback):
    """Saves the run's full config in the run's own directory, never over a previous run's file.

    With a :class:`WandbLogger` it goes into the W&B run's files (uploaded by ``wandb sync``) and into the
    run's config; otherwise into the trainer's ``log_dir``, under a new name if a config is already there.
    """

    def __init__(self, parser, config, config_filename: str = "config.yaml", overwrite: bool = False, multifile=False):
        super().__init__(parser, config, config_filename, overwrite, multifile, save_to_log_dir=False)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        logger = trainer.logger
        filename = self.config_filename
        if isinstance(logger, WandbLogger):
            directory = logger.experiment.dir
            filename = f"lightning_{filename}"  # W&B keeps its own config.yaml in the same folder
            logger.experiment.config.update({"cli_config": self.parser.dump(self.config, skip_none=False)})
        else:
            directory = trainer.log_dir or os.getcwd()
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, filename)
        stem, ext = os.path.splitext(filename)
        stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
        while os.path.exists(path):  # runs started within the same second get -2, -3, ...
            suffix = stamp if n == 1 else f"{stamp}-{n}"
            path = os.path.join(directory, f"{stem}-{suffix}{ext}")
            n += 1
        self.parser.save(self.config, path, skip_none=False, multifile=self.multifile)


def cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the command line over ``args`` (``sys.argv`` when ``None``)."""
    return LightningCLI(
        BilevelModule,
        None,
        subclass_mode_model=True,
        save_config_callback=SaveConfigToRun,
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
