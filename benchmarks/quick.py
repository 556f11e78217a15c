"""`--quick` for every benchmark: each code path once, at sizes that take seconds, for the tests (the README
test runs every benchmark command so); the figures it prints mean nothing."""

from __future__ import annotations

import argparse


def add_quick(p: argparse.ArgumentParser, **smoke) -> dict:
    """A --quick flag that sets these options (by their dest) unless they were given."""
    shown = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in smoke.items())
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run of every code path at tiny sizes, not a measurement: {shown} (default: off)")
    return smoke


def apply_quick(p: argparse.ArgumentParser, args: argparse.Namespace, smoke: dict) -> argparse.Namespace:
    if args.quick:
        for dest, value in smoke.items():
            if getattr(args, dest) == p.get_default(dest):
                setattr(args, dest, value)
        print("--quick: a smoke run at tiny sizes; its figures are not a measurement")
    return args
