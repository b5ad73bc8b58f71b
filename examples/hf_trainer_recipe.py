"""FOP in the Hugging Face ``Trainer``: ``optimizers=(FOP(model), scheduler)``, on a tiny GPT-2 built in code.

No download: the model is ``GPT2LMHeadModel(GPT2Config(...))`` with random weights, trained for a
few steps on a synthetic repeating-token corpus on the CPU::

    python examples/hf_trainer_recipe.py

GPT-2's ``Conv1D`` projections (``c_attn``, ``c_proj``, ``c_fc``) are recognised by their structure
and its position embedding ``wpe`` gets a diagonal input factor. The token embedding ``wte`` is tied
to ``lm_head``: a tied weight gets gradient from two modules, so both take the first-order
fallback rule (one warning names them; pass ``exclude=[...]`` to silence it). The Trainer's
gradient clipping (``max_grad_norm``) scales every gradient by one factor, which the optimizer
measures and accounts for. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from fop import FOP

VOCAB, SEQ = 48, 16


class RepeatingTokens(Dataset):
    """Sequences ``a, a+1, a+2, ...`` (mod the vocabulary): a pattern a language model learns in a few steps."""

    def __init__(self, samples: int = 16) -> None:
        self.starts = torch.arange(samples) % VOCAB

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (self.starts[i] + torch.arange(SEQ)) % VOCAB
        return {"input_ids": ids, "labels": ids}


class LossLog(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args(argv)
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
    model = GPT2LMHeadModel(config)
    optimizer = FOP(
        model,
        lr=0.05,
        fallback="adamw",
        fallback_lr=1e-2,
        exclude=[model.transformer.wte, model.lm_head],
        curvature_update_interval=1,
        inverse_update_interval=1,
    )
    scheduler = LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))  # a short warm-up
    log = LossLog()
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=16,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=training,
            train_dataset=RepeatingTokens(),
            optimizers=(optimizer, scheduler),
            callbacks=[log],
        )
        trainer.train()
    return {"losses": log.losses, "curvature_layers": sorted(optimizer.diagnostics())}


if __name__ == "__main__":
    print(json.dumps(main()))
