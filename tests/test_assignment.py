"""The work assignment of distributed FOP / K-FAC as plain data: owners, loads, offsets, bytes.

No process group is started here: a :class:`fop.assignment.WorkAssignment` is built from layer
shapes alone, for the CIFAR ResNet-18 of the benchmark on 2, 4 and 8 processes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fop import FOP, KFAC
from fop.assignment import SHARED_SCALARS, LayerShape, WorkAssignment, assign_owners, layer_cost, tri
from fop.bench.models import resnet18
from fop.distributed import plan
from fop.intervals import check_interval, interval_at, mean_interval

F32 = 4


def resnet18_shapes(width: int = 64, classes: int = 10) -> list[LayerShape]:
    """The folded (out, in) shapes of ResNet-18 (3x3 stem, 1x1 projection shortcuts, bias-free convs)."""
    shapes = [LayerShape("stem.0", 3 * 9, width)]
    in_planes = width
    for stage, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for block in range(2):
            prefix = f"stages.{stage}.{block}"
            shapes.append(LayerShape(f"{prefix}.conv1", in_planes * 9, planes))
            shapes.append(LayerShape(f"{prefix}.conv2", planes * 9, planes))
            if in_planes != planes:
                shapes.append(LayerShape(f"{prefix}.shortcut.0", in_planes, planes))
            in_planes = planes
    shapes.append(LayerShape("fc", 8 * width + 1, classes))  # bias folded in
    return shapes


SHAPES = resnet18_shapes()
NUMEL = sum(s.numel for s in SHAPES)
TRIANGLES = sum(tri(s.in_features) + tri(s.out_features) for s in SHAPES)


def assignment(world: int, **kwargs) -> WorkAssignment:
    return WorkAssignment(layers=tuple(SHAPES), world_size=world, itemsize=F32, **kwargs)


def test_no_process_group_is_needed() -> None:
    assignment(4).bytes_per_step()
    assert not (dist.is_available() and dist.is_initialized())


def test_resnet18_shapes_are_the_models() -> None:
    model = resnet18(10)
    optimizer = FOP(model, distributed=False)
    planned = plan(optimizer, model, 2)
    assert [(s.name, s.in_features, s.out_features) for s in planned.layers] == [
        (s.name, s.in_features, s.out_features) for s in SHAPES
    ]
    assert len(SHAPES) == 21 and NUMEL == sum(p.numel() for layer in optimizer.layers for p in layer.params())


@pytest.mark.parametrize("world", [2, 4, 8])
def test_every_layer_has_one_owner_and_the_loads_balance(world: int) -> None:
    work = assignment(world)
    costs = [layer_cost(s) for s in SHAPES]
    assert work.costs == tuple(costs)
    assert len(work.owners) == len(SHAPES) and set(work.owners) <= set(range(world))
    assert sorted(i for r in range(world) for i in work.owned(r)) == list(range(len(SHAPES)))
    assert len(work.loads) == world and sum(work.loads) == pytest.approx(sum(costs))
    for r in range(world):
        assert work.loads[r] == pytest.approx(sum(c for c, o in zip(costs, work.owners) if o == r))
    assert max(work.loads) <= sum(costs) / world + max(costs)
    assert work.assignment == {s.name: o for s, o in zip(SHAPES, work.owners)}
    assert assignment(world).owners == work.owners  # every process computes the same assignment


@pytest.mark.parametrize("world", [4, 8])
def test_the_largest_layers_go_to_different_ranks(world: int) -> None:
    work = assignment(world)
    largest = [i for i, s in enumerate(SHAPES) if s.in_features == 512 * 9]
    assert [SHAPES[i].name for i in largest] == ["stages.3.0.conv2", "stages.3.1.conv1", "stages.3.1.conv2"]
    assert len({work.owners[i] for i in largest}) == 3


def test_resnet18_owners_on_two_processes() -> None:
    work = assignment(2)
    # the greedy: the three 4608-input layers first (ranks 0, 1, then the lighter of the two), ...
    assert work.assignment["stages.3.0.conv2"] == 0 and work.assignment["stages.3.1.conv1"] == 1
    assert abs(work.loads[0] - work.loads[1]) <= max(work.costs)
    assert work.owners == tuple(assign_owners(work.costs, 2))


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("splits", [True, False])
def test_resnet18_bytes_per_step(world: int, splits: bool) -> None:
    fallback = (64, 64) * 20  # anything: BatchNorm weights and biases
    work = assignment(world, splits=splits, fallback_sizes=fallback, gradient_bytes=123)
    slots = 2 if splits else 1
    common = sum(fallback) + 2 * len(SHAPES) + len(fallback) + 2 + 1
    plain, curvature = work.bytes_per_step(False), work.bytes_per_step(True)
    assert plain["reduce"] == slots * NUMEL * F32
    assert curvature["reduce"] == (slots * NUMEL + TRIANGLES) * F32
    assert plain["broadcast"] == curvature["broadcast"] == (NUMEL + SHARED_SCALARS * len(SHAPES)) * F32
    assert plain["all_reduce"] == common * F32 == work.common.length * F32
    assert plain["calls"] == 1 + 2 * len(set(work.owners))
    assert plain["total"] == plain["reduce"] + plain["broadcast"] + plain["all_reduce"]
    assert plain["ddp_all_reduce"] == 123
    share = (world - 1) / world
    assert plain["wire_estimate"] == int(
        2 * share * plain["all_reduce"] + share * (plain["reduce"] + plain["broadcast"])
    )


@pytest.mark.parametrize("world", [2, 4, 8])
def test_replicated_sends_one_all_reduce_and_holds_everything(world: int) -> None:
    work, specialists = assignment(world, replicated=True), assignment(world)
    sizes = work.bytes_per_step(True)
    assert sizes["calls"] == 1 and sizes["reduce"] == sizes["broadcast"] == 0
    assert sizes["all_reduce"] == (2 * NUMEL + TRIANGLES + work.common.length) * F32
    assert set(work.owners) == {0} and all(work.owns(r, i) for r in range(world) for i in range(len(SHAPES)))
    full = sum((2 * s.in_features**2 + s.in_features + 2 * s.out_features**2 + s.out_features) * F32 for s in SHAPES)
    assert work.curvature_bytes() == [full] * world
    assert sum(specialists.curvature_bytes()) == full
    assert max(specialists.curvature_bytes()) < full


@pytest.mark.parametrize("world", [2, 4, 8])
def test_buffer_offsets_tile_every_bucket(world: int) -> None:
    work = assignment(world)
    offsets, lengths = work.grad_offsets
    factor_offsets, factor_lengths = work.factor_offsets
    share_offsets, share_lengths = work.share_offsets
    for r, members in enumerate(work.buckets):
        assert members == work.owned(r)
        for table, bucket_len, size in (
            (offsets, lengths[r], lambda s: 2 * s.numel),
            (factor_offsets, factor_lengths[r], lambda s: s.triangles),
            (share_offsets, share_lengths[r], lambda s: s.numel + SHARED_SCALARS),
        ):
            off = 0
            for i in members:
                assert table[i] == off
                off += size(SHAPES[i])
            assert off == bucket_len
        assert work.bucket_len(r, True) == lengths[r] + factor_lengths[r]


def test_common_layout() -> None:
    work = assignment(2, fallback_sizes=(3, 5), buffer_sizes=(7,))
    common = work.common
    assert common.fallback == (0, 3) and common.buffers == (8,)
    assert common.presence == 15 and common.presence_len == 2 * len(SHAPES) + 2
    assert common.sequence == 15 + common.presence_len and common.flag == common.sequence + 2
    assert common.length == common.flag + 1


def test_describe_names_every_layer_and_owner() -> None:
    text = assignment(4).describe()
    assert text.startswith("layer specialists on 4 processes (planned)")
    assert all(s.name in text for s in SHAPES)
    assert "owner all" in assignment(4, replicated=True).describe("gloo")


def test_a_callable_interval_is_weighed_over_the_run_not_at_step_0() -> None:
    schedule = lambda step: 1 if step < 10 else 100  # noqa: E731
    assert mean_interval(10) == 10.0
    assert mean_interval(schedule, horizon=1000) == pytest.approx(1000 / (10 + 9))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    per_step = plan(KFAC(model, inverse_update_interval=1), model, 2)
    scheduled = plan(KFAC(model, inverse_update_interval=schedule), model, 2)
    assert sum(scheduled.costs) < sum(per_step.costs)


def test_intervals_are_validated_once() -> None:
    check_interval("x", 3)
    check_interval("x", lambda k: 2)
    for bad in (0, -1, True, 2.0, "3"):
        with pytest.raises(ValueError, match="x must be an int >= 1 or a callable"):
            check_interval("x", bad)  # type: ignore[arg-type]
    assert interval_at(lambda k: k + 1, 4) == 5
    with pytest.raises(ValueError, match="callable returned 0 at step 3"):
        interval_at(lambda k: 0, 3)


def test_world_size_and_costs_are_checked() -> None:
    with pytest.raises(ValueError, match="world_size"):
        WorkAssignment(layers=tuple(SHAPES), world_size=0)
    with pytest.raises(ValueError, match="costs"):
        WorkAssignment(layers=tuple(SHAPES), world_size=2, costs=(1.0,))


def test_layer_cost_counts_the_inverses_of_the_damping_mode() -> None:
    """Factored damping: n³ per damped inverse, 2 (K-FAC) or 6 (FOP) products; exact: 9n³ per eigh, 4 / 6."""
    layer = LayerShape("fc", 10, 4, 4)  # in_features 10, out_features 4
    cubes, products = 10**3 + 4**3, 4 * 10 * (10 + 4)
    assert layer_cost(layer, False, 1, "factored") == cubes + 2 * products
    assert layer_cost(layer, True, 5, "factored") == cubes / 5 + 6 * products
    assert layer_cost(layer, False, 1, "exact") == 9 * cubes + 4 * products
    assert layer_cost(layer, True, 2, "exact") == 9 * cubes / 2 + 6 * products
    assert layer_cost(layer) == layer_cost(layer, True, 1, "factored")  # the optimizer's default mode
