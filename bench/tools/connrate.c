/* connrate PORT WORKERS SECS: each worker thread loops connect, send 100 B, read the 100 B
   back (checked), close. Prints connections/s, mean latency (us) and its own CPU seconds. */
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static int port; static double secs;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
struct res { long count; double lat; };
static void *work(void *arg) {
  struct res *r = arg; char buf[100], got[100]; memset(buf, 'x', sizeof buf);
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  double stop = now() + secs;
  for (;;) {
    double t0 = now(); if (t0 >= stop) break;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0 || connect(s, (void *)&a, sizeof a) < 0) { perror("connect"); exit(1); }
    if (write(s, buf, sizeof buf) != sizeof buf) { perror("write"); exit(1); }
    size_t n = 0;
    while (n < sizeof got) {
      ssize_t k = read(s, got + n, sizeof got - n);
      if (k <= 0) { fprintf(stderr, "closed early\n"); exit(1); }
      n += k;
    }
    if (memcmp(buf, got, sizeof buf)) { fprintf(stderr, "bad echo\n"); exit(1); }
    close(s); r->count++; r->lat += now() - t0;
  }
  return NULL;
}
int main(int argc, char **argv) {
  if (argc != 4) { fprintf(stderr, "usage: connrate PORT WORKERS SECS\n"); return 2; }
  port = atoi(argv[1]); int w = atoi(argv[2]); secs = atof(argv[3]);
  pthread_t t[w]; struct res r[w]; memset(r, 0, sizeof r);
  double t0 = now();
  for (int i = 0; i < w; i++) pthread_create(&t[i], NULL, work, &r[i]);
  long c = 0; double lat = 0;
  for (int i = 0; i < w; i++) { pthread_join(t[i], NULL); c += r[i].count; lat += r[i].lat; }
  struct rusage ru; getrusage(RUSAGE_SELF, &ru);
  printf("%.0f %.0f %.4f\n", c / (now() - t0), c ? lat / c * 1e6 : 0,
         ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
  return 0;
}
