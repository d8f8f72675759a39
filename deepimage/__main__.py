"""Entry point for ``python -m deepimage`` (and ``torchrun -m deepimage``)."""

from deepimage.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
