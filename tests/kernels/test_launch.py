"""Host-side helpers of the ops: DirectLauncher (Triton's path once per signature, the cached
binary's launcher after) and CheckMemo (memoised argument checks)."""

from __future__ import annotations

import pytest
import torch

from visionattn.kernels._launch import DirectLauncher


class _FakeCompiled:
    def __init__(self, log: list) -> None:
        self.log = log

    def __getitem__(self, grid):
        def run(*args):
            self.log.append(("direct", grid, args))

        return run


class _FakeJit:
    """Stands in for a ``@triton.jit`` function: ``fn[grid](*args, **kw)`` compiles (logged)."""

    arg_names = ["X", "Y", "n", "BLOCK"]

    def __init__(self) -> None:
        self.log: list = []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.log.append(("triton", grid, args, kw))
            return _FakeCompiled(self.log)

        return launch


@pytest.fixture
def fake_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_second_launch_is_direct_with_constexprs_appended(fake_device) -> None:
    fn = _FakeJit()
    launch = DirectLauncher(fn, "VISIONATTN_TEST_FAST_LAUNCH")
    x, y = torch.zeros(64), torch.zeros(64)
    args = dict(consts={"BLOCK": 16}, opts={"num_warps": 4}, meta_key=(16, 4))
    launch((2,), (x, y), (7,), **args)
    launch((2,), (x, y), (7,), **args)
    assert [e[0] for e in fn.log] == ["triton", "direct"]
    assert fn.log[0][3] == {"BLOCK": 16, "num_warps": 4}
    assert fn.log[1][1] == (2, 1, 1) and fn.log[1][2] == (x, y, 7, 16)


def test_new_signature_goes_through_triton(fake_device) -> None:
    fn = _FakeJit()
    launch = DirectLauncher(fn, "VISIONATTN_TEST_FAST_LAUNCH")
    x, y = torch.zeros(64), torch.zeros(64)
    launch((2,), (x, y), (7,), consts={"BLOCK": 16})
    launch((2,), (x, y), (8,), consts={"BLOCK": 16})  # another scalar value
    launch((3,), (x, y), (7,), consts={"BLOCK": 16})  # another grid
    launch((2,), (x.half(), y), (7,), consts={"BLOCK": 16})  # another dtype
    launch((2,), (x[1:], y), (7,), consts={"BLOCK": 16})  # a 4-byte-aligned pointer
    launch((2,), (x, y), (7,), consts={"BLOCK": 16}, meta_key=("other",))
    assert [e[0] for e in fn.log] == ["triton"] * 6


def test_plan_owned_runs_and_switch_off(fake_device, monkeypatch) -> None:
    fn = _FakeJit()
    launch = DirectLauncher(fn, "VISIONATTN_TEST_FAST_LAUNCH")
    runs: dict = {}
    x, y = torch.zeros(64), torch.zeros(64)
    launch((2,), (x, y), (7, 16), runs=runs)  # constexprs passed positionally
    launch((2,), (x, y), (7, 16), runs=runs)
    assert [e[0] for e in fn.log] == ["triton", "direct"] and list(runs) == [0]
    assert fn.log[1][2] == (x, y, 7, 16)
    monkeypatch.setenv("VISIONATTN_TEST_FAST_LAUNCH", "0")
    off = DirectLauncher(fn, "VISIONATTN_TEST_FAST_LAUNCH")
    off((2,), (x, y), (7, 16))
    off((2,), (x, y), (7, 16))
    assert [e[0] for e in fn.log[2:]] == ["triton", "triton"]


def test_check_memo_keys_are_type_exact_and_failures_not_stored() -> None:
    from visionattn.kernels._common import CheckMemo

    calls: list = []

    def check(x, k):
        calls.append((x.shape, k))
        if not isinstance(k, int) or isinstance(k, bool):
            raise ValueError("k must be an int")
        return k * 2

    memo = CheckMemo(size=2)
    x = torch.zeros(2, 3)
    assert memo(check, x, 3) == 6 and memo(check, torch.ones(2, 3), 3) == 6
    assert len(calls) == 1  # same shape/dtype/device and value: the stored result
    for bad in (3.0, True):  # equal to 3 as dict keys, yet invalid: always checked
        with pytest.raises(ValueError, match="k must be an int"):
            memo(check, x, bad)
        with pytest.raises(ValueError, match="k must be an int"):
            memo(check, x, bad)
    assert len(calls) == 5 and len(memo.results) == 1
    memo(check, torch.zeros(4, 3), 3)
    memo(check, x.double(), 3)  # third entry: the bounded store starts over
    assert len(memo.results) == 1
    n = len(calls)
    with pytest.raises(ValueError):  # an argument with no key: checked, never stored
        memo(check, x, [object()])
    assert len(calls) == n + 1 and len(memo.results) == 1
