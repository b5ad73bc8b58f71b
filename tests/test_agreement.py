"""The distributed agreement checks as pure functions (the gloo runs are in test_distributed.py)."""

from __future__ import annotations

import pytest

from fop.agreement import (
    SEQ_MOD,
    DistributedConfigError,
    call_sequence,
    check_agreement,
    flatten,
    presence_message,
    sequence_message,
)


def test_disagreeing_entries_are_named_per_rank() -> None:
    mine = flatten({"optimizer": "FOP", "param_groups": [{"lr": 0.1, "momentum": 0.9}]})
    other = flatten({"optimizer": "FOP", "param_groups": [{"lr": 0.2, "momentum": 0.9}]})
    check_agreement(mine, [mine, dict(mine)], "FOP", "construction")  # agreement: no error
    with pytest.raises(DistributedConfigError, match=r"param_groups\[0\]\.lr: rank 0: 0\.1; rank 1: 0\.2") as info:
        check_agreement(mine, [mine, other], "FOP", "construction")
    assert "momentum" not in str(info.value)


def test_call_sequence_wraps_and_out_of_step_messages_name_the_other_process() -> None:
    assert call_sequence(SEQ_MOD + 2, 5) == (3.0, 5.0)
    own = call_sequence(4, 5)
    message = sequence_message(own, [own[0] + 6.0, own[1] + 6.0], world_size=2, rank=1)
    assert "rank 1) is at step() call 5 after 5 zero_grad()" in message and "other one at step() call 6" in message
    assert "called state_dict()" in sequence_message(own, list(own), world_size=2, rank=0)


def test_presence_message_lists_only_what_some_processes_lack() -> None:
    # two layers (gradients, then factors), one fallback tensor; 3 processes
    message = presence_message([3, 2, 0, 3, 1], ["a", "b"], [(4,)], world_size=3)
    assert "b: gradients on 2 of 3 processes" in message
    assert "fallback parameter #0 (4,): gradients on 1 of 3 processes" in message
    assert "a:" not in message
