"""`python -m duetlm.cli ARGS`: the `duet` command."""

from duetlm.cli import main

main()
