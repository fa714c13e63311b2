"""long_flows.py echo SERVER_PORT | long_flows.py client ADDR PORT N READY GO TIMEOUT [ROUNDS]
| long_flows.py churn ADDR PORT RATE SECS (bench/failover.sh).

echo: an asyncio echo server on 0.0.0.0:PORT.
client: opens N TCP connections to ADDR:PORT, each proven end to end by a 1-byte echo, then
touches READY and waits for the file GO (the caller crashed the master meanwhile); then sends
one byte on every connection and prints how many got it echoed within TIMEOUT seconds (a
connection the new master does not know is reset or stays silent). With ROUNDS (default 1),
round K > 1 waits for GO.K after touching READY.K-1, probes the connections still alive and
prints how many still are (a connection dead in one round stays dead).
churn: opens RATE new connections per second to ADDR:PORT for SECS seconds or until SIGTERM,
each one 1-byte echo then closed (load on the gateways' tables and their sync, not measured);
prints the attempts and the ones echoed."""
import asyncio, os, resource, signal, sys

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


async def client(addr, port, n, ready, go, timeout, rounds):
    sem = asyncio.Semaphore(128)
    conns = await asyncio.gather(*[one(addr, port, sem) for _ in range(n)])
    open(ready, "w").close()
    for k in range(1, rounds + 1):
        if k > 1:
            open("%s.%d" % (ready, k - 1), "w").close()
        flag = go if k == 1 else "%s.%d" % (go, k)
        while not os.path.exists(flag):
            await asyncio.sleep(0.02)
        alive = await asyncio.gather(*[probe(r, w, timeout) for r, w in conns])
        conns = [c for c, ok in zip(conns, alive) if ok]
        print(len(conns), flush=True)


async def churn(addr, port, rate, secs):
    done = [0, 0]

    async def short():
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(addr, port), 5)
            w.write(b"c")
            await w.drain()
            ok = await asyncio.wait_for(r.readexactly(1), 5) == b"c"
            w.close()
            done[1] += ok
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    start = loop.time()
    tasks = set()
    while (t := loop.time() - start) < secs and not stop.is_set():
        while done[0] < int(t * rate):
            done[0] += 1
            task = asyncio.create_task(short())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(0.005)
    await asyncio.wait(tasks, timeout=1) if tasks else None
    print(done[0], done[1], flush=True)


if sys.argv[1] == "echo":
    asyncio.run(serve(int(sys.argv[2])))
elif sys.argv[1] == "churn":
    a = sys.argv[2:]
    asyncio.run(churn(a[0], int(a[1]), float(a[2]), float(a[3])))
else:
    a = sys.argv[2:]
    rounds = int(a[6]) if len(a) > 6 else 1
    asyncio.run(client(a[0], int(a[1]), int(a[2]), a[3], a[4], float(a[5]), rounds))
