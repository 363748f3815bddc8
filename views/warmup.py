"""Compile (or load from numba's disk cache) the projection's kernels before the first view needs them."""


def warm_up() -> None:
    from analysis import jit

    jit.warm_up()
