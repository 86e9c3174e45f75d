"""Validation: the one-step loss and the sampled chunk's error over the held-out episodes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dopr.train.batches import to_device

VAL_BATCH_SIZE = 256  # fixed, so the fixed validation noise does not depend on the training batch size


@dataclass
class ValResult:
    loss: float
    action_mse: float


def validate(policy, dataset, device) -> ValResult | None:
    """One-step loss and sampled-chunk MSE over the whole validation split, with noise, timesteps
    and sampling seeded by the batch index so numbers compare across checkpoints and runs."""
    import torch

    if dataset is None or len(dataset) == 0:
        return None
    was_training = policy.training
    policy.eval()
    loss_sum, mse_sum, count = 0.0, 0.0, 0
    with torch.no_grad():
        for i, start in enumerate(range(0, len(dataset), VAL_BATCH_SIZE)):
            idx = np.arange(start, min(start + VAL_BATCH_SIZE, len(dataset)))
            batch = to_device(dataset[idx], device)
            loss = policy.compute_loss(batch, generator=torch.Generator(device=device).manual_seed(i))
            sampling = torch.Generator(device=device).manual_seed(1_000_000 + i)
            chunk = policy.sample_chunk(batch["obs"], generator=sampling)
            loss_sum += loss.item() * len(idx)
            mse_sum += (chunk - batch["action"]).pow(2).mean().item() * len(idx)
            count += len(idx)
    policy.train(was_training)
    return ValResult(loss_sum / count, mse_sum / count)
