"""Sizes for people: one formatter shared by the memory estimate and the disk-space refusal."""


def human(n: float) -> str:
    """A size in the largest binary unit up to GiB that keeps it >= 1 (never '0.0 MiB' for 500 bytes)."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n:.0f} bytes"
