"""`python -m serve_app.capacity`: the offline capacity planner, under the name users' scripts call.

The planner itself is serve_app/cluster/capacity.py.
"""

import sys

from serve_app.cluster.capacity import main

if __name__ == "__main__":
    sys.exit(main())
