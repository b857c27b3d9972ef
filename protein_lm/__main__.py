"""`python -m protein_lm` == `protein-lm`."""

import sys

from protein_lm.cli import main

sys.exit(main())
