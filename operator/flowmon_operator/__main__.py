"""`python -m flowmon_operator`: the kopf operator (the operator image's command)."""

import sys

from flowmon_operator.main import main

sys.exit(main())
