"""What a verified proposal costs, measured by the engine from its own step times.

A decode step takes about `fixed + per_row * R + per_context * C` seconds for R query rows, C
being the cached tokens of the sequences that verify proposals: `fixed` is what any step pays
(reading the weights, launching the layers), `per_row` what each more row adds (its share of the
matmuls, its sampling), `per_context` what verifying costs on top for each token a verifying
sequence attends to (it leaves the batched one-token decode path for the multi-token one: on the
CPU reference attention a pass per sequence and layer that gathers its whole context). On a GPU
at small batches both are small next to `fixed`, so verifying is nearly free; on a CPU, or a GPU
at large batches, it is not. The engine feeds every step made only of decodes and verifications
into an exponentially weighted least-squares fit of that plane, so the estimate follows the
machine (another job's load, a bigger batch) without any constant measured elsewhere. A fit of
steps that all speculate cannot tell what a plain step would cost, so every `EXPLORE_EVERY`-th
step proposes nothing: the plain point at the current batch size.

Making the proposals costs too: nothing to speak of for n-gram lookup, a forward of the draft
model per proposed position for a draft (speculator.py times the proposer apart from the step).
`observe_proposals` keeps a decayed mean of the seconds per proposed position; that forward is
shared by the sequences proposing in the step, so each pays about `per_proposal / B` per token.

`tokens_worth_proposing` turns the fit into a decision per request (speculator.py): with B
sequences decoding, a plain step yields B tokens for `fixed + per_row * B`, so a token is worth
`value = fixed / B + per_row` seconds (keeping the step's throughput is the bar). A run of j
proposals yields on average a + a^2 + ... + a^j more tokens at per-token acceptance a (the i-th
counts only if the i - 1 before it were accepted) and costs `per_context * context + j * per_row`
plus `j * per_proposal / B`: a draft as costly as the target never pays, a tenth of it does at
high acceptance.
The request proposes the j (at most num_speculative_tokens) with the largest positive net gain,
none if no j gains: many tokens at one stream, fewer when its acceptance is middling or the batch
is large (then `value` shrinks towards `per_row`), none when even the best run does not pay.
"""

from __future__ import annotations

import math

# Before the fit has data to tell the parts apart: one row costs 5% of a step's fixed part and
# verifying nothing more (about what a 2-core CPU measures on the bundled model at one stream).
PRIOR_SHARES = (0.05, 0.0)
# One plain step in this many: the fit's view of what not speculating costs now.
EXPLORE_EVERY = 20
_STALE = object()  # the fit is not solved for the steps observed since


class StepCostModel:
    """`fixed + per_row * rows + per_context * context` fit to recent decode steps; older steps
    weigh `decay` less per step, so about the last 1 / (1 - decay) steps count."""

    def __init__(self, decay: float = 0.98, prior_shares: tuple[float, float] = PRIOR_SHARES):
        self.decay = decay
        self.prior_shares = prior_shares
        # Decayed sums over steps of x x^T, x y and y^2, x = (1, rows, context), y = seconds. Plain
        # Python: a 3 x 3 solve per step; numpy's BLAS threads would compete with torch's for the cores.
        self.xtx = [[0.0] * 3 for _ in range(3)]
        self.xty = [0.0] * 3
        self.yty = 0.0
        self.steps = 0
        # Decayed mean seconds per proposed position (the proposer's own time), and the last step's
        # seconds: the scale for it while the fit cannot yet tell `fixed` apart.
        self.proposal_seconds: float | None = None
        self.last_step_seconds: float | None = None
        self._fitted = _STALE  # coefficients() of the steps observed so far, solved once per step

    @property
    def weight(self) -> float:
        """The decayed number of steps behind the fit."""
        return self.xtx[0][0]

    def plain_step(self) -> bool:
        """Whether this step should propose nothing (asked once per step)."""
        self.steps += 1
        return self.steps % EXPLORE_EVERY == 0

    def observe(self, rows: int, context: int, seconds: float) -> None:
        x = (1.0, float(rows), float(context))
        d = self.decay
        for i in range(3):
            for j in range(3):
                self.xtx[i][j] = d * self.xtx[i][j] + x[i] * x[j]
            self.xty[i] = d * self.xty[i] + x[i] * seconds
        self.yty = d * self.yty + seconds * seconds
        self.last_step_seconds = seconds
        self._fitted = _STALE

    def observe_proposals(self, positions: int, seconds: float) -> None:
        """The proposer took `seconds` for runs of at most `positions` tokens (a draft: that many
        forwards, batched over the proposing sequences)."""
        if positions < 1:
            return
        per = seconds / positions
        d = self.decay
        self.proposal_seconds = per if self.proposal_seconds is None else d * self.proposal_seconds + (1 - d) * per

    def proposal_share(self) -> float:
        """Seconds per proposed position as a fraction of a step's fixed cost (0 before any data)."""
        if self.proposal_seconds is None:
            return 0.0
        c = self.coefficients()
        scale = c[0] if c is not None else self.last_step_seconds
        return self.proposal_seconds / scale if scale else 0.0

    def coefficients(self) -> tuple[float, float, float] | None:
        """(fixed, per_row, per_context) in seconds, or None while the recent steps' row counts are
        too alike to separate a row's cost from the fixed part (or the fit is not a rising line).
        Solved once per observed step: `shares` and `proposal_share` both read it every step."""
        if self._fitted is _STALE:
            self._fitted = self._fit()
        return self._fitted

    def _fit(self) -> tuple[float, float, float] | None:
        w = self.weight
        if w < 4:
            return None
        mean_rows = self.xtx[0][1] / w
        if self.xtx[1][1] / w - mean_rows * mean_rows < 1.0:  # the same row count every step
            return None
        # Least squares with the two costs kept >= 0 (a row or a verification cannot save time):
        # the best of the fits on each subset of them. Rows and context both grow with the number
        # of verifying sequences, so the data often cannot split the two; then one carries both.
        best, best_residual = None, math.inf
        for keep in ((0, 1, 2), (0, 1), (0, 2), (0,)):
            a = [[self.xtx[i][j] + (1e-12 * w if i == j else 0.0) for j in keep] for i in keep]
            b = [self.xty[i] for i in keep]
            beta = _solve(a, b)
            if beta is None or any(v < 0 for v in beta[1:]):
                continue
            fitted = sum(beta[m] * self.xtx[i][j] * beta[n] for m, i in enumerate(keep) for n, j in enumerate(keep))
            residual = self.yty - 2 * sum(v * self.xty[i] for v, i in zip(beta, keep)) + fitted
            if residual < best_residual - 1e-15:
                best, best_residual = [0.0] * 3, residual
                for v, i in zip(beta, keep):
                    best[i] = v
        if best is None or best[0] <= 0 or not all(math.isfinite(v) for v in best):
            return None
        return best[0], best[1], best[2]

    def shares(self) -> tuple[float, float]:
        """(per_row, per_context) as fractions of `fixed`: all the decision needs (the scale cancels)."""
        c = self.coefficients()
        return self.prior_shares if c is None else (c[1] / c[0], c[2] / c[0])


class FixedCost:
    """A cost model with given shares: for tests, and for runs that must not adapt."""

    def __init__(self, row_share: float, context_share: float = 0.0, proposal_share: float = 0.0):
        self._shares = (row_share, context_share)
        self._proposal_share = proposal_share

    def plain_step(self) -> bool:
        return False

    def observe(self, rows: int, context: int, seconds: float) -> None:
        pass

    def observe_proposals(self, positions: int, seconds: float) -> None:
        pass

    def shares(self) -> tuple[float, float]:
        return self._shares

    def proposal_share(self) -> float:
        return self._proposal_share


def tokens_worth_proposing(acceptance: float, shares: tuple[float, float], batch_size: int, most: int,
                           context: int = 0, proposal_share: float = 0.0) -> int:
    """The number of proposals (0..most) with the largest positive expected net gain, in units of
    a step's fixed cost, for a sequence of `context` cached tokens; 0 when no run gains.
    `proposal_share`: what proposing one position costs the step (a draft forward), shared by the
    batch."""
    row_share, context_share = shares
    batch_size = max(batch_size, 1)
    value = 1.0 / batch_size + row_share  # one token's worth
    per_token = row_share + proposal_share / batch_size  # verifying one more proposal, and making it
    best, best_gain = 0, 0.0
    gain, reach = -context_share * context, 1.0
    for j in range(1, most + 1):
        reach *= acceptance  # the chance the j-th proposal is reached and accepted
        gain += value * reach - per_token
        if gain > best_gain:
            best, best_gain = j, gain
    return best


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """x with a x = b (Gaussian elimination with partial pivoting), None if a is singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        if abs(m[p][c]) < 1e-300:
            return None
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x
