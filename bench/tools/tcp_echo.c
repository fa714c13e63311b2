/* tcp_echo PORT: a single-threaded epoll echo server on 127.0.0.1 (bench/ssh.sh). A connection
   whose peer is slow to read is not read from until its backlog is written. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
struct conn { int fd, out; size_t off, len; char buf[16384]; };
static void want(int ep, struct conn *c, int out) {
  if (c->out == out) return;
  struct epoll_event e = { .events = out ? EPOLLOUT : EPOLLIN, .data.ptr = c };
  epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e); c->out = out;
}
int main(int argc, char **argv) {
  if (argc != 2) { fprintf(stderr, "usage: tcp_echo PORT\n"); return 2; }
  int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])) };
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(l, (void *)&a, sizeof a) || listen(l, 4096)) { perror("listen"); return 1; }
  int ep = epoll_create1(0);
  struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL }, evs[256];
  epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
  for (;;) {
    int n = epoll_wait(ep, evs, 256, -1);
    for (int i = 0; i < n; i++) {
      struct conn *c = evs[i].data.ptr;
      if (!c) {
        int fd;
        while ((fd = accept4(l, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
          if (!(c = malloc(sizeof *c))) { close(fd); continue; }
          c->fd = fd; c->out = 0; c->off = c->len = 0;
          struct epoll_event e = { .events = EPOLLIN, .data.ptr = c };
          epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
        }
        continue;
      }
      for (;;) {
        if (c->len > c->off) {
          ssize_t w = write(c->fd, c->buf + c->off, c->len - c->off);
          if (w < 0 && errno == EAGAIN) { want(ep, c, 1); break; }
          if (w < 0) { close(c->fd); free(c); break; }
          c->off += w; continue;
        }
        c->off = c->len = 0;
        ssize_t r = read(c->fd, c->buf, sizeof c->buf);
        if (r > 0) { c->len = r; continue; }
        if (r < 0 && errno == EAGAIN) { want(ep, c, 0); break; }
        close(c->fd); free(c); break;
      }
    }
  }
}
