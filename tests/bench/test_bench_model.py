"""bench/model.py's longest-sequence search (``--longest``), driven by a fake training step on CPU.

The fake knows where the memory runs out and how long each length takes, so the test can say which
length the search must report and why it must stop, without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from bench.model import longest


def _fake(limit: int, seconds_at, calls: list):
    def run(attention, length, ckpt):
        calls.append(length)
        if length > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at {length}")
        return {"attention": attention, "L": length, "checkpointing": ckpt, "step_s": seconds_at(length)}

    return run


def test_longest_stops_at_the_first_length_that_runs_out_of_memory():
    calls: list = []
    rows = longest(_fake(4096, lambda n: n / 1024, calls), "performer-softmax", True, 1024, 1e9, 1 << 20)
    assert calls == [1024, 2048, 4096, 8192]
    assert [r["L"] for r in rows if r.get("longest")] == [4096]
    assert rows[-1]["stop"].startswith("OOM at L=8192")
    assert all("step_s" in r for r in rows[:-1])


def test_longest_skips_a_length_predicted_too_slow_quadratic_for_exact():
    calls: list = []
    # exact: 5 s at 1k, 20 s at 2k; 4k would take 80 s > 30, so it is never run
    rows = longest(_fake(1 << 30, lambda n: 5 * (n / 1024) ** 2, calls), "exact", False, 1024, 30.0, 1 << 20)
    assert calls == [1024, 2048]
    assert [r["L"] for r in rows if r.get("longest")] == [2048]
    assert rows[-1]["stop"].startswith("predicted step 80 s")
    # the same times for a linear-cost model: 4k is predicted at 40 s, also over 30
    calls.clear()
    rows = longest(
        _fake(1 << 30, lambda n: 5 * (n / 1024) ** 2, calls), "performer-softmax", False, 1024, 30.0, 1 << 20
    )
    assert calls == [1024, 2048] and rows[-1]["stop"].startswith("predicted step 40 s")


@pytest.mark.parametrize(
    "limit, expect_calls, expect_longest", [(512, [1024], []), (1 << 30, [1024, 2048], [2048])]
)
def test_longest_reports_no_length_when_the_first_fails_and_stops_at_max_len(
    limit, expect_calls, expect_longest
):
    calls: list = []
    rows = longest(_fake(limit, lambda n: 0.1, calls), "exact", True, 1024, 30.0, 2048)
    assert calls == expect_calls
    assert [r["L"] for r in rows if r.get("longest")] == expect_longest
    assert rows[-1]["stop"].startswith("OOM" if limit == 512 else "L > --max-L 2048")


def test_longest_stops_after_a_measured_step_over_the_limit_even_the_first():
    calls: list = []
    rows = longest(_fake(1 << 30, lambda n: 50.0, calls), "exact", True, 1024, 30.0, 1 << 20)
    assert calls == [1024]  # it trained, so it is reported, but nothing longer is tried
    assert [r["L"] for r in rows if r.get("longest")] == [1024]
    assert rows[-1]["stop"] == "step 50 s > --max-step-s 30"


def test_longest_treats_a_library_allocation_failure_as_out_of_memory_and_reraises_other_errors():
    def run(attention, length, ckpt):
        if length > 1024:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")
        return {"attention": attention, "L": length, "checkpointing": ckpt, "step_s": 0.1}

    rows = longest(run, "exact", False, 1024, 30.0, 1 << 20)
    assert rows[-1]["stop"].startswith("OOM at L=2048: CUDA error: CUBLAS_STATUS_ALLOC_FAILED")

    def broken(attention, length, ckpt):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        longest(broken, "exact", False, 1024, 30.0, 1 << 20)
