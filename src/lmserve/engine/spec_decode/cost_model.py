"""What a verified proposal costs, measured by the engine from its own step times.

A decode step over R query rows takes about `fixed + per_row * R` seconds: `fixed` is what any
step pays (reading the weights, launching the layers), `per_row` what each more row adds (its
share of the matmuls, its attention, its sampling). On a GPU at small batches `per_row` is tiny
next to `fixed`, so verifying k more rows is nearly free; on a CPU, or a GPU at large batches,
it is not. The engine feeds every step made only of decodes and verifications into an
exponentially weighted least-squares fit of that line, so the estimate follows the machine
(another job's load, a bigger batch) without any constant measured elsewhere.

`SpeculationPolicy` turns the fit into a decision per request (speculator.py): with B sequences
decoding, a plain step yields B tokens for `fixed + per_row * B`, so a token is worth
`fixed / B + per_row` seconds. The j-th proposed token of a run is reached, and so adds a token,
only if the j before it were all accepted: with per-token acceptance a it adds a^j tokens on
average, for `per_row` seconds. It pays while a^j * (fixed / B + per_row) > per_row, that is
while a^j > threshold(B) = per_row * B / (fixed + per_row * B): a threshold that rises with the
batch, from near 0 at one stream (speculate freely) towards 1 (speculate only what is nearly
certain). A request proposes the largest such j (at most num_speculative_tokens): fewer tokens
when its acceptance is middling, none when even the first does not pay.
"""

from __future__ import annotations

import math

# Before the fit has data to tell `per_row` from `fixed`: one row costs 5% of a step's fixed
# part (about what a 2-core CPU measures on the bundled model; a GPU measures far less).
PRIOR_ROW_SHARE = 0.05


class StepCostModel:
    """`fixed + per_row * rows` fit to (rows, seconds) of recent decode steps; older steps weigh
    `decay` less per step, so about the last 1 / (1 - decay) steps count."""

    def __init__(self, decay: float = 0.98, prior_row_share: float = PRIOR_ROW_SHARE):
        self.decay = decay
        self.prior_row_share = prior_row_share
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        d = self.decay
        self.w = d * self.w + 1.0
        self.sx = d * self.sx + rows
        self.sy = d * self.sy + seconds
        self.sxx = d * self.sxx + rows * rows
        self.sxy = d * self.sxy + rows * seconds

    def line(self) -> tuple[float, float] | None:
        """(fixed, per_row) in seconds, or None while the recent steps' row counts are too alike
        to separate the two (or the fit is not a rising line)."""
        if self.w < 4:
            return None
        mean_x = self.sx / self.w
        var_x = self.sxx / self.w - mean_x * mean_x
        if var_x < 1.0:  # the same row count every step: slope undetermined
            return None
        per_row = (self.sxy / self.w - mean_x * self.sy / self.w) / var_x
        fixed = self.sy / self.w - per_row * mean_x
        if per_row <= 0 or fixed <= 0 or not math.isfinite(per_row + fixed):
            return None
        return fixed, per_row

    def row_share(self) -> float:
        """per_row / fixed: all the decision needs (the absolute scale cancels)."""
        line = self.line()
        return self.prior_row_share if line is None else line[1] / line[0]


class FixedCost:
    """A cost model with a given row share: for tests and for runs that must not adapt."""

    def __init__(self, row_share: float):
        self._share = row_share

    def observe(self, rows: int, seconds: float) -> None:
        pass

    def row_share(self) -> float:
        return self._share


def acceptance_threshold(row_share: float, batch_size: int) -> float:
    """The per-token acceptance a proposal's j-th token must beat (a^j > this) to pay for its row."""
    cost = row_share * max(batch_size, 1)
    return cost / (1.0 + cost)


def tokens_worth_proposing(acceptance: float, threshold: float, most: int) -> int:
    """The largest j <= most with acceptance^j > threshold (0: not even one pays)."""
    if acceptance <= threshold:
        return 0
    if acceptance >= 1.0 or threshold <= 0.0:
        return most
    # a^j > t  <=>  j < log t / log a
    j = math.ceil(math.log(threshold) / math.log(acceptance)) - 1
    return max(0, min(most, j))
