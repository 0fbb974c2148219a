"""`python -m megagen` — the same as the `megagen` console script (torchrun launches this)."""

from megagen.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
