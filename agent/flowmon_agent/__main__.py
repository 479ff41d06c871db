"""`python -m flowmon_agent`: the node agent (the agent image's command)."""

import sys

from flowmon_agent.main import main

sys.exit(main())
