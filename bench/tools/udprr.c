/* udprr: UDP request/response load for bench/lb_udp.sh.
     udprr server ADDR PORT NAME       answers every datagram with NAME (one thread)
     udprr client IP PORT WORKERS SECS each worker thread keeps DEPTH (8) datagrams of 32 B in
                                       flight from its own socket to IP:PORT, sending one more
                                       for each answer; 100 ms without an answer counts the
                                       ones in flight lost and sends DEPTH again.
   The client prints "ANSWERED_PER_S RS1_SHARE LOST": answers per second over SECS, the share
   of answers that came from the server named rs1, and the datagrams counted lost. Its
   sockets are connected, so only answers from IP:PORT are read. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define DEPTH 8

static struct sockaddr_in dst;
static double secs;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

struct res { long answered, rs1, lost; };

static void *work(void *arg) {
  struct res *r = arg;
  char buf[32], got[64];
  memset(buf, 'q', sizeof buf);
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  if (s < 0 || connect(s, (void *)&dst, sizeof dst) < 0) { perror("client socket"); exit(1); }
  double stop = now() + secs;
  int inflight = 0;
  while (now() < stop) {
    while (inflight < DEPTH) {
      if (send(s, buf, sizeof buf, 0) == sizeof buf) inflight++;
      else break;
    }
    struct pollfd p = { .fd = s, .events = POLLIN };
    if (poll(&p, 1, 100) <= 0) { r->lost += inflight; inflight = 0; continue; }
    ssize_t n = recv(s, got, sizeof got, MSG_DONTWAIT);
    if (n <= 0) continue;
    if (inflight > 0) inflight--;  /* a late answer after a timeout counts, adds nothing */
    r->answered++;
    if (n == 3 && !memcmp(got, "rs1", 3)) r->rs1++;
  }
  close(s);
  return NULL;
}

static int server(const char *addr, int port, const char *name) {
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
  if (s < 0 || inet_pton(AF_INET, addr, &a.sin_addr) != 1 || bind(s, (void *)&a, sizeof a) < 0) {
    perror("server socket");
    return 1;
  }
  size_t len = strlen(name);
  for (;;) {
    char buf[2048];
    struct sockaddr_in from;
    socklen_t fl = sizeof from;
    if (recvfrom(s, buf, sizeof buf, 0, (void *)&from, &fl) >= 0)
      sendto(s, name, len, 0, (void *)&from, fl);
  }
}

int main(int argc, char **argv) {
  if (argc == 5 && !strcmp(argv[1], "server")) return server(argv[2], atoi(argv[3]), argv[4]);
  if (argc != 6 || strcmp(argv[1], "client")) {
    fprintf(stderr, "usage: udprr server ADDR PORT NAME | udprr client IP PORT WORKERS SECS\n");
    return 2;
  }
  dst.sin_family = AF_INET;
  dst.sin_port = htons(atoi(argv[3]));
  if (inet_pton(AF_INET, argv[2], &dst.sin_addr) != 1) { fprintf(stderr, "bad address\n"); return 2; }
  int w = atoi(argv[4]);
  secs = atof(argv[5]);
  if (w < 1 || w > 256 || secs <= 0) { fprintf(stderr, "bad workers or seconds\n"); return 2; }
  pthread_t t[256];
  struct res r[256];
  memset(r, 0, sizeof r);
  double t0 = now();
  for (int i = 0; i < w; i++) pthread_create(&t[i], NULL, work, &r[i]);
  long answered = 0, rs1 = 0, lost = 0;
  for (int i = 0; i < w; i++) {
    pthread_join(t[i], NULL);
    answered += r[i].answered;
    rs1 += r[i].rs1;
    lost += r[i].lost;
  }
  double el = now() - t0;
  printf("%.0f %.4f %ld\n", answered / el, answered ? (double)rs1 / answered : 0.0, lost);
  return 0;
}
