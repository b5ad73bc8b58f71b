"""Unit tests of the benchmark's building blocks: rules, data helpers, result file, report."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import warnings

import numpy as np
import pytest
import torch

import fop
from fop.arguments import AUTO_FALLBACK_LR
from fop.bench import BenchError
from fop.bench.data import (
    BatchPipeline,
    TokenDataset,
    TokenPipeline,
    balanced_indices,
    load_cifar10,
    load_digits,
    long_tail_counts,
    long_tail_indices,
    random_crop,
    random_flip,
)
from fop.bench.optimizers import (
    Hyperparameters,
    curvature_interval,
    resolve_optimizer,
    scaled_lr,
    warmup_cosine,
)
from fop.bench.report import format_table1, summarize
from fop.bench.runner import ResultStore, resolve_micro_batch

# ---------------------------------------------------------------------------------------- rules


def test_learning_rate_scaling_rules():
    assert scaled_lr(0.1, 2048, 256, "linear") == pytest.approx(0.8)
    assert scaled_lr(1e-3, 1024, 256, "sqrt") == pytest.approx(2e-3)
    with pytest.raises(BenchError, match="scaling rule"):
        scaled_lr(0.1, 2048, 256, "cubic")


def test_curvature_interval_shrinks_with_batch_down_to_five_steps():
    intervals = [curvature_interval(b, 256, 50) for b in (128, 256, 2048, 4096, 8192, 50000)]
    assert intervals == [100, 50, 6, 5, 5, 5]
    assert curvature_interval(50000, 256, 50, min_interval=1) == 1


def test_warmup_cosine_schedule():
    factor = warmup_cosine(total_steps=100, warmup_steps=10)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    decay = [factor(s) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert factor(99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert warmup_cosine(total_steps=1, warmup_steps=5)(0) == pytest.approx(1.0)  # no room for warmup


def test_micro_batch_resolution():
    assert resolve_micro_batch(50000, None, 4096) == 3125  # largest divisor under the task's limit
    assert resolve_micro_batch(2048, None, 4096) == 2048
    assert resolve_micro_batch(256, 64, None) == 64
    assert resolve_micro_batch(256, 512, None) == 256  # larger than the batch: no accumulation
    with pytest.raises(BenchError, match="does not divide"):
        resolve_micro_batch(256, 100, None)


# ------------------------------------------------------------------------------------ optimizers


def _tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_optimizer_factory_by_name():
    hp = Hyperparameters(lr=0.1, weight_decay=1e-4)
    sgd = resolve_optimizer("SGD").build(_tiny_model(), hp)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    assert resolve_optimizer("adamw").scaling == "sqrt" and resolve_optimizer("sgd").scaling == "linear"
    rmsprop = resolve_optimizer("rmsprop")
    assert rmsprop.default_lr == pytest.approx(0.01)
    assert isinstance(rmsprop.build(_tiny_model(), hp), torch.optim.RMSprop)
    with pytest.raises(BenchError, match="unknown optimizer 'nope'"):
        resolve_optimizer("nope")


@pytest.mark.parametrize("name", ["kfac", "fop"])
def test_curvature_optimizers_are_built_from_the_model(name):
    import fop

    spec = resolve_optimizer(name)
    assert spec.uses_curvature and spec.scaling == "linear"
    hp = Hyperparameters(lr=0.05, weight_decay=0.0, curvature_interval=7, fallback="adamw", fallback_lr=2e-3)
    optimizer = spec.build(_tiny_model(), hp)
    assert isinstance(optimizer, getattr(fop, name.upper()))
    assert optimizer.curvature_update_interval == 7


# ------------------------------------------------------------------------------------------ data


def test_long_tail_counts_follow_the_exponential_profile():
    assert long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert long_tail_counts(5000, 10, 50) == [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]
    with pytest.raises(BenchError):
        long_tail_counts(5000, 10, 0.5)


@pytest.mark.parametrize("imbalance", [100, 50])
def test_long_tail_indices_give_the_intended_class_counts(imbalance):
    labels = torch.arange(10).repeat(5000)  # CIFAR-10 training labels: 5000 per class, interleaved
    kept = long_tail_indices(labels, 10, imbalance)
    counts = torch.bincount(labels[kept], minlength=10).tolist()
    assert counts == long_tail_counts(5000, 10, imbalance)
    assert counts[0] / counts[-1] == pytest.approx(imbalance)
    assert torch.equal(kept, torch.sort(kept).values) and kept.unique().numel() == kept.numel()


def test_balanced_indices_take_the_first_of_each_class():
    labels = torch.tensor([0, 1, 0, 1, 0, 2, 2])
    assert balanced_indices(labels, 2, 3).tolist() == [0, 1, 2, 3, 5, 6]
    with pytest.raises(BenchError, match="class 1 has 2 samples, 3 requested"):
        balanced_indices(labels, 3, 3)


def test_digits_split_and_subset():
    digits = load_digits()
    assert (digits.train_size, digits.test_size, digits.num_classes) == (1437, 360, 10)
    assert digits.train_images.dtype == torch.uint8 and digits.image_shape == (8, 8, 1)
    small = load_digits(subset=100)
    assert small.class_counts("train") == [10] * 10 and small.class_counts("test") == [10] * 10


def test_random_crop_is_a_window_of_the_padded_image():
    images = torch.randint(0, 255, (6, 5, 5, 3), dtype=torch.uint8)
    assert torch.equal(random_crop(images, 0), images)
    crops = random_crop(images, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (0, 0, 2, 2, 2, 2))
    for crop, source in zip(crops, padded, strict=True):
        windows = [source[y : y + 5, x : x + 5] for y in range(5) for x in range(5)]
        assert any(torch.equal(crop, window) for window in windows)


def test_random_flip_flips_about_half():
    images = torch.arange(2000 * 2 * 2).view(2000, 2, 2, 1).to(torch.uint8)
    flipped = random_flip(images, torch.Generator().manual_seed(0))
    same = (flipped == images).flatten(1).all(1)
    mirrored = (flipped == images.flip(2)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 800 < int(mirrored.sum()) < 1200


def test_pipeline_normalises_and_augments_on_device():
    digits = load_digits()
    pipeline = BatchPipeline(digits, "cpu", crop_padding=1, channels_last=True)
    images, _ = pipeline.train_batch(torch.arange(1437), torch.Generator().manual_seed(0))
    assert images.shape == (1437, 1, 8, 8) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    plain = BatchPipeline(digits, "cpu")
    whole, _ = plain.train_batch(torch.arange(1437))
    assert float(whole.mean()) == pytest.approx(0.0, abs=1e-4) and float(whole.std()) == pytest.approx(1.0, abs=1e-2)
    assert sum(len(y) for _, y in plain.test_batches(100)) == 360


def _write_cifar_pickles(folder, per_batch: int = 3) -> None:
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8)
        data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 10, 20, 30  # one known pixel colour
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": list(range(per_batch))}, handle)


def test_original_cifar_pickles_are_read(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write_cifar_pickles(folder)
    dataset = load_cifar10(tmp_path)  # the parent folder works too
    assert dataset.kind == "cifar10"
    assert dataset.train_images.shape == (15, 32, 32, 3) and dataset.test_images.shape == (3, 32, 32, 3)
    assert dataset.train_images[0, 5, 7].tolist() == [10, 20, 30]  # planar CHW became HWC


def test_bad_cifar_inputs_have_clear_errors(tmp_path):
    with pytest.raises(BenchError, match="not found"):
        load_cifar10(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an archive")
    with pytest.raises(BenchError, match="corrupt data file"):
        load_cifar10(garbage)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, something=np.zeros(3))
    with pytest.raises(BenchError, match="missing arrays"):
        load_cifar10(wrong)
    with pytest.raises(BenchError, match="not a CIFAR-10 folder"):
        load_cifar10(tmp_path)
    broken = tmp_path / "broken.npz"
    np.savez(
        broken,
        train_jpeg=np.frombuffer(b"\xff\xd8junk", dtype=np.uint8),
        train_offsets=np.array([0, 6]),
        train_labels=np.array([0], dtype=np.uint8),
        test_jpeg=np.zeros(0, np.uint8),
        test_offsets=np.array([0]),
        test_labels=np.zeros(0, np.uint8),
    )
    with pytest.raises(BenchError, match="does not decode"):
        load_cifar10(broken, use_cache=False)


# ------------------------------------------------------------------------------- results, report


def test_result_store_survives_a_partial_last_line(tmp_path):
    store = ResultStore(tmp_path / "runs.jsonl")
    store.append({"key": "a", "value": 1})
    with open(store.path, "a") as handle:
        handle.write('{"key": "b", "val')  # a sweep killed while writing
    assert set(store.load()) == {"a"}
    store.append({"key": "c", "value": 3})
    assert set(store.load()) == {"a", "c"}
    lines = store.path.read_text().splitlines()
    assert json.loads(lines[-1]) == {"key": "c", "value": 3}


def _record(optimizer, factor, seed, seconds, epochs, best=0.9, batch=256):
    return {
        "spec": {
            "batch_size": batch,
            "optimizer": optimizer,
            "lr_factor": factor,
            "seed": seed,
            "hyperparameters": {"lr": 0.1 * factor},
            "max_epochs": 10,
        },
        "seconds_to_target": seconds,
        "epochs_to_target": epochs,
        "best_accuracy": best,
        "final_accuracy": best,
        "status": "ok",
    }


def test_summary_keeps_the_best_learning_rate_and_counts_misses_as_infinite():
    records = [
        _record("sgd", 1.0, 0, 10.0, 5),
        _record("sgd", 1.0, 1, 12.0, 6),
        _record("sgd", 1.0, 2, None, None),
        _record("sgd", 2.0, 0, 8.0, 4),
        _record("sgd", 2.0, 1, None, None),
        _record("sgd", 2.0, 2, None, None),
        _record("fop", 1.0, 0, 4.0, 2),
        _record("fop", 1.0, 1, 5.0, 3),
        _record("fop", 1.0, 2, 6.0, 3),
    ]
    cells = summarize(records)
    sgd = cells[(256, "sgd")]
    assert sgd.lr_factor == 1.0 and sgd.seconds == 12.0 and sgd.reached == 2  # x2 misses on 2 of 3 seeds
    table = format_table1(cells, [256, 512], ["sgd", "fop"], baseline="sgd")
    rows = [line for line in table.splitlines() if line.startswith("| 256") or line.startswith("| 512")]
    assert rows[0] == "| 256 | 6 / 12.0 s | 3 / 5.00 s (×2.40) |"
    assert rows[1] == "| 512 | — | — |"


def _tuned(optimizer, factor, damping, seed, final, epochs=None, batch=256):
    record = _record(optimizer, factor, seed, None if epochs is None else float(epochs), epochs, best=final)
    record["spec"]["batch_size"] = batch
    record["spec"]["hyperparameters"].update(damping=damping, weight_decay=0.0)
    return record


def test_summary_tunes_the_second_axis_and_flags_grid_edges():
    records = [
        _tuned("kfac", f, d, s, final=0.5 + 0.1 * (f == 1.0) + 0.05 * (d == 0.1), epochs=None)
        for f in (0.5, 1.0, 2.0)
        for d in (0.01, 0.1)
        for s in (0, 1)
    ]
    cell = summarize(records)[(256, "kfac")]
    assert (cell.lr_factor, cell.damping, cell.trials) == (1.0, 0.1, 6)
    assert cell.edges == ("damping",)  # lr 1.0 is inside its grid, damping 0.1 is the largest tried


def _exact_bootstrap_median_quantile(values, q):
    """The q-quantile of the bootstrap distribution of the median of an odd number of distinct values,
    exactly: the median of n draws with replacement is <= the k-th smallest value iff more than n/2 of
    the draws are, a binomial with p = k/n."""
    n, ordered = len(values), sorted(values)
    for k, value in enumerate(ordered, start=1):
        p = k / n
        cdf = sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(n // 2 + 1, n + 1))
        if cdf >= q:
            return value
    return ordered[-1]


def test_bootstrap_interval_is_the_exact_bootstrap_quantiles():
    from fop.bench.report import bootstrap_median_interval

    for values in ([1.0, 2.0, 3.0, 4.0, 5.0], [-3.0, -1.0, 0.0, 2.0, 3.0, 5.0, 8.0], [0.5, -2.0, 7.0]):
        for level in (0.95, 0.7):  # chosen so that no exact quantile lies near a jump of the distribution
            tail = (1 - level) / 2
            expected = tuple(_exact_bootstrap_median_quantile(values, q) for q in (tail, 1 - tail))
            assert bootstrap_median_interval(values, level) == expected
    # P(median <= k-th smallest of 7) = 1.0%, 10.8%, 34.7%, 65.3%, 89.2%, 99.0%
    assert bootstrap_median_interval([-3.0, -1.0, 0.0, 2.0, 3.0, 5.0, 8.0]) == (-1.0, 5.0)
    assert bootstrap_median_interval([-3.0, -1.0, 0.0, 2.0, 3.0, 5.0, 8.0], 0.7) == (0.0, 3.0)


def test_paired_comparison_is_per_seed_with_a_bootstrap_interval():
    from fop.bench.report import format_paired_table, paired_differences

    final_points = [1, -1, 2, 3, 5]  # fop − kfac per seed, points of final accuracy
    fop_epochs = [8, 9, 11, 8, 7]  # kfac: 10 on every seed
    records = [_tuned("kfac", 1.0, 0.1, s, final=0.80 + 0.01 * s, epochs=10) for s in range(5)]
    records += [
        _tuned("fop", 1.0, 0.1, s, final=0.80 + 0.01 * s + final_points[s] / 100, epochs=fop_epochs[s])
        for s in range(5)
    ]
    records += [_tuned("kfac:paper", 1.0, 0.1, s, final=0.70, epochs=None) for s in range(5)]
    records += [_tuned("fop:paper", 1.0, 0.1, s, final=0.71, epochs=None) for s in range(5)]
    cells = summarize(records)
    diffs = paired_differences(cells[(256, "fop")], cells[(256, "kfac")], "final_accuracy")
    assert diffs == pytest.approx([d / 100 for d in final_points])
    epochs = [e - 10 for e in fop_epochs]
    interval = [_exact_bootstrap_median_quantile(v, q) for v in (final_points, epochs) for q in (0.025, 0.975)]
    assert interval == [-1, 5, -3, 1]
    table = format_paired_table(cells, [256], ["kfac", "fop", "kfac:paper", "fop:paper"], "kfac", "accuracy")
    assert "| 256 | fop − kfac | 5 | +2.00 [-1.00, +5.00] | 4/5 | -2 [-3, +1] (5 seeds, 4 faster) |" in table
    # a variant against the reference's own variant too, like against like
    assert "| 256 | fop:paper − kfac:paper | 5 | +1.00 [+1.00, +1.00] | 5/5 | — |" in table
    assert "| 256 | fop:paper − kfac | 5 | -11.00 [-13.00, -9.00] | 0/5 | — |" in table
    assert "| 256 | fop:paper − fop | 5 | -13.00 [-18.00, -9.00] | 0/5 | — |" in table  # against its base
    assert "fop − kfac:paper" not in table and table.count("\n") == 6  # header, rule and 5 rows


def test_sensitivity_gives_the_clipped_share_of_the_run_and_before_the_target():
    from fop.bench.report import format_sensitivity

    records = []
    for seed, (reached, shares) in enumerate([(2, [1.0, 1.0, 0.0, 0.0]), (3, [1.0, 1.0, 1.0, 0.0])]):
        record = _tuned("kfac", 1.0, 0.1, seed, final=0.9, epochs=reached)
        record["curve"] = [{"epoch": e + 1, "clipped_fraction": s} for e, s in enumerate(shares)]
        records.append(record)
    sgd = _tuned("sgd", 1.0, 0.0, 0, final=0.8, epochs=None)
    sgd["curve"] = [{"epoch": 1}]
    table = format_sensitivity([*records, sgd], [256], ["sgd", "kfac"], "accuracy")
    # 5 of 8 epochs clipped over the runs; all 5 epochs up to the targets (epochs 1–2 and 1–3)
    assert "| 256 | kfac | 90.00 (62% clipped, 100% before the target) |" in table
    assert "| 256 | sgd | 80.00 |" in table


def test_variants_set_constructor_options():
    from fop.bench.optimizers import resolve_optimizer

    spec = resolve_optimizer("fop:mc:sum")
    assert spec.options == {"fisher": "mc", "eta": "sum"} and spec.lr_name == "fop" and spec.uses_curvature
    assert resolve_optimizer("kfac:paper").options["damping_mode"] == "factored"
    with pytest.raises(BenchError, match="unknown variant 'bogus'"):
        resolve_optimizer("fop:bogus")
    with pytest.raises(BenchError, match="kfac and fop only"):
        resolve_optimizer("sgd:mc")


def test_halfbn_variant_gives_the_model_per_half_batch_norm():
    """``fop:halfbn``: same optimizer options, BatchNorm statistics per half (tests/test_distributed.py
    proves that equal to two processes)."""
    from fop.bench.models import PartwiseBatchNorm, resnet18, split_batch_norm
    from fop.bench.optimizers import resolve_optimizer

    spec = resolve_optimizer("fop:halfbn:mc")
    assert spec.batch_norm_parts == 2 and spec.options == {"fisher": "mc"}
    assert resolve_optimizer("fop:mc").batch_norm_parts == 1
    model = split_batch_norm(resnet18(10, width=4), spec.batch_norm_parts)
    wrapped = [m for m in model.modules() if isinstance(m, PartwiseBatchNorm)]
    assert wrapped and not any(
        isinstance(m, torch.nn.BatchNorm2d) and not any(w.norm is m for w in wrapped) for m in model.modules()
    )
    model.train()
    x = torch.randn(6, 3, 8, 8)
    moved = x.clone()
    moved[3:] += 1.0
    before, after = model(x), model(moved)
    assert torch.allclose(before[:3], after[:3], atol=1e-5)  # a half's output depends on that half only
    assert not torch.allclose(before[3:], after[3:], atol=1e-3)


def test_no_weight_decay_is_a_boundary_not_a_grid_edge():
    records = [_tuned("sgd", f, 0.1, 0, final=0.9 - 0.1 * (f != 1.0)) for f in (0.5, 1.0, 2.0)]
    for record in records:
        record["spec"]["hyperparameters"]["weight_decay"] = 0.0
    records += [_tuned("sgd", 1.0, 0.1, 0, final=0.7)]
    records[-1]["spec"]["hyperparameters"]["weight_decay"] = 1e-3
    assert summarize(records)[(256, "sgd")].edges == ()


def test_kl_variant_token_sets_the_trust_region_size():
    from fop.bench.optimizers import resolve_optimizer

    assert resolve_optimizer("kfac:dirclip:kl0.1").options == {"trust_region": "direction", "kl_clip": 0.1}
    with pytest.raises(BenchError, match="kl takes a positive number"):
        resolve_optimizer("fop:klx")


def test_fs_variant_token_sets_the_factor_samples():
    assert resolve_optimizer("fop:fs512").options == {"factor_samples": 512}
    assert resolve_optimizer("kfac:factored:fs64").options == {"damping_mode": "factored", "factor_samples": 64}
    for bad in ("fs0", "fs", "fs2.5", "fs-4", "fsx"):
        with pytest.raises(BenchError, match="fs takes a whole number"):
            resolve_optimizer(f"fop:{bad}")
    spec = resolve_optimizer("kfac:fs2")
    hp = Hyperparameters(lr=0.1, weight_decay=0.0, options=tuple(spec.options.items()))
    assert spec.build(_tiny_model(), hp).param_groups[0]["factor_samples"] == 2


def test_reduce_variant_token_sets_the_weight_sharing():
    spec = resolve_optimizer("fop:reduce:fs64")
    assert spec.options == {"weight_sharing": "reduce", "factor_samples": 64}
    hp = Hyperparameters(lr=0.1, weight_decay=0.0, options=tuple(spec.options.items()))
    assert spec.build(_tiny_model(), hp).param_groups[0]["weight_sharing"] == "reduce"


# ------------------------------------------------------------------------------ language model


def test_token_pipeline_windows_and_targets():
    tokens = torch.arange(1, 1 + 10 * 8 + 1)  # 81 distinct ids: every window is recognisable
    dataset = TokenDataset("toy", "memory", tuple("x" * 90), 8, tokens, tokens[:41])
    pipeline = TokenPipeline(dataset, "cpu")
    assert pipeline.train_size == dataset.train_size == 10 and dataset.test_size == 5
    generator = torch.Generator().manual_seed(0)
    inputs, targets = pipeline.train_batch(torch.tensor([0, 3, 9]), generator)
    assert inputs.shape == targets.shape == (3, 8)
    torch.testing.assert_close(targets[:, :-1], inputs[:, 1:])  # targets: the next token
    starts = inputs[:, 0] - 1
    assert all(8 * i <= int(s) < 8 * i + 8 for i, s in zip((0, 3), starts[:2].tolist(), strict=True))
    assert int(targets[2, -1]) <= 81  # the last block's window is clamped inside the text
    held_out = list(pipeline.held_out_batches(2))
    assert [len(x) for x, _ in held_out] == [2, 2, 1]
    torch.testing.assert_close(torch.cat([x for x, _ in held_out]).flatten(), tokens[:40])


def test_char_gpt_is_causal_and_ties_on_request():
    from fop import FOP
    from fop.bench.models import CharGPT

    torch.manual_seed(0)
    model = CharGPT(vocab_size=20, context=16, dim=32, depth=2).eval()
    tokens = torch.randint(0, 20, (2, 16))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 20
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert before.shape == (2, 16, 20)
    torch.testing.assert_close(before[:, :10], after[:, :10])  # earlier positions do not see later tokens
    assert not torch.allclose(before[:, 10:], after[:, 10:])
    layers = {layer.name for layer in FOP(model.train(), lr=0.01, fallback="adamw").layers}
    assert {"token_embed", "blocks.0.attn.qkv", "blocks.1.fc2", "head"} <= layers
    tied = CharGPT(vocab_size=20, context=16, dim=32, depth=1, tied=True)
    assert tied.head.weight is tied.token_embed.weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tied pair is one layer (the head's factors), no warning
        tied_layers = {layer.name for layer in FOP(tied, lr=0.01, fallback="adamw").layers}
    assert "head" in tied_layers and "token_embed" not in tied_layers


def test_fallback_variant_tokens_set_the_rule_and_a_fixed_learning_rate():
    from types import SimpleNamespace

    from fop.bench.runner import SweepConfig, plan_runs
    from fop.bench.tasks import get_task

    assert resolve_optimizer("kfac:fbsgd").options == {"fallback": "sgd"}
    assert resolve_optimizer("fop:reduce:fl4e-3").options == {"weight_sharing": "reduce", "fallback_lr": 4e-3}
    for bad in ("fl0", "fl", "flx", "fl-1e-3"):
        with pytest.raises(BenchError, match="fl takes a positive learning rate"):
            resolve_optimizer(f"kfac:{bad}")
    task = get_task("charlm-linux")  # the task's rule: the library's default (auto, its fallback_lr)
    dataset = SimpleNamespace(summary=lambda: {"kind": "toy"}, train_size=1000)
    names = ("kfac", "kfac:fbsgd", "kfac:fbadamw", "fop:fl4e-3", "fop:fbsgd:fl0.01")
    config = SweepConfig(names, (64,), (0.5, 2.0), (0,), 1, 2.6, "cpu")
    plan = plan_runs(config, task, dataset, [resolve_optimizer(name) for name in names])
    got = {(run.optimizer, run.lr_factor): run.hyperparameters for run in plan}
    assert {k: (hp.fallback, hp.fallback_lr) for k, hp in got.items()} == {
        ("kfac", 0.5): ("auto", None),  # what FOP(model, lr=...) builds, whatever the factor
        ("kfac", 2.0): ("auto", None),
        ("kfac:fbsgd", 0.5): ("sgd", None),  # the library's default: the main lr
        ("kfac:fbsgd", 2.0): ("sgd", None),
        ("kfac:fbadamw", 0.5): ("adamw", None),  # the library's default: 1e-3
        ("kfac:fbadamw", 2.0): ("adamw", None),
        ("fop:fl4e-3", 0.5): ("auto", 4e-3),  # fixed, whatever the grid factor
        ("fop:fl4e-3", 2.0): ("auto", 4e-3),
        ("fop:fbsgd:fl0.01", 0.5): ("sgd", 0.01),
        ("fop:fbsgd:fl0.01", 2.0): ("sgd", 0.01),
    }
    assert all(hp.options in ((), (("weight_sharing", "reduce"),)) for hp in got.values())
    hp = got[("kfac:fbsgd", 2.0)]
    groups = resolve_optimizer("kfac:fbsgd").build(_tiny_model_with_norm(), hp).param_groups
    assert [(g["rule"], g["lr"]) for g in groups] == [("kronecker", hp.lr), ("sgd", hp.lr)]
    hp = got[("fop:fl4e-3", 0.5)]
    groups = resolve_optimizer("fop:fl4e-3").build(_tiny_model_with_norm(), hp).param_groups
    assert [(g["rule"], g["lr"]) for g in groups] == [("kronecker", hp.lr), ("adamw", 4e-3)]
    hp = got[("kfac", 2.0)]
    groups = resolve_optimizer("kfac").build(_tiny_model_with_norm(), hp).param_groups
    shipped = fop.KFAC(_tiny_model_with_norm(), lr=hp.lr).param_groups
    assert [(g["rule"], g["lr"]) for g in groups] == [(g["rule"], g["lr"]) for g in shipped]
    assert [(g["rule"], g["lr"]) for g in groups] == [("kronecker", hp.lr), ("adamw", AUTO_FALLBACK_LR)]


def _tiny_model_with_norm():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
