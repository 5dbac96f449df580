"""`python -m omnilm ...` is the `omnilm` command (and what torchrun launches: `torchrun ... -m omnilm train`)."""

from omnilm.cli import main

main()
