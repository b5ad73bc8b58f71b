"""A layer's curvature state: :class:`LayerCurvature`, the one typed view of its keys in ``optimizer.state``.

The running factors ``A``, ``G`` and their eigendecompositions live in the optimizer's ordinary
state, ``optimizer.state[layer.weight]`` (so that ``state_dict()`` saves them), under the keys of
:data:`fop.curvature.FACTOR_KEYS`. :class:`LayerCurvature` is the only code that reads or writes
those keys: it updates the factors, decomposes them, computes the layer's direction from them, and
takes, checks, converts or drops them for checkpoints. Distributed layer specialists keep a
layer's curvature on its owner only: :func:`owned_curvature` takes a process's share for a
checkpoint and :func:`merge_curvature` puts every process's share into rank 0's ``state_dict()``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import functional as Fn
from .curvature import FACTOR_KEYS

if TYPE_CHECKING:  # pragma: no cover
    from .curvature import LayerWork

__all__ = ["FACTOR_KEYS", "LayerCurvature", "merge_curvature", "owned_curvature"]

_EMPTY: dict[str, Any] = {}
# Curvature state of one damping mode, dropped when the other mode takes over (see FACTOR_KEYS).
_EIGEN_KEYS = ("A_values", "A_vectors", "G_values", "G_vectors")
_AT_INVERSE_KEYS = ("A_at_inverse", "G_at_inverse")
_FACTORED_KEYS = ("A_inv", "G_inv", "inverse_damping") + _AT_INVERSE_KEYS
# Everything of a layer's curvature in its state entry: the tensors of FACTOR_KEYS and the λ the factored
# inverses were formed with (a float). A checkpoint carries all of it; a non-owner drops all of it.
_LAYER_KEYS = (*FACTOR_KEYS, "inverse_damping")


class LayerCurvature:
    """One layer's running factors and their eigendecompositions, in ``state`` (its ``optimizer.state`` entry)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    @classmethod
    def of(cls, optimizer_state: Mapping[Tensor, dict[str, Any]], weight: Tensor) -> LayerCurvature:
        """The view of ``weight``'s layer, for reading (creates no state entry)."""
        return cls(optimizer_state.get(weight, _EMPTY))

    @property
    def has_factors(self) -> bool:
        return "A" in self.state

    @property
    def has_eigen(self) -> bool:
        return "A_values" in self.state

    @property
    def has_inverses(self) -> bool:
        return "A_inv" in self.state

    @property
    def inverse_damping(self) -> float | None:
        """The λ the factored inverses were formed with (None before the first)."""
        return self.state.get("inverse_damping")

    # ----------------------------------------------------------------------------- the step
    def update_factors(self, a_new: Tensor, g_new: Tensor, decay: float, ok: Tensor, keep: bool = False) -> None:
        """``A ← ρA + (1−ρ)A_new`` (and ``G``) where the step is good; the first good statistics as they are.

        ``keep``: the factors as they are now are still in use (factored damping between inverse
        updates): they move to ``A_at_inverse``/``G_at_inverse`` first, unless already kept.
        """
        state = self.state
        good = ok & torch.isfinite(a_new).all() & torch.isfinite(g_new).all()
        if "A" not in state:
            # A skipped first capture must leave no factor behind (a placeholder would be averaged
            # into every later one): this one host synchronisation happens until a layer has factors.
            if bool(good):
                state["A"], state["G"] = a_new.clone(), g_new.clone()
            return
        if keep and "A_at_inverse" not in state:
            state["A_at_inverse"], state["G_at_inverse"] = state["A"], state["G"]
            state["A"], state["G"] = state["A"].clone(), state["G"].clone()
        # lerp towards A itself on a skipped step (exactly A): one temporary, not two, for a large A
        state["A"].lerp_(torch.where(good, a_new, state["A"]), 1 - decay)
        state["G"].lerp_(torch.where(good, g_new, state["G"]), 1 - decay)

    @staticmethod
    def decompose(views: Sequence[LayerCurvature]) -> None:
        """Eigendecompose the factors, batched over factors of one shape (one ``eigh`` call each).

        A diagonal input factor (``nn.Embedding``'s token frequencies, stored 1-D) needs no ``eigh``:
        its eigenvalues are its entries and its basis the standard one (no ``A_vectors``).
        """
        states = [view.state for view in views]
        for state in states:  # what factored damping kept, if the mode was switched
            _drop(state, _FACTORED_KEYS)
        for key in ("A", "G"):
            for state in states:
                if state[key].dim() == 1:
                    previous = Fn.Eigen(state[f"{key}_values"], None) if f"{key}_values" in state else None
                    state[f"{key}_values"] = Fn.eigen_diagonal(state[key], previous).values
            for indices, has_previous in _batches([s[key] for s in states], [f"{key}_values" in s for s in states]):
                group = [states[i] for i in indices]
                previous = None
                if has_previous:
                    previous = Fn.Eigen(
                        _stacked([s[f"{key}_values"] for s in group]), _stacked([s[f"{key}_vectors"] for s in group])
                    )
                eig = Fn.eigen_factor(_stacked([s[key] for s in group]), previous)
                vectors = eig.vectors
                assert vectors is not None  # a dense factor's basis
                for i, state in enumerate(group):
                    state[f"{key}_values"], state[f"{key}_vectors"] = eig.values[i], vectors[i]

    @staticmethod
    def form_factored_inverses(views: Sequence[LayerCurvature], damping: float, fresh: bool) -> None:
        """Factored damping's inverses ``(A + π√λI)⁻¹``, ``(G + √λ/π I)⁻¹`` by Cholesky, batched by shape.

        ``fresh``: from the running factors (an inverse update); else from the factors the current
        inverses came from, with a new ``λ`` (what the eigenbasis route does when λ changes).
        """
        states = [view.state for view in views]
        if not states:
            return
        sources = []
        for state in states:
            _drop(state, _EIGEN_KEYS + (_AT_INVERSE_KEYS if fresh else ()))  # superseded, or from exact damping
            a, g = state.get("A_at_inverse", state["A"]), state.get("G_at_inverse", state["G"])
            sources.append((a, g, *Fn.factored_damping_shifts(a, g, damping)))
        for slot, key in ((0, "A"), (1, "G")):
            for state, source in zip(states, sources):
                if source[slot].dim() == 1:  # a diagonal A (Embedding), not stacked: (k, n) would read as a matrix
                    state[f"{key}_inv"] = Fn.damped_factor_inverse(
                        source[slot], source[2 + slot], state.get(f"{key}_inv")
                    )
            factors = [source[slot] for source in sources]
            for indices, has_previous in _batches(factors, [f"{key}_inv" in s for s in states]):
                # stacked only if a repair needs them (a copy of all the batch's inverses)
                olds = functools.partial(_stacked, [states[i][f"{key}_inv"] for i in indices]) if has_previous else None
                inverse = Fn.damped_factor_inverse(
                    _stacked([factors[i] for i in indices]), torch.stack([sources[i][2 + slot] for i in indices]), olds
                )
                for j, i in enumerate(indices):
                    states[i][f"{key}_inv"] = inverse[j]
        for state in states:
            state["inverse_damping"] = damping

    def eigen(self) -> tuple[Fn.Eigen, Fn.Eigen]:
        """The eigendecompositions of ``A`` and ``G``."""
        state = self.state  # no A_vectors: a diagonal A (nn.Embedding), the standard basis
        return Fn.Eigen(state["A_values"], state.get("A_vectors")), Fn.Eigen(state["G_values"], state["G_vectors"])

    def factored(self) -> Fn.Factored:
        """The factors the current factored inverses were formed from, and those inverses."""
        state = self.state
        return Fn.Factored(
            state.get("A_at_inverse", state["A"]), state.get("G_at_inverse", state["G"]), state["A_inv"], state["G_inv"]
        )

    def direction(
        self, item: LayerWork, group: Mapping[str, Any], projection: bool, splits: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The layer's direction for ``item`` under ``group``'s hyperparameters, and its diagnostics.

        FOP (``splits`` and both halves present): :func:`fop.functional.fop_direction_eigen` (or
        ``fop_direction_factored`` under factored damping) with ``β*``, ``η*``, ``s`` and the
        gradient-noise terms; otherwise K-FAC's damped inverse of the averaged gradient, ``β* = 0``,
        ``η* = 1``.
        """
        damping, damping_mode = group["damping"], group["damping_mode"]
        factored = damping_mode == "factored"
        if splits and item.g1 is not None and item.g2 is not None:
            if factored:
                result = Fn.fop_direction_factored(
                    item.g1, item.g2, self.factored(), group["projection_eps"], projection, group["eta"]
                )
            else:
                eig_a, eig_g = self.eigen()
                result = Fn.fop_direction_eigen(
                    item.g1,
                    item.g2,
                    eig_a,
                    eig_g,
                    damping,
                    group["projection_eps"],
                    projection,
                    damping_mode,
                    group["eta"],
                )
            if result.avg_sq is not None and result.diff_sq is not None:  # free from the rotated halves
                trace, grad_sq = Fn.noise_terms(result.avg_sq, result.diff_sq, item.half_batch)
            else:  # projection off: g1 − g2 was not formed
                trace, grad_sq = Fn.gradient_noise_terms(item.g1, item.g2, item.half_batch)
            last = {
                "beta": result.beta,
                "eta": result.eta,
                "projection": result.projection,
                "noise_trace": trace,
                "noise_grad_sq": grad_sq,
            }
            return result.direction, last
        zero = torch.zeros((), dtype=item.grad.dtype, device=item.grad.device)
        last = {"beta": zero, "eta": torch.ones_like(zero), "projection": zero}
        if factored:
            return Fn.damped_inverse_factored(item.grad, self.factored()), last
        eig_a, eig_g = self.eigen()
        return Fn.damped_inverse_eigen(item.grad, eig_a, eig_g, damping, damping_mode), last

    # ----------------------------------------------------------------------------- checkpoints
    @staticmethod
    def shapes(in_features: int, out_features: int, diagonal_input: bool = False) -> dict[str, tuple[int, ...]]:
        """The shape of every curvature tensor of a layer with folded shape ``(out, in)`` (``A`` 1-D if diagonal)."""
        n_in, n_out = in_features, out_features
        a_shape = (n_in,) if diagonal_input else (n_in, n_in)
        return {
            "A": a_shape,
            "G": (n_out, n_out),
            "A_values": (n_in,),
            "A_vectors": (n_in, n_in),
            "G_values": (n_out,),
            "G_vectors": (n_out, n_out),
            "A_inv": a_shape,
            "G_inv": (n_out, n_out),
            "A_at_inverse": a_shape,
            "G_at_inverse": (n_out, n_out),
        }

    def tensors(self) -> dict[str, Any]:
        """CPU copies of the curvature tensors present, and the λ of the factored inverses (for a checkpoint).

        ``inverse_damping`` travels with the inverses: without it a resumed run would take them for
        stale and re-form them from the newer factors, which the uninterrupted run does not.
        """
        state = self.state
        return {
            k: state[k].detach().cpu() if isinstance(state[k], Tensor) else state[k] for k in _LAYER_KEYS if k in state
        }

    def follow(self, weight: Tensor) -> None:
        """The curvature tensors in the compute dtype of ``weight`` and on its device.

        After a checkpoint is loaded, and when the model was moved or cast after the optimizer was
        built (``model.double()``, ``model.to("cuda")``): a no-op when nothing changed.
        """
        dtype = Fn.compute_dtype(weight.dtype)
        for key in FACTOR_KEYS:
            value = self.state.get(key)
            if value is not None and (value.dtype != dtype or value.device != weight.device):
                self.state[key] = value.to(device=weight.device, dtype=dtype)

    def drop(self) -> None:
        """Forget the curvature (another process owns the layer)."""
        _drop(self.state, _LAYER_KEYS)


def owned_curvature(state: Mapping[Tensor, dict], weights: Mapping[int, Tensor]) -> dict[int, dict[str, Any]]:
    """CPU copies of the curvature of the layers ``{index: weight}`` that have any (see :meth:`LayerCurvature.tensors`)."""
    out = {}
    for i, weight in weights.items():
        tensors = LayerCurvature.of(state, weight).tensors()
        if tensors:
            out[i] = tensors
    return out


def merge_curvature(
    state_dict: dict[str, Any],
    param_groups: Sequence[dict],
    parts: Sequence[dict[int, dict[str, Any]]],
    weights: Sequence[Tensor],
) -> dict[str, Any]:
    """``state_dict`` (of ``param_groups``) with the curvature ``parts`` of layer ``i`` (weight ``weights[i]``) added."""
    index: dict[int, int] = {}
    for packed, group in zip(state_dict["param_groups"], param_groups):
        for idx, p in zip(packed["params"], group["params"]):
            index.setdefault(id(p), idx)
    states = dict(state_dict["state"])
    for part in parts:
        for i, tensors in part.items():
            idx = index[id(weights[i])]
            states[idx] = {**states.get(idx, {}), **tensors}
    return {**state_dict, "state": states}


def _batches(factors: Sequence[Tensor], has_previous: Sequence[bool]) -> list[tuple[list[int], bool]]:
    """Indices of the dense factors one batched call takes together (same shape, dtype and device, and
    all with or all without a previous result to fall back on), and whether they have one."""
    buckets: dict[tuple, list[int]] = {}
    for i, (factor, previous) in enumerate(zip(factors, has_previous)):
        if factor.dim() == 2:
            buckets.setdefault((tuple(factor.shape), factor.dtype, factor.device, previous), []).append(i)
    return [(indices, bool(key[-1])) for key, indices in buckets.items()]


def _stacked(tensors: list[Tensor]) -> Tensor:
    """``torch.stack``, but a view for one tensor (a lone large factor is not copied)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _drop(state: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        state.pop(key, None)
