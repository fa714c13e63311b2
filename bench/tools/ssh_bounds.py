"""ssh_bounds.py RESULTS.tsv CORES: what a forwarder could reach at best (bench/ssh.sh).

From OpenSSH's own connection-rate runs: one client is a serial chain (one process at a time
works on the connection), so its time per connection would shrink by the forwarder's CPU at
best; with 8 clients the shared processes' CPU per connection over all cores caps the rate.
"""
import statistics
import sys

values = {}
for line in open(sys.argv[1]):
    parts = line.rstrip("\n").split("\t")
    if len(parts) != 3:
        continue
    try:
        values.setdefault((parts[0], parts[1]), []).append(float(parts[2]))
    except ValueError:
        pass
cores = int(sys.argv[2])


def med(metric, mode="openssh"):
    v = values.get((metric, mode))
    return statistics.median(v) if v else None


print("(cpu_*_us: CPU per connection of fwd = ssh or vipgate; sshd = the server alone, whose work")
print(" depends on what the client sends; rest = sshd + echo server + load generator)")
fwd, rest = med("conn_1client_cpu_fwd_us"), med("conn_1client_cpu_rest_us")
if fwd is not None and rest:
    print("bound, 1 client: a zero-cost forwarder reaches at most %.2fx OpenSSH "
          "(shared %.0f us + ssh %.0f us per connection)" % ((fwd + rest) / rest, rest, fwd))
    relay = med("conn_1client_cpu_fwd_us", "haproxy")
    if relay:
        print("floor: haproxy relaying plain TCP (no SSH, %.0f/s) costs %.0f us per connection; a "
              "forwarder that cheap reaches at most %.2fx OpenSSH with 1 client"
              % (med("conn_1client_per_s", "haproxy"), relay, (fwd + rest) / (rest + relay)))
rest8, rate8 = med("conn_8client_cpu_rest_us"), med("conn_8client_per_s")
if rest8 and rate8:
    print("bound, 8 clients: %d cores / %.0f us shared CPU per connection = %.0f/s at most, %.2fx OpenSSH"
          % (cores, rest8, cores * 1e6 / rest8, cores * 1e6 / rest8 / rate8))
