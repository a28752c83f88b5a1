"""Largest /health latency while two clients POST ~1.9 MB /embed bodies (issue 20, item 3).

Usage: python3 bench/health_stall.py http://127.0.0.1:3000   (a running `search-r3 serve`)
"""
import json, sys, threading, time, urllib.request
base = sys.argv[1]
text = "lorem ipsum dolor sit amet " * (1_900_000 // 27)
body = json.dumps({"inputs": text, "truncate": True}).encode()
def embed(out):
    t = time.time()
    try:
        r = urllib.request.urlopen(urllib.request.Request(base + "/embed", body, {"content-type": "application/json"}), timeout=600)
        out.append((r.status, time.time() - t))
    except urllib.error.HTTPError as e:
        out.append((e.code, time.time() - t))
lat = []
done = []
ts = [threading.Thread(target=embed, args=(done,)) for _ in range(2)]
for t in ts: t.start()
while any(t.is_alive() for t in ts):
    t0 = time.time(); urllib.request.urlopen(base + "/health", timeout=60).read(); lat.append(time.time() - t0)
    time.sleep(0.01)
for t in ts: t.join()
lat.sort()
print(json.dumps({"embed": done, "health_polls": len(lat), "health_max_s": round(lat[-1], 3), "health_p50_s": round(lat[len(lat)//2], 4)}))
