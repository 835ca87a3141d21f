"""models/lbfgs.py: the compact-representation L-BFGS takes torch.optim.LBFGS's steps (lr 1, one evaluation per
step, no line search), keeps and drops curvature pairs as it does, and reads nothing back from the device while it
steps (one read per iteration, the caller's report)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

from models.lbfgs import CompactLBFGS

Objective = Callable[[Tensor], Tensor]


def _smooth(n: int, device: str = "cpu") -> tuple[Objective, Tensor]:
    """A non-quadratic, strongly convex objective in float64 (on `device`) and a start point (on the CPU)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = (a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)).to(device)
    b = torch.randn(n, generator=gen, dtype=torch.float64).to(device)

    def f(x: Tensor) -> Tensor:
        return 0.5 * x @ a @ x - b @ x + 0.1 * torch.log(torch.cosh(3 * x)).sum()

    return f, torch.randn(n, generator=gen, dtype=torch.float64)


def _kinked(n: int) -> tuple[Objective, Tensor]:
    """Flat curvature wherever x < 0 (steps there give y.s = 0: pairs that must be dropped), quadratic elsewhere."""
    def f(x: Tensor) -> Tensor:
        return x.sum() + 0.5 * (torch.relu(x) ** 2).sum() * 3.0

    return f, torch.linspace(-2.0, 3.0, n, dtype=torch.float64)


def torch_path(f: Objective, x0: Tensor, steps: int, history: int) -> Iterator[Tensor]:
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=1, history_size=history, tolerance_grad=0.0,
                            tolerance_change=0.0)

    def closure() -> Tensor:
        x.grad = None
        loss = f(x)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
        yield x.detach().clone()


def compact_path(f: Objective, x0: Tensor, steps: int, history: int,
                 kept: list[int] | None = None) -> Iterator[Tensor]:
    """CompactLBFGS's iterates; `kept` gets the number of pairs held after each step."""
    x = x0.clone().requires_grad_(True)
    opt = CompactLBFGS(x, history=history)

    def closure() -> Tensor:
        x.grad = None
        loss = f(x)
        loss.backward()
        return loss.reshape(1)

    for _ in range(steps):
        (value,) = opt.evaluate(closure)
        assert value == pytest.approx(float(f(x.detach())))  # the report is the loss at x, before the step
        opt.advance()
        if kept is not None:
            kept.append(opt.count)
        yield x.detach().clone()


@pytest.mark.parametrize("history", [3, 50])
def test_the_same_steps_as_torch_lbfgs(history: int) -> None:
    """30 steps: with a history of 3 the memory wraps round many times."""
    f, x0 = _smooth(40)
    steps = list(zip(torch_path(f, x0, 30, history), compact_path(f, x0, 30, history), strict=True))
    for ours, theirs in steps:
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)
    assert float(f(steps[-1][0])) < float(f(x0)) - 1.0  # and they went somewhere


@pytest.mark.parametrize(("start", "dropped_all"), [((-3.0, -1.0), True), ((-2.0, 3.0), False)])
def test_pairs_without_curvature_are_dropped_as_torch_drops_them(start: tuple[float, float],
                                                                 dropped_all: bool) -> None:
    """Wholly in the flat region every pair has y.s = 0 and none is kept; across the kink some are."""
    f, _ = _kinked(32)
    x0 = torch.linspace(*start, 32, dtype=torch.float64)
    kept: list[int] = []
    for ours, theirs in zip(compact_path(f, x0, 25, 5, kept), torch_path(f, x0, 25, 5), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)
    assert (max(kept) == 0) is dropped_all
    if not dropped_all:  # some pairs kept, and some dropped while the memory still had room
        assert any(after == before < 5 for before, after in itertools.pairwise(kept[1:])), kept


def test_stepping_reads_nothing_back_from_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """advance() never converts a tensor to a Python value (each would be a GPU synchronisation); evaluate() reads
    once: its report with the curvature test."""
    f, x0 = _smooth(16)
    x = x0.clone().requires_grad_(True)
    opt = CompactLBFGS(x, history=4)
    reads: list[str] = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def spy(self: Tensor, *args: object, _name: str = name, _original: object = original) -> object:
            reads.append(_name)
            return _original(self, *args)  # type: ignore[operator]

        monkeypatch.setattr(torch.Tensor, name, spy)

    def closure() -> Tensor:
        x.grad = None
        loss = f(x)
        loss.backward()
        return loss.detach().reshape(1)

    for _ in range(8):
        reads.clear()
        opt.evaluate(closure)
        assert reads == ["tolist"]
        opt.advance()
        assert reads == ["tolist"], reads
    assert opt.count == 4  # the memory filled and wrapped


def test_float32_images_converge_like_torch() -> None:
    """In float32 (the service's dtype) the two drift apart slowly, as any two L-BFGS implementations do, but reach
    the same loss."""
    gen = torch.Generator().manual_seed(1)
    target = torch.rand(3, 24, 24, generator=gen)

    def f(x: Tensor) -> Tensor:
        return ((x - target) ** 2).sum() + 0.05 * (x ** 4).sum()

    x0 = torch.rand(3, 24, 24, generator=gen)
    *_, theirs = torch_path(f, x0, 40, 10)
    *_, ours = compact_path(f, x0, 40, 10)
    assert float(f(ours)) == pytest.approx(float(f(theirs)), rel=1e-3)
    assert float(f(ours)) < 0.2 * float(f(x0))
