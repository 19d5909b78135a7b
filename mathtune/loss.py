"""The training loss: token-normalised cross-entropy, with the LM head run only where it is needed.

Both functions return (sum of token losses in this micro-batch) / ``num_items_in_batch``, where
Trainer counts ``num_items_in_batch`` as the supervised tokens of the WHOLE optimizer step (all
micro-batches; all ranks with ``average_tokens_across_devices``). Summed over the step's
micro-batches that is the mean token loss of the step: gradient accumulation and data parallelism
then weight every supervised token equally, whatever the row lengths.

Why hand-write the loss at all: the model's own loss needs logits at EVERY position, but prompt and
padding positions carry label -100 and contribute nothing. The LM head is the widest matmul of a
small model (SmolLM2-135M: 49,152 x 576 = 28.3 M of its 134.5 M weights, ~21% of the FLOPs per
position), and the loss then upcasts those logits to fp32 and takes a softmax over 49,152 entries
per position (for 8 rows x 300 positions that is a 472 MB fp32 tensor, read and written several
times). ``logits_to_keep`` (a public forward argument of transformers' causal LMs; a 2-D boolean
mask selects per-row positions and returns them flattened) lets the model run its head on the
supervised positions alone; the cross-entropy below is the same sum the model would take over
those positions, so the numbers do not change beyond rounding (tests/test_loss.py checks loss and
gradients against the full-logits loss to 1e-5).
"""

from __future__ import annotations

import inspect

import torch

IGNORE_INDEX = -100


def supervised_mask(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, seq) mask of the positions whose logits predict a supervised token.

    The model predicts token t+1 from position t (labels are NOT pre-shifted; the shift happens
    here), so position t is kept when ``labels[:, t + 1] != -100``; the last position predicts
    nothing.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:].ne(IGNORE_INDEX)
    return mask


def supervised_only_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Loss for a forward pass run with ``logits_to_keep=supervised_mask(labels)``: logits are
    (kept positions, vocab), in the order of the mask's True entries (row-major)."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    targets = labels[:, 1:][labels[:, 1:].ne(IGNORE_INDEX)].to(logits.device)
    if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
        raise RuntimeError(
            f"logits_to_keep returned logits of shape {tuple(logits.shape)} for {targets.shape[0]} supervised "
            f"positions: this model does not take a boolean logits_to_keep mask (train with --no-supervised-logits)"
        )
    total = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = targets.numel()
    return total / num_items_in_batch


def token_normalised_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Full-logits fallback for models whose forward takes no loss kwargs: shifted token-loss sum / count."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    shift_logits = logits[..., :-1, :].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[..., 1:].reshape(-1).to(shift_logits.device)
    total = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = shift_labels.ne(IGNORE_INDEX).sum()
    return total / num_items_in_batch


def takes_logits_mask(model) -> bool:
    """True when the causal LM (or a PEFT model around one) takes a 2-D boolean ``logits_to_keep`` mask
    and returns the kept positions' logits flattened, as transformers documents for its causal LMs
    (``slice_logits_to_keep``). Found by asking: one forward pass on a two-token row keeping its first
    position must return logits for one position; a forward without the argument is not asked. Once
    per training run: 0.3-0.44 s for SmolLM2-135M + LoRA on one thread of a busy 2-core CPU."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        if "logits_to_keep" not in inspect.signature(base.forward).parameters:
            return False
        device = next(base.parameters()).device
    except (TypeError, ValueError, StopIteration):  # no inspectable forward, or no weights
        return False
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    keep = torch.tensor([[True, False]], device=device)
    try:
        with torch.no_grad():
            outputs = model(input_ids=ids, logits_to_keep=keep, use_cache=False)
    except (TypeError, ValueError, IndexError, RuntimeError):  # a forward that takes only an int
        return False
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    return logits.dim() == 2 and logits.shape[0] == 1
