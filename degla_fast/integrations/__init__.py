"""Our loss inside other trainers: one module per trainer, the only place that touches its internals.

* :mod:`degla_fast.integrations.open_clip`: ``use_degla_loss()`` / ``restore()`` for open_clip's
  ``open_clip_train``; ``python -m degla_fast.integrations.open_clip_train ARGS...`` runs its
  ``main(ARGS)`` with our loss, and with ``--num-negatives K`` trains DeGLA itself (hard negatives
  from a CSV column, the EMA teacher).
* :mod:`degla_fast.integrations.transformers`: Hugging Face ``CLIPModel`` under
  ``transformers.Trainer`` (collator, trainer, EMA teacher callback).
"""


def unwrap(model):
    """The model a trainer wrapped (DDP and its kin keep it as ``.module``): whose parameters the
    optimiser steps and whose ``logit_scale`` the loss reads."""
    return model.module if hasattr(model, "module") else model
