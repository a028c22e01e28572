"""Peak memory of the API for request bodies that amplify: a 17 MiB JSON list of URLs, a 17 MiB
URI-list manifest (both far over ``BATCHVISION_MAX_URLS_PER_JOB``), and a JSON body nested
20,000 levels deep. Each case runs in a fresh process (the app in-process, Flask's test client,
a private redis-server); prints the status, the process's RSS before the request, its peak
during the request (``VmHWM``, reset just before), and the difference.

    python bench/amplification.py
"""

from __future__ import annotations

import subprocess
import sys

CASES = ("urls-json", "urls-manifest", "nested-json")

_CHILD = r"""
import json, resource, sys
from api import create_app
from batchvision.core.settings import Settings
case, url = sys.argv[1], sys.argv[2]
app = create_app(Settings.from_env({}, redis_url=url))
client = app.test_client()
urls = [f"https://e.com/{i:09d}.jpg" for i in range(600_000)]
if case == "urls-json":
    body, ctype = json.dumps({"urls": urls}).encode(), "application/json"
elif case == "urls-manifest":
    body, ctype = "\n".join(urls).encode(), "text/uri-list"
else:
    body, ctype = b"[" * 20000 + b"]" * 20000, "application/json"
del urls
import gc; gc.collect()
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:  # the peak (VmHWM) starts again from now
    fh.write("5")
resp = client.post("/v1/jobs", data=body, content_type=ctype)
peak = status("VmHWM")
print(json.dumps({"case": case, "body_mib": round(len(body) / 2**20, 1), "status": resp.status_code,
                  "rss_before_mib": round(before, 1), "peak_rss_mib": round(peak, 1),
                  "added_mib": round(peak - before, 1)}))
"""


def main() -> None:
    from batchvision.testing.servers import RedisServer

    with RedisServer() as server:
        for case in CASES:
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, case, server.url], capture_output=True, text=True, check=False
            )
            line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]
            print(line)


if __name__ == "__main__":
    main()
