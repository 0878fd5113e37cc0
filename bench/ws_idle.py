"""Hold N idle WebSocket tunnel sessions open (run inside the client namespace by bench/memory.py).

Tokens come on the first line of stdin, comma-separated (never in argv).  Prints "open N" once
every session is up, then "alive N" for each line read on stdin, and
closes everything when stdin ends.
"""
import asyncio
import resource
import sys

from websockets.asyncio.client import connect


async def open_one(url, token, sem):
    async with sem:
        return await connect(url, additional_headers={"Authorization": "Bearer " + token},
                             compression=None, open_timeout=60, ping_interval=None)


async def main(url):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tokens = [t.strip() for t in sys.stdin.readline().split(",") if t.strip()]
    sem = asyncio.Semaphore(50)
    sessions = await asyncio.gather(*(open_one(url, t, sem) for t in tokens))
    print("open %d" % len(sessions), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        alive = sum(1 for s in sessions if s.state.name == "OPEN")
        print("alive %d" % alive, flush=True)
    await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
