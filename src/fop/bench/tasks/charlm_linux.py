"""``charlm-linux``: a character-level GPT on the Linux kernel source, scored by validation loss.

Data: the ``linux-kernel-char`` folder (``train.txt``, ``valid.txt``; docs/benchmark.md, Data)
from ``--data`` or ``$FOP_LINUX_KERNEL_CHAR``. The vocabulary is the training split's characters
plus one unknown id. A sample is a window of 128 characters; the batch size counts windows, so the
default batch of 64 is 8,192 tokens per step.

Model: :class:`fop.bench.models.CharGPT`, width 64 and 2 layers by default (``--width``,
``--layers`` scale it), one head per 32 of width, untied head by default (so the token embedding and
the head each get their own Kronecker curvature; ``--tied-head`` shares them, and the pair is then
one layer with the head's factors on the summed gradient). K-FAC and FOP give curvature to the embedding, the attention projections, the
MLPs and the head; the layer norms and the position table take the library's default fallback
(``fallback="auto"``: AdamW at ``fallback_lr`` 8e-3, whatever the batch size or learning-rate
factor), so that ``kfac`` and ``fop`` here are what a user who passes only ``lr`` gets. Before 0.4
the task gave them AdamW at the AdamW schedule's rate times the run's factor.

Metric: held-out cross-entropy in nats per character on ``valid.txt`` (bits per character in the
reports too), evaluated 8 times per epoch, untimed. One epoch by default (248 steps at batch 64):
sized for a CPU sweep; docs/benchmark.md gives the measured cost and how the target was set.
"""

from __future__ import annotations

from torch import nn

from fop.bench.data import TokenDataset, TokenPipeline, load_char_corpus
from fop.bench.errors import BenchError
from fop.bench.models import CharGPT
from fop.bench.tasks import CurvatureDefaults, DataOptions, Task, register

NAME = "charlm-linux"
DATA_ENV = "FOP_LINUX_KERNEL_CHAR"
CONTEXT = 128
DEFAULT_WIDTH = 64
DEFAULT_LAYERS = 2
HEAD_DIM = 32  # width per attention head
# validation loss in nats per character; see docs/benchmark.md for how it was set
_TARGETS = {"linux-kernel-char": 2.60}


def _load(options: DataOptions) -> TokenDataset:
    if options.path is None:
        raise BenchError(
            f"task {NAME} needs --data PATH (the linux-kernel-char folder with train.txt and valid.txt; "
            f"or set {DATA_ENV})"
        )
    return load_char_corpus(options.path, CONTEXT, subset=options.subset)


def _model(dataset: TokenDataset, width: int | None, layers: int | None = None, tied_head: bool = False) -> nn.Module:
    dim = width or DEFAULT_WIDTH
    heads = max(1, dim // HEAD_DIM)
    while dim % heads:  # a width that is not a multiple of HEAD_DIM: the nearest divisor below
        heads -= 1
    return CharGPT(
        dataset.vocab_size, dataset.context, dim=dim, depth=layers or DEFAULT_LAYERS, heads=heads, tied=tied_head
    )


def _target(dataset: TokenDataset) -> float:
    try:
        return _TARGETS[dataset.kind]
    except KeyError:
        raise BenchError(f"no default validation-loss target for the corpus {dataset.kind!r}; give --target") from None


TASK = register(
    Task(
        name=NAME,
        summary="character-level GPT (width 64, 2 layers, context 128) on linux-kernel-char, validation loss; "
        "needs --data",
        load_data=_load,
        build_model=_model,
        default_target=_target,
        batch_sizes=(64,),
        reference_batch=64,
        base_lrs={"sgd": 0.3, "adamw": 2e-3, "kfac": 0.03, "fop": 0.03},
        weight_decays={"adamw": 0.1, "default": 0.0},
        max_epochs=1,
        warmup_epochs=0.1,
        curvature=CurvatureDefaults(damping=1e-3, reference_interval=10, fallback="auto"),
        lr_grid=(0.5, 1.0, 2.0),
        optimizers=("adamw", "kfac", "fop"),
        max_micro_batch=256,
        metric="loss",
        data_options=frozenset({"path"}),
        data_env=DATA_ENV,
        model_options=frozenset({"layers", "tied_head"}),
        evaluations_per_epoch=8,
        make_pipeline=TokenPipeline,
    )
)
