"""``electra-scale compare``: ELECTRA vs MLM at equal pretraining FLOPs, scored downstream (run.py has the story).

run.py      the command and the driver: plan, pretrain both, evaluate every checkpoint, report
spec.py     the spec (read through config.read_layered) and each objective's run config at the budget
plan.py     the steps: shards, the pretraining runs (subprocesses of the real CLI), downstream scores
report.py   the rows, the paired verdict, markdown and the plot
"""

from electra_scale.tools.compare.plan import disc_health
from electra_scale.tools.compare.run import add_arguments, compare, run
from electra_scale.tools.compare.spec import load_spec, run_config

__all__ = ["add_arguments", "compare", "disc_health", "load_spec", "run", "run_config"]
