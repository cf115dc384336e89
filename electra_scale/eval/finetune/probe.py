"""The linear probe: a frozen encoder's mean-pooled features and a logistic (or ridge) regression on them.

Which layer: the probe reads every layer's mean-pooled states (the embeddings' output and each encoder layer's)
and picks, per seed, the layer and the L2 strength with the best dev score; the test score is that pick's.
A small pretrained encoder's last layer is often not its most linearly useful one (ELECTRA's discriminator
specialises its top layer to replaced-token detection), and a random encoder's embeddings can beat its upper
layers: the best layer on dev gives each model its own best reading, chosen without the test set."""

from __future__ import annotations

import time

import numpy as np

from electra_scale.eval.finetune.settings import PROBE_L2
from electra_scale.eval.finetune.source import Encoded, ModelSource, batch_tensors, default_device
from electra_scale.eval.finetune.train import build_classifier
from electra_scale.eval.tasks import TaskData, score


def features(source: ModelSource, task: TaskData, data: dict[str, Encoded], pad_id: int, batch: int) -> dict:
    """Mean-pooled states of every layer of the frozen encoder, per split, as [examples, layers + 1, hidden]
    (index 0: the embeddings' output). A random encoder for random init: the same seed-0 weights for every
    probe seed."""
    import torch

    torch.manual_seed(0)
    device = default_device()
    encoder = build_classifier(source, task).electra.to(device).eval()
    out = {}
    with torch.no_grad():
        for split, enc in data.items():
            chunks = []
            for start in range(0, len(enc.ids), batch):
                idx = np.arange(start, min(start + batch, len(enc.ids)))
                ids, mask, types, _ = batch_tensors(enc, idx, pad_id, device)
                states = encoder(
                    input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True
                ).hidden_states
                m = mask[:, None, :, None].to(states[0].dtype)
                hidden = torch.stack(states, 1)  # [batch, layers + 1, seq, hidden]
                chunks.append(((hidden * m).sum(2) / m.sum(2)).double().cpu())
            out[split] = torch.cat(chunks)
    return out


def probe_seed(task: TaskData, feats: dict, data: dict[str, Encoded], train_idx: np.ndarray, seed: int) -> dict:
    """Logistic regression (ridge for regression) on standardised features; the layer and the L2 strength
    picked on dev."""
    started = time.perf_counter()
    candidates = []
    for layer in range(feats["train"].shape[1]):
        layer_feats = {s: f[:, layer] for s, f in feats.items()}
        for c in fit_and_score(task, layer_feats, data, train_idx, seed, PROBE_L2):
            candidates.append({"layer": layer, **c})
    # Ties: the stronger prior, then the lower layer (the cheaper reading).
    best = max(candidates, key=lambda c: (c["dev"][task.main_metric], c["l2"], -c["layer"]))
    pick = {"layer": best["layer"], "l2": best["l2"], "dev": best["dev"]}
    pick |= {k: best[k] for k in ("test", "one_class") if k in best}
    return {"seed": seed, **pick, "wall_s": round(time.perf_counter() - started, 2)}


def fit_and_score(task: TaskData, feats: dict, data: dict, train_idx: np.ndarray, seed: int, grid) -> list[dict]:
    """One linear model per L2 strength on standardised [examples, dim] features; each one's scores on every
    split but train, and whether it predicts a single class on the reported split (test, else dev)."""
    import torch

    x = feats["train"][torch.from_numpy(train_idx)]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = {s: (f - mean) / std for s, f in feats.items()}
    xs["train"] = (x - mean) / std
    y = torch.from_numpy(data["train"].labels[train_idx])
    report = "test" if "test" in data else "dev"
    candidates = []
    for l2 in grid:
        w = _fit_linear(xs["train"], y, l2, None if task.regression else len(task.labels), seed)
        scores: dict = {}
        for split in (s for s in data if s != "train"):
            z = _design(xs[split]) @ w
            pred = z[:, 0].numpy() if task.regression else z.argmax(-1).numpy()
            scores[split] = score(task, data[split].labels, pred)
            if split == report and not task.regression:
                scores["one_class"] = bool(len(np.unique(pred)) == 1)
        candidates.append({"l2": l2, **scores})
    return candidates


def _design(x):
    import torch

    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def _fit_linear(x, y, l2: float, num_classes: int | None, seed: int):
    """Weights [D + 1, K] minimising the mean loss + l2/2 |W|^2 (bias not penalised). Convex: L-BFGS in
    float64 finds the optimum, so the seed only matters through the training subset."""
    import torch

    xd = _design(x)
    penalty = torch.ones(xd.shape[1], 1, dtype=xd.dtype)
    penalty[-1] = 0
    if num_classes is None:  # ridge, closed form
        a = xd.T @ xd / len(xd) + l2 * torch.diag(penalty[:, 0])
        return torch.linalg.solve(a, xd.T @ y.double()[:, None] / len(xd))
    w = torch.zeros(xd.shape[1], num_classes, dtype=xd.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=500, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xd @ w, y) + 0.5 * l2 * ((w * penalty) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()
