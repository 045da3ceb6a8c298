"""`python -m serve_app.usage`: the usage report, under the name users' scripts call.

The report itself is serve_app/accounts/usage_report.py.
"""

import sys

from serve_app.accounts.usage_report import main

if __name__ == "__main__":
    sys.exit(main())
