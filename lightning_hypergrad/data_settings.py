"""Settings shared between a :class:`~lightning_hypergrad.BilevelModule` and its data module, as a mixin."""

from __future__ import annotations

import copy


class DataSettings:
    """:meth:`settings_from_data`: the one mechanism between a module and its data module."""

    def settings_from_data(self, *names: str) -> None:
        """Share the settings ``names`` with the data module: the one mechanism between a module and its data.

        Each setting that is ``None`` on the module takes the data module's attribute of that name; a setting given
        on both sides must agree. Call it in ``setup`` (:meth:`~lightning_hypergrad.BilevelModule.setup` does for
        ``meta_batch_size``,
        :class:`~lightning_hypergrad.FewShotClassifier` for ``ways`` and ``image_shape``). The values taken are
        stored as ``save_hyperparameters`` stores them, so loggers and checkpoints see them, Lightning finds no
        conflict with the data module's hyperparameters, and ``load_from_checkpoint`` rebuilds the same module.

        Raises:
            ValueError: a setting set on neither side, or set differently on both (the message names it).
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        owner = type(self).__name__
        taken = {}
        for name in names:
            theirs = getattr(datamodule, name, None)
            theirs = tuple(theirs) if isinstance(theirs, (list, tuple)) else theirs
            ours = getattr(self, name)
            if theirs is None:
                if ours is None:
                    raise ValueError(f"{owner} {name} is not set and the data module has no `{name}`: set model {name}")
                continue
            if ours is not None and ours != theirs:
                raise ValueError(
                    f"{owner} {name}={ours} disagrees with the data module's {name}={theirs}; set model {name} to "
                    f"{theirs}, or remove it from the config (it is then taken from the data)"
                )
            setattr(self, name, theirs)
            taken[name] = theirs
        if taken:  # what save_hyperparameters stores, without its search of the callers' frames for __init__
            # arguments: outside __init__, Lightning before 2.6 fails there with a KeyError
            self.hparams.update(taken)
            if getattr(self, "_hparams_initial", None) is not None:  # what the loggers are given
                self._hparams_initial.update(copy.deepcopy(taken))
