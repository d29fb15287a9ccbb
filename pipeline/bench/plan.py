"""How big one bench run is: smoke (CI, checks the table), CPU, or CUDA (real sizes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """Sizes of one bench run: smoke (CI), CPU, or CUDA."""

    samples: dict[str, int]
    warmup: int
    reps: int
    peak_n: int
    digits_steps: int
    digits_chunk: int
    fashion_steps: int          # 0: no fashion-fc LCA run
    fashion_chunk: int
    train_workflow: str         # the training-overhead run
    train_steps: int
    train_reps: int
    workers: int | None         # None: compute_lca's default (one per GPU)
    threads: int | None = None  # torch threads here and per Dask worker; None: leave torch's default
    smoke: bool = False         # CI size: sections check their tables, not their numbers


def make_plan(smoke: bool, cuda: bool, fashion: bool) -> Plan:
    if smoke:
        return Plan({"fc": 2048, "lenet": 64, "resnet20": 16}, warmup=0, reps=2, peak_n=2048 if not cuda else 4096,
                    digits_steps=48, digits_chunk=16, fashion_steps=0, fashion_chunk=16,
                    train_workflow="digits-fc", train_steps=128, train_reps=1, workers=1, threads=1, smoke=True)
    if cuda:
        return Plan({"fc": 60000, "lenet": 60000, "resnet20": 50000}, warmup=3, reps=10, peak_n=8192,
                    digits_steps=300, digits_chunk=64, fashion_steps=480 if fashion else 0, fashion_chunk=64,
                    train_workflow="fashion-fc" if fashion else "digits-fc", train_steps=300, train_reps=3,
                    workers=None)
    return Plan({"fc": 60000, "lenet": 4096, "resnet20": 512}, warmup=1, reps=3, peak_n=2048,
                digits_steps=300, digits_chunk=64, fashion_steps=32 if fashion else 0, fashion_chunk=16,
                train_workflow="fashion-fc" if fashion else "digits-fc", train_steps=300, train_reps=3,
                workers=2)
