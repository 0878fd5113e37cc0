import base64, json, os, time, tracemalloc, resource, sys
n = 60000
peers = [{"public_key": base64.b64encode(os.urandom(32)).decode(), "allowed_ips": ["10.8.%d.%d/32" % (i // 250, i % 250 + 2), "fd00:8::%x/128" % i],
          "endpoint": "198.51.100.%d:%d" % (i % 250, 40000 + i % 20000) if i % 3 == 0 else None,
          "latest_handshake": 1765000000 if i % 3 == 0 else 0, "rx_bytes": i * 1000, "tx_bytes": i * 2000, "keepalive": 0}
         for i in range(n)]
peers.sort(key=lambda p: p["public_key"])
whole = json.dumps({"id": 1, "ok": True, "result": {"peers": peers}}, separators=(",", ":")).encode()
pages = [json.dumps({"id": 1, "ok": True, "result": {"peers": peers[i:i + 2000], "dump": 1, "total": n}}, separators=(",", ":")).encode() for i in range(0, n, 2000)]
del peers
mode = sys.argv[1]
if os.environ.get("TM"): tracemalloc.start()
if mode == "whole":
    t = time.perf_counter(); d = json.loads(whole); dt = time.perf_counter() - t
    print("whole: %.1f MB frame, decode %.0f ms, peak %.1f MB" % (len(whole) / 1e6, dt * 1e3, tracemalloc.get_traced_memory()[1] / 1e6))
else:
    worst = 0
    for p in pages:
        t = time.perf_counter(); d = json.loads(p); worst = max(worst, time.perf_counter() - t); del d
    print("pages: %d frames of %.2f MB, slowest decode %.1f ms, peak %.1f MB" % (len(pages), len(pages[0]) / 1e6, worst * 1e3, tracemalloc.get_traced_memory()[1] / 1e6))
