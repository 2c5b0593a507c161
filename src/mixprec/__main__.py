"""`python -m mixprec ...` (what torchrun launches) is the `mixprec` command."""

from mixprec.cli import main

raise SystemExit(main())
