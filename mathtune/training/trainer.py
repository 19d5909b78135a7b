"""``MathtuneTrainer``: transformers' Trainer plus what mathtune needs inside the step.

Callbacks never see a micro-batch, so the trainer records each one into a shared ``StepStats``
(what the guards and the metrics logger read), runs the LM head only at supervised positions
(mathtune/loss.py), runs a batch's shared system turn once (mathtune/shared_prefix.py), picks the
attention kernel by batch length on CPU (mathtune/training/attention.py), lays the
learning-rate schedule over a time budget (mathtune/budget.py) and saves LoRA adapters without a
hub lookup. Forward, backward, optimizer, scheduler and checkpoints stay Trainer's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import Trainer

from mathtune.atomic import fsync_file, honour_umask
from mathtune.budget import TimeBudget
from mathtune.loss import supervised_mask, supervised_only_loss
from mathtune.shared_prefix import shared_prefix_length, split_off_prefix, worth_sharing
from mathtune.step_stats import StepStats
from mathtune.training.attention import AttentionByLength


class MathtuneTrainer(Trainer):
    """Trainer that records every micro-batch into ``StepStats``, runs the LM head only at supervised
    positions (mathtune/loss.py), lays the LR schedule over a time budget (mathtune/budget.py) and
    saves adapters offline."""

    def __init__(self, *args, step_stats: StepStats, time_budget: TimeBudget | None = None,
                 supervised_logits: bool = False, shared_prefix: bool = False,
                 attention: AttentionByLength | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.attention = attention  # None: the model's attention kernel stays as it is
        self.step_stats = step_stats
        self.time_budget = time_budget
        self.supervised_logits = supervised_logits
        self.shared_prefix = shared_prefix and supervised_logits
        if supervised_logits:
            self.compute_loss_func = supervised_only_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.attention is not None and "input_ids" in inputs:
            self.attention.use_for(inputs["input_ids"].shape[1])  # eager for short batches, SDPA for long
        if self.shared_prefix and "labels" in inputs and not return_outputs:
            rows, positions = inputs["input_ids"].shape
            prefix = shared_prefix_length(inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
            if worth_sharing(rows, positions, prefix):
                # the shared system turn runs once at batch 1; the rows continue from its cache
                inputs = split_off_prefix(model, inputs, prefix)
        if self.supervised_logits and "labels" in inputs:
            # the LM head runs on these positions only; supervised_only_loss takes its cross-entropy
            inputs = {**inputs, "logits_to_keep": supervised_mask(inputs["labels"])}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.time_budget is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        budget = self.time_budget
        # a plain function (not a bound method), so LambdaLR's state_dict stays the library's usual one
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer,
                                                              lambda step: budget.multiplier(step))
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        first_of_step = self.step_stats.micro_batches == 0
        started = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The loss returned is already scaled for accumulation (this micro-batch's token-loss sum /
        # the step's supervised tokens), so the step's recorded losses sum to its mean token loss.
        self.step_stats.record_micro_batch(inputs, loss)
        if first_of_step:
            # record_micro_batch starts the step's clock after the first micro-batch ran: start it before
            self.step_stats.step_started = started
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer's save (final weights and every checkpoint's), with a LoRA adapter saved offline and
        the weight files given the run's file mode and put on disk."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if isinstance(self.model, PeftModel) and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            self._write_adapter(output_dir)
        else:  # a full model, or an adapter whose weights DeepSpeed/FSDP must gather first: Trainer's way
            super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            # safetensors writes through a 0600 temp file: give the weights the umask's mode, like
            # every other file of the run, and put them on disk (the run survives a power cut)
            for weights in Path(output_dir).glob("*.safetensors"):
                honour_umask(weights)
                fsync_file(weights)

    def _write_adapter(self, output_dir: str) -> None:
        if not self.args.should_save:
            return  # under a launcher rank 0 alone writes (as Trainer's save does)
        os.makedirs(output_dir, exist_ok=True)
        # save_embedding_layers="auto" (peft's default) asks the hub whether the base model's vocab
        # changed when the base is a hub id: offline that is a retry loop, and we never resize
        # embeddings, so the LoRA matrices are all there is to save.
        self.model.save_pretrained(output_dir, save_embedding_layers=False)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
