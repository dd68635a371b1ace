#!/usr/bin/env python3
"""Container health check: exit 0 when URL answers 200.

The default URL is this container's tritonserver readiness,
http://127.0.0.1:$HTTP_PORT/v2/health/ready (all models loaded and ready).
"""

import os
import sys
import urllib.request


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else (
        f"http://127.0.0.1:{os.environ.get('HTTP_PORT') or 8000}/v2/health/ready"
    )
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:  # connection refused, HTTP 400/503, timeout
        print(f"{url}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
