/* flowgen IP RATE SECS: new UDP flows at RATE per second for SECS seconds, one 16-byte
   datagram each, to IP (bench/failover.sh's sync cost). Flow i leaves socket i % SOCKETS (64
   sockets, so 64 source ports) for port 20000 + (i / SOCKETS) % 40000 of IP: 2,560,000 distinct
   5-tuples before one repeats, so every datagram is a new flow for a NAT in its path (a new
   conntrack entry, a new vipgate flow). Paced every millisecond against the schedule, so a
   late wake-up sends the backlog. Prints the flows sent. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define SOCKETS 64
#define PORTS 40000

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: flowgen IP RATE SECS\n");
    return 2;
  }
  struct sockaddr_in dst = {.sin_family = AF_INET};
  if (inet_pton(AF_INET, argv[1], &dst.sin_addr) != 1) {
    fprintf(stderr, "flowgen: bad address %s\n", argv[1]);
    return 2;
  }
  double rate = atof(argv[2]), secs = atof(argv[3]);
  if (rate <= 0 || secs <= 0) {
    fprintf(stderr, "flowgen: RATE and SECS must be positive\n");
    return 2;
  }
  int s[SOCKETS];
  for (int k = 0; k < SOCKETS; k++) {
    s[k] = socket(AF_INET, SOCK_DGRAM, 0);
    if (s[k] < 0) {
      perror("socket");
      return 1;
    }
  }
  char buf[16] = "flowgen";
  long sent = 0;
  double start = now();
  for (;;) {
    double t = now() - start;
    if (t >= secs) break;
    long due = (long)(t * rate);
    for (; sent < due; sent++) {
      dst.sin_port = htons(20000 + (sent / SOCKETS) % PORTS);
      /* A full socket buffer drops the datagram: the flow is still counted as sent; the
         caller compares with what the gateway created. */
      sendto(s[sent % SOCKETS], buf, sizeof buf, 0, (struct sockaddr *)&dst, sizeof dst);
    }
    usleep(1000);
  }
  printf("%ld\n", sent);
  return 0;
}
