"""``electra-scale bench``: how fast a config trains here, and where the time goes (run.py has the whole story).

run.py      the command: which paths run, in which order, and the report's figures
paths.py    the timed training paths: bare PyTorch loop, DeepSpeed engine on a fixed batch, the real pretrain
data.py     synthetic shard sets, where they live, and the data path played as one rank of W
device.py   synchronisation, memory figures, the peak MFU is measured against
report.py   PathResult and the printed table
"""

from electra_scale.tools.bench.run import add_arguments, run, run_bench

__all__ = ["add_arguments", "run", "run_bench"]
