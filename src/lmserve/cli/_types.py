"""Argument types shared by the commands. Each raises `argparse.ArgumentTypeError` with a message
for a human: argparse prints that as is (`argument --rpm: not an integer: 'abc'`), where any other
exception would print the function's own name (`invalid _positive value: 'abc'`)."""

from __future__ import annotations

import argparse


def integer_in(text: str, low: int, high: int | None = None, what: str = "an integer") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"in {low}..{high}" if high is not None else f"at least {low}"
        raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
    return value


def positive_int(text: str) -> int:
    return integer_in(text, 1)


def non_negative_int(text: str) -> int:
    return integer_in(text, 0)


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
