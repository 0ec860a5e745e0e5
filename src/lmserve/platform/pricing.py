"""What a request costs: a deployment's price per million tokens for a key's tier (config
`price`, `tier_prices`), in integer nanos. (The model catalog itself is lmserve.models.catalog.)"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from lmserve.config import ModelDeployment


@dataclass(frozen=True)
class Price:
    input: Decimal = Decimal(0)  # per million prompt tokens
    output: Decimal = Decimal(0)  # per million completion tokens

    @property
    def free(self) -> bool:
        return not self.input and not self.output

    def cost_nanos(self, prompt_tokens: int, completion_tokens: int) -> int:
        # per million tokens -> nanos per token is price * 1000; rounded once per request.
        return int((self.input * prompt_tokens + self.output * completion_tokens) * 1000)


def price_for(deployment: ModelDeployment, tier: str) -> Price:
    raw = deployment.tier_prices.get(tier) or deployment.price
    if not raw:
        return Price()
    return Price(Decimal(str(raw.get("input", 0))), Decimal(str(raw.get("output", 0))))


def batch_price_for(deployment: ModelDeployment, tier: str) -> Price:
    """A batch line's price: the deployment's `batch_price`, else half its price for the tier
    (as the hosted platform discounts batch work)."""
    if deployment.batch_price:
        raw = deployment.batch_price
        return Price(Decimal(str(raw.get("input", 0))), Decimal(str(raw.get("output", 0))))
    full = price_for(deployment, tier)
    return Price(full.input / 2, full.output / 2)
