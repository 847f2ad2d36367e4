"""`python -m confu_lightning` is the `confu` command."""

from confu_lightning.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
