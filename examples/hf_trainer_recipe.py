"""FOP in the Hugging Face ``Trainer``: ``optimizers=(FOP(model), scheduler)``, on a tiny GPT-2 built in code.

No download: the model is ``GPT2LMHeadModel(GPT2Config(...))`` with random weights, trained for a
few steps on a synthetic repeating-token corpus on the CPU, in one process or under ``torchrun``::

    python examples/hf_trainer_recipe.py
    torchrun --nproc-per-node 2 examples/hf_trainer_recipe.py     # two processes, gloo

GPT-2's ``Conv1D`` projections (``c_attn``, ``c_proj``, ``c_fc``) are recognised by their structure
and its position embedding ``wpe`` gets a diagonal input factor (the batch passes ``position_ids``
per sample, so ``wpe`` sees a batch it can split in halves). The token embedding ``wte`` is tied
to ``lm_head``: fop would make the pair one layer with the head's factors, whose output factor is
``vocab × vocab`` (10 GB for GPT-2's real 50,257 tokens), so the recipe excludes both and the tied
weight takes the first-order fallback rule. The Trainer's
gradient clipping (``max_grad_norm``) scales every gradient by one factor, which the optimizer
measures and accounts for.

Under ``torchrun`` the Trainer wraps the model in ``DistributedDataParallel`` itself, after the
optimizer exists; :class:`DualGradientHook` registers :func:`fop.dual_gradient_hook` on that
wrapper at ``on_train_begin``, before the first backward, so DDP's all-reduce keeps the even and
odd ranks' gradients apart. ``TrainingArguments`` starts the process group, so ``FOP(model)``
first builds fop's own distributed communicator; the hook replaces it before the first step. The
global batch is 16 sequences whatever the number of processes (taken in order, rank 0's first),
so a run on two processes trains as one process does (``--dtype float64`` to compare them).
Prints one JSON line (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from fop import FOP, dual_gradient_hook
from fop.ddp import bytes_per_step

VOCAB, SEQ, BATCH = 48, 16, 16  # BATCH: the global batch (all processes together)


class RepeatingTokens(Dataset):
    """Sequences ``a, a+1, a+2, ...`` (mod the vocabulary): a pattern a language model learns in a few steps."""

    def __init__(self, samples: int = BATCH) -> None:
        self.starts = torch.arange(samples) % VOCAB

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (self.starts[i] + torch.arange(SEQ)) % VOCAB
        return {"input_ids": ids, "labels": ids, "position_ids": torch.arange(SEQ)}


class LossLog(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


class DualGradientHook(TrainerCallback):
    """Registers ``fop.dual_gradient_hook`` on the ``DistributedDataParallel`` wrapper the Trainer builds.

    The Trainer wraps the model (``accelerator.prepare``) inside ``train()``, after the optimizer
    exists, and sets ``trainer.model_wrapped`` to the wrapper before ``on_train_begin``; the event's
    ``model`` argument is the unwrapped model, hence the reference to the trainer. One process: no
    wrapper, nothing to do. ``optimizer``: the FOP / KFAC passed in ``Trainer(optimizers=...)``.
    """

    def __init__(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        self.trainer = trainer
        self.optimizer = optimizer
        self.hooked: DistributedDataParallel | None = None  # a wrapper takes one comm hook, once

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        wrapper = self.trainer.model_wrapped
        if isinstance(wrapper, DistributedDataParallel) and wrapper is not self.hooked:
            wrapper.register_comm_hook(self.optimizer, dual_gradient_hook)
            self.hooked = wrapper


def checksums(model: torch.nn.Module) -> list[float]:
    """One float64 number per parameter tensor: its entries weighted by ``cos(0), cos(1), ...``."""
    sums = []
    for p in model.parameters():
        flat = p.detach().double().reshape(-1)
        sums.append(float((flat * torch.cos(torch.arange(flat.numel(), dtype=torch.float64))).sum()))
    return sums


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args(argv)
    log = LossLog()
    with tempfile.TemporaryDirectory() as out:
        # first, as in Hugging Face's scripts: under torchrun this starts the process group
        training = TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=BATCH // int(os.environ.get("WORLD_SIZE", "1")),  # torchrun's
            train_sampling_strategy="sequential",  # rank r's batch: the r-th part of one process's batch
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            ddp_find_unused_parameters=False,  # every parameter gets a gradient: no extra graph traversal
        )
        torch.manual_seed(0)
        config = GPT2Config(
            vocab_size=VOCAB,
            n_positions=SEQ,
            n_embd=32,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(config).to(getattr(torch, args.dtype))
        optimizer = FOP(
            model,
            lr=0.05,
            fallback="adamw",
            fallback_lr=1e-2,
            exclude=[model.transformer.wte, model.lm_head],
            curvature_update_interval=1,
            inverse_update_interval=1,
        )
        built_with = type(optimizer.communicator).__name__  # fop's own; the hook replaces it under DDP
        scheduler = LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))  # a short warm-up
        trainer = Trainer(
            model=model,
            args=training,
            train_dataset=RepeatingTokens(),
            optimizers=(optimizer, scheduler),
            callbacks=[log],
        )
        trainer.add_callback(DualGradientHook(trainer, optimizer))  # under torchrun: before the first backward
        trainer.train()
    report: dict[str, Any] = {
        "rank": training.process_index,
        "world_size": training.world_size,
        "losses": log.losses,
        "curvature_layers": sorted(optimizer.diagnostics()),
        "communicator_at_construction": built_with,
        "communicator": type(optimizer.communicator).__name__,
        "checksums": [checksums(model)],
    }
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, report["checksums"][0])
        report["checksums"] = gathered  # every rank's: DDP keeps them identical
        report["hook_bytes"] = dict(optimizer.communicator.last_step_bytes)  # the last step's traffic
        report["predicted_bytes"] = bytes_per_step(optimizer)
    return report


if __name__ == "__main__":
    result = main()
    if result["rank"] == 0:
        print(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # as in lightning_recipe.py: no live gloo group at exit
