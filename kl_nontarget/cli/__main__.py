"""`python -m kl_nontarget.cli ...` (how `kl-nontarget sft` relaunches itself under `accelerate launch`)."""

import sys

from kl_nontarget.cli import main

sys.exit(main())
