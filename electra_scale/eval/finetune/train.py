"""Fine-tuning one model for one seed: the classifier on the encoder, layer-wise LR decay, dev selection, scores."""

from __future__ import annotations

import math
import time

import numpy as np

from electra_scale.eval.finetune.settings import FinetuneConfig
from electra_scale.eval.finetune.source import Encoded, ModelSource, batch_tensors, default_device
from electra_scale.eval.tasks import TaskData, score


def layer_depth(name: str, num_layers: int) -> int:
    """0 for the embeddings (and their projection), i + 1 for encoder layer i, num_layers + 1 for the head."""
    if name.startswith(("electra.embeddings.", "electra.embeddings_project.")):
        return 0
    if name.startswith("electra.encoder.layer."):
        return int(name.split(".")[3]) + 1
    if name.startswith("electra."):
        raise ValueError(f"no layer-wise learning rate rule for parameter {name}")
    return num_layers + 1


def layerwise_param_groups(model, lr: float, layer_decay: float, weight_decay: float) -> list[dict]:
    """One optimizer group per (depth, decay or not): lr * layer_decay ** (num_layers + 1 - depth).

    The head (depth L + 1) gets lr, the top layer lr * d, the embeddings lr * d ** (L + 1). The reference uses
    the exponent L + 2 - depth with the head at depth L + 2 (google-research/electra#51), which gives the top
    layer lr * d ** 2: fixed here."""
    from electra_scale.engine.optim import NO_DECAY

    num_layers = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth = layer_depth(name, num_layers)
        decay = not any(key in name for key in NO_DECAY)
        group = groups.setdefault(
            (depth, decay),
            {
                "params": [],
                "names": [],
                "depth": depth,
                "lr": lr * layer_decay ** (num_layers + 1 - depth),
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_classifier(source: ModelSource, task: TaskData):
    from transformers import ElectraForSequenceClassification
    from transformers.utils import logging as hf_logging

    num_labels = 1 if task.regression else len(task.labels)
    problem = "regression" if task.regression else "single_label_classification"
    if source.path is None:
        from electra_scale.engine.model import discriminator_config

        config = discriminator_config(source.config.model)
        config.num_labels, config.problem_type = num_labels, problem
        return ElectraForSequenceClassification(config)
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per seed says nothing
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier weights" is the point of fine-tuning
    try:
        return ElectraForSequenceClassification.from_pretrained(
            source.path, num_labels=num_labels, problem_type=problem
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def _predict(model, enc: Encoded, pad_id: int, batch_size: int, regression: bool) -> np.ndarray:
    import torch

    model.eval()
    device = next(model.parameters()).device
    order = np.argsort([len(x) for x in enc.ids], kind="stable")  # batches of similar length: little padding
    out = np.empty(len(order), np.float32 if regression else np.int64)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask, types, _ = batch_tensors(enc, idx, pad_id, device)
            logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
            out[idx] = (logits[:, 0] if regression else logits.argmax(-1)).float().cpu().numpy()
    return out


def finetune_seed(
    source: ModelSource,
    task: TaskData,
    data: dict[str, Encoded],
    train_idx: np.ndarray,
    cfg: FinetuneConfig,
    seed: int,
    pad_id: int,
) -> dict:
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from electra_scale.engine.optim import electra_lr_factor

    started = time.perf_counter()
    torch.manual_seed(seed)
    device = default_device()
    model = build_classifier(source, task).to(device)
    groups = layerwise_param_groups(model, cfg.lr, cfg.layer_decay, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_frac * total)
    sched = LambdaLR(opt, lambda step: electra_lr_factor(step, warmup, total))
    rng = np.random.default_rng([seed, 1])
    # Dev after every epoch; the test split (when labelled) only once, with the weights of the best dev epoch.
    select = "test" in data
    history, best, best_state = [], None, None
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = rng.permutation(train_idx)
        for start in range(0, len(order), cfg.batch_size):
            ids, mask, types, labels = batch_tensors(
                data["train"], order[start : start + cfg.batch_size], pad_id, device
            )
            loss = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
        dev = _score(model, task, data["dev"], pad_id, cfg)
        history.append({"epoch": epoch, "dev": dev})
        if select and (best is None or dev[task.main_metric] > best["dev"][task.main_metric]):  # ties: earliest
            best = history[-1]
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if not select:  # GLUE: test labels are hidden; the last epoch's dev score, as the reference reports
        pick = {"epoch": cfg.epochs, "dev": history[-1]["dev"]}
    else:
        model.load_state_dict(best_state)
        pick = {"epoch": best["epoch"], "dev": best["dev"], "test": _score(model, task, data["test"], pad_id, cfg)}
    extra = {s: _score(model, task, data[s], pad_id, cfg) for s in data if s not in ("train", "dev", "test")}
    if not task.regression:  # the collapse a few labels can cause: one class predicted for everything
        report = data["test" if select else "dev"]
        extra["one_class"] = bool(len(np.unique(_predict(model, report, pad_id, cfg.eval_batch_size, False))) == 1)
    wall = round(time.perf_counter() - started, 2)
    return {"seed": seed, **pick, **extra, "history": history, "wall_s": wall}


def _score(model, task: TaskData, enc: Encoded, pad_id: int, cfg: FinetuneConfig) -> dict[str, float]:
    return score(task, enc.labels, _predict(model, enc, pad_id, cfg.eval_batch_size, task.regression))
