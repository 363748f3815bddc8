"""Compile (or load from numba's disk cache) the projection's kernels before the first view needs them."""


def warm_up() -> None:
    from analysis import jit

    jit.warm_up()


def is_warm() -> bool:
    """Whether this installation's kernels were compiled to disk already (a start then loads them)."""
    from analysis import jit

    return jit.is_warm()


def waiting_note(compiling: bool, warm: bool) -> str:
    """What the spinner adds while the server's first UMAP may still be getting its kernels, in words true
    for both cases: loading a few seconds, or compiling on the first start of an installation."""
    if not compiling:
        return ""
    if warm:
        return " Loading the compiled projection kernels (a few seconds)."
    return (" The projection kernels are compiling: the first start of this installation, about 1-2 minutes on "
            "2 cores; later starts load them in seconds (`python -m views warm-up` does it ahead).")
