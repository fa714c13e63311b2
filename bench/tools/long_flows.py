"""long_flows.py echo SERVER_PORT | long_flows.py client ADDR PORT N READY GO TIMEOUT
(bench/failover.sh).

echo: an asyncio echo server on 0.0.0.0:PORT.
client: opens N TCP connections to ADDR:PORT, each proven end to end by a 1-byte echo, then
touches READY and waits for the file GO (the caller crashed the master meanwhile); then sends
one byte on every connection and prints how many got it echoed within TIMEOUT seconds (a
connection the new master does not know is reset or stays silent)."""
import asyncio, os, resource, sys

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(port):
    async def echo(r, w):
        try:
            while data := await r.read(4096):
                w.write(data)
                await w.drain()
        except OSError:
            pass
        w.close()

    server = await asyncio.start_server(echo, "0.0.0.0", port, backlog=4096)
    async with server:
        await server.serve_forever()


async def one(addr, port, sem):
    async with sem:
        r, w = await asyncio.open_connection(addr, port)
        w.write(b"a")
        await w.drain()
        if await r.readexactly(1) != b"a":
            raise SystemExit("bad echo")
        return r, w


async def probe(r, w, timeout):
    try:
        w.write(b"b")
        await w.drain()
        return await asyncio.wait_for(r.readexactly(1), timeout) == b"b"
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return False


async def client(addr, port, n, ready, go, timeout):
    sem = asyncio.Semaphore(128)
    conns = await asyncio.gather(*[one(addr, port, sem) for _ in range(n)])
    open(ready, "w").close()
    while not os.path.exists(go):
        await asyncio.sleep(0.02)
    alive = await asyncio.gather(*[probe(r, w, timeout) for r, w in conns])
    print(sum(alive), flush=True)


if sys.argv[1] == "echo":
    asyncio.run(serve(int(sys.argv[2])))
else:
    a = sys.argv[2:]
    asyncio.run(client(a[0], int(a[1]), int(a[2]), a[3], a[4], float(a[5])))
