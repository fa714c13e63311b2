"""hold.py PORT N: open N connections to 127.0.0.1:PORT, each proven end to end by a 1-byte
echo, print the seconds taken, then wait for a line on stdin (while the caller measures
memory) and close them (bench/ssh.sh)."""
import asyncio, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
async def one(sem):
    async with sem:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"x"); await w.drain()
        if await r.readexactly(1) != b"x": raise SystemExit("bad echo")
        return w
async def main():
    sem = asyncio.Semaphore(256)
    t0 = time.time()
    ws = await asyncio.gather(*[one(sem) for _ in range(n)])
    print("%.2f" % (time.time() - t0), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for w in ws: w.close()
asyncio.run(main())
