"""``electra-scale finetune``: fine-tune (or probe) a pretrained discriminator, or the same shape from random init,
on a downstream task over several seeds (run.py has the command and the driver).

run.py       the command: load the task and the model, run the seeds, summarise
settings.py  FinetuneConfig (the reference's recipe by default) and the tasks' cache
source.py    what is fine-tuned (export, checkpoint or random init) and the task encoded into batches
train.py     one seed of fine-tuning: the classifier, layer-wise LR decay, dev selection
probe.py     the linear probe on frozen mean-pooled features
"""

from electra_scale.eval.finetune.run import add_arguments, evaluate_model, format_result, load_task, mean_std, run
from electra_scale.eval.finetune.settings import DEFAULT_CACHE, FinetuneConfig
from electra_scale.eval.finetune.source import ModelSource, load_tokenizer_for
from electra_scale.eval.finetune.train import layer_depth, layerwise_param_groups

__all__ = [
    "DEFAULT_CACHE",
    "FinetuneConfig",
    "ModelSource",
    "add_arguments",
    "evaluate_model",
    "format_result",
    "layer_depth",
    "layerwise_param_groups",
    "load_task",
    "load_tokenizer_for",
    "mean_std",
    "run",
]
