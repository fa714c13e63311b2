/* tunloop IFNAME: open TUN IFNAME with the offload vipgate uses (virtio-net header, checksum
   and TSO) and write every packet back unchanged: blocking read, write, nothing else. Routed
   through it, it is the floor of what crossing a TUN costs, the ceiling of any userspace TUN
   gateway (bench/nat.sh, mode tunloop). */
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
int main(int argc, char **argv) {
  int fd = open("/dev/net/tun", O_RDWR);
  struct ifreq r;
  memset(&r, 0, sizeof r);
  r.ifr_flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR;
  strncpy(r.ifr_name, argv[1], IFNAMSIZ - 1);
  if (fd < 0 || ioctl(fd, TUNSETIFF, &r) < 0) { perror("TUNSETIFF"); return 1; }
  if (ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) < 0) { perror("TUNSETOFFLOAD"); return 1; }
  static char buf[65536 + 64];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0) { perror("read"); return 1; }
    if (write(fd, buf, (size_t)n) < 0) { /* dropped, as a router would */ }
  }
}
