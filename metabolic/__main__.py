"""`python -m metabolic ...` (what torchrun and deepspeed launch) is the `metabolic` CLI."""

import sys

from metabolic.launcher.cli import main

sys.exit(main())
