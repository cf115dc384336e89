"""The run stops at the first non-finite loss or gradient norm, before that step's checkpoint.

With bf16 and DeepSpeed's lean settings (``check_grad_overflow: false``) nothing else notices: a NaN gradient
is clipped, fed to Adam and checkpointed, and ``checkpoint.keep_last`` then rotates the good checkpoints away.
The check costs nothing: it reads numbers the logging step already brought to the host (the loss, summed over
the ranks, and the global gradient norm, the same on every rank), so every rank stops at the same step.
"""

from __future__ import annotations

import math

from electra_scale.config import ConfigError


class Diverged(ConfigError):
    """The loss or the gradient norm is not finite. Exit 2 (electra_scale/cli.py), not the restartable 75: a
    requeue would resume from the last checkpoint with the same settings and diverge again."""


def check_finite(step: int, loss: float | None, grad_norm: float | None, lr: float, last_saved: int | None) -> None:
    """Raise ``Diverged`` naming the step and the way out when ``loss`` or ``grad_norm`` is NaN or infinite
    (None: not measured at this step)."""
    values = {"loss": loss, "grad norm": grad_norm}
    bad = [f"{name} {value}" for name, value in values.items() if value is not None and not math.isfinite(value)]
    if not bad:
        return
    since = f"the last checkpoint (step {last_saved})" if last_saved else "the start (no checkpoint was written)"
    raise Diverged(
        f"training diverged at step {step}: {' and '.join(bad)} at optim.lr {lr:.3g}; no checkpoint was written "
        f"for it. Lower optim.lr (or raise optim.warmup_steps) and re-run: the run resumes from {since}"
    )
