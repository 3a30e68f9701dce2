"""`python -m fastsample ...` (and `torchrun ... -m fastsample sample ...`): the CLI."""

from .cli import main

if __name__ == "__main__":
    main()
