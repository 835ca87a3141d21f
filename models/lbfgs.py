"""L-BFGS for one tensor with one host synchronisation per iteration (style transfer's optimiser).

The iteration is that of `torch.optim.LBFGS(lr, max_iter=1, line_search_fn=None)`: the first step goes along the
negative gradient with length min(1, 1 / |g|_1) * lr, later steps along -H g with length lr, where H is the
limited-memory inverse-Hessian estimate of the last `history` curvature pairs (s, y), a pair is kept only when
y.s > 1e-10, and the initial scale is gamma = y.s / y.y of the newest pair. It differs in how H g is computed.

torch's two-loop recursion runs 2 x history dot products and updates, and passes each dot product to the next
update as a Python number: 2 x history device synchronisations per step (100 at the history of 50), each of which
empties the GPU's queue while the host launches the next small kernel (an H200 took 13 ms per 512 px step; how much
of it these waits were was not measured). Here H g uses the compact representation of Byrd, Nocedal and Schnabel (1994,
"Representations of quasi-Newton matrices and their use in limited memory methods", eq. 3.1 for H):

    H = gamma I + [S  gamma Y] [[R^-T (D + gamma Y^T Y) R^-1, -R^-T], [-R^-1, 0]] [S^T; gamma Y^T]

with S, Y the pairs as columns (oldest first), R the upper triangle of S^T Y and D its diagonal. The pairs live in
one (2, history, n) buffer written round-robin; per step one batched product gives every inner product with the
newest pair and the gradient, a few history x history operations (float64) give the coefficients, and two
matrix-vector products form H g. The only host synchronisation reads the caller's report (the loss, for the best
image and the job's progress) together with y.s and y.y, which decide whether the pair is kept.

Use it as two calls per iteration: `evaluate(closure)` (the closure computes the loss, calls backward and returns
a 1-D tensor of scalars to report; returned as floats, x unchanged) and then `advance()` (memory update, step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

CURVATURE_EPS = 1e-10  # torch.optim.LBFGS keeps a pair only when y.s exceeds this


class CompactLBFGS:
    """L-BFGS on the tensor `x` (updated in place; it must require grad and be contiguous)."""

    def __init__(self, x: Tensor, *, lr: float = 1.0, history: int = 50) -> None:
        if not x.is_contiguous():
            raise ValueError("x must be contiguous")
        self.x, self.lr, self.m = x, lr, history
        n = x.numel()
        # [0]: S rows, [1]: Y rows, by slot; only the slots holding pairs are ever read (empty: on the CPU the pages
        # become resident as pairs arrive, as torch's list of pairs grows)
        self.pairs = torch.empty(2, history, n, dtype=x.dtype, device=x.device)
        f64, dev = torch.float64, x.device
        self.sy = torch.zeros(history, history, dtype=f64, device=dev)  # s_i . y_j, oldest first
        self.yy = torch.zeros(history, history, dtype=f64, device=dev)  # y_i . y_j, oldest first
        self.gamma = torch.ones((), dtype=f64, device=dev)
        self.count = 0  # pairs held
        self.next_slot = 0  # where the next pair goes (the oldest one's slot once full)
        self.g: Tensor | None = None  # the gradient of the last evaluation
        self.g_prev: Tensor | None = None
        self.d_prev: Tensor | None = None  # the last step taken is d_prev * t_prev
        self.t_prev: Tensor | None = None
        self._curvature: tuple[float, float] | None = None
        self._pair: tuple[Tensor, Tensor] | None = None

    def evaluate(self, closure: Callable[[], Tensor]) -> list[float]:
        """Run the closure at x and read its report in the iteration's one synchronisation."""
        report = closure().detach().reshape(-1)
        if self.x.grad is None:
            raise RuntimeError("the closure left no gradient on x")
        g = self.x.grad.detach().reshape(-1).clone()
        self.g = g
        if self.g_prev is None or self.d_prev is None or self.t_prev is None:
            self._pair = None
            return report.tolist()  # type: ignore[no-any-return]
        y = g - self.g_prev
        s = self.d_prev * self.t_prev
        scalars = torch.cat([report.to(torch.float64), torch.stack([y.dot(s), y.dot(y)]).to(torch.float64)])
        values: list[float] = scalars.tolist()
        self._pair = (s, y)
        self._curvature = (values[-2], values[-1])
        return values[:-2]

    def advance(self) -> None:
        """Take the step from the last evaluation: update the memory, compute -H g, move x."""
        g = self.g
        if g is None:
            raise RuntimeError("advance() needs an evaluate() first")
        first = self.g_prev is None
        if self._pair is not None and self._curvature is not None and self._curvature[0] > CURVATURE_EPS:
            s, y = self._pair
            products = self._push(s, y, g, self._curvature)
        elif self.count:
            products = self._used() @ g
        else:
            products = None
        d = -(self._inverse_hessian_times(g, products) if products is not None else self.gamma.to(g.dtype) * g)
        if first:  # torch's first step: min(1, 1 / |g|_1) * lr
            t = torch.clamp(1.0 / g.abs().sum(), max=1.0) * self.lr
        else:
            t = torch.full((), self.lr, dtype=g.dtype, device=g.device)
        # not a descent direction (torch stops there): no step, and no curvature pair from it
        t = torch.where(g.dot(d) > 0, torch.zeros_like(t), t)
        with torch.no_grad():
            self.x.view(-1).add_(d * t)
        self.g_prev, self.d_prev, self.t_prev = g, d, t
        self.g, self._pair, self._curvature = None, None, None

    # -- the memory -------------------------------------------------------------------------------------------

    def _used(self) -> Tensor:
        """The slots holding pairs: (2, slots, n), a view."""
        return self.pairs[:, : self.count]  # slots 0..count-1 until full, then all

    def _head(self) -> int:
        """The slot of the oldest pair."""
        return self.next_slot if self.count == self.m else 0

    def _chrono(self, by_slot: Tensor) -> Tensor:
        """Per-slot values (the used slots) in the order the pairs came, oldest first."""
        head = self._head()
        return torch.roll(by_slot, -head) if head else by_slot

    def _push(self, s: Tensor, y: Tensor, g: Tensor, curvature: tuple[float, float]) -> Tensor:
        """Store the pair (dropping the oldest when full); returns the used slots' products with g, (2, slots)."""
        m, slot = self.m, self.next_slot
        self.pairs[0, slot].copy_(s)
        self.pairs[1, slot].copy_(y)
        if self.count == m:  # the oldest pair (first row and column) leaves; the new one takes the last place
            self.sy = torch.roll(self.sy, shifts=(-1, -1), dims=(0, 1))
            self.yy = torch.roll(self.yy, shifts=(-1, -1), dims=(0, 1))
        else:
            self.count += 1
        self.next_slot = (slot + 1) % m
        k = self.count
        products = self._used() @ torch.stack([s, y, g], dim=1)  # (2, k, 3): every s_i and y_i against s, y, g
        p = products.to(torch.float64)
        self.sy[k - 1, :k] = self._chrono(p[1, :, 0])  # s_new . y_j
        self.sy[:k, k - 1] = self._chrono(p[0, :, 1])  # s_i . y_new
        y_y = self._chrono(p[1, :, 1])
        self.yy[k - 1, :k] = y_y
        self.yy[:k, k - 1] = y_y
        ys, yy = curvature
        self.gamma = torch.full((), ys / yy, dtype=torch.float64, device=g.device)
        return products[:, :, 2]

    def _inverse_hessian_times(self, g: Tensor, products: Tensor) -> Tensor:
        """H g from the compact representation; `products` = the used slots' products with g, (2, slots)."""
        k = self.count
        p = products.to(torch.float64)
        sg, yg = self._chrono(p[0]), self._chrono(p[1])
        sy = self.sy[:k, :k]
        r = torch.triu(sy)
        gamma = self.gamma
        v = torch.linalg.solve_triangular(r, sg[:, None], upper=True)
        w = (torch.diag(torch.diagonal(sy)) + gamma * self.yy[:k, :k]) @ v - gamma * yg[:, None]
        a = torch.linalg.solve_triangular(r.mT, w, upper=False)[:, 0]
        b = -gamma * v[:, 0]
        head = self._head()
        if head:  # back from the order the pairs came in to their slots
            a, b = torch.roll(a, head), torch.roll(b, head)
        used = self._used()
        out = torch.addmv(gamma.to(g.dtype) * g, used[0].t(), a.to(g.dtype))
        return out.addmv_(used[1].t(), b.to(g.dtype))
