/* The core on a POSIX host: stdin/stdout as the serial line, CLOCK_MONOTONIC as the timer and
 * the fake model (fake_model.c), whose runs busy-wait INVOKE_US. Put it behind a pty to drive it
 * with a real serial client, as tests/test_firmware_core.py does with the bench's DutSerial:
 *
 *     host_dut [INPUT_BYTES [INVOKE_US [MODEL_FILE]]]     (defaults: 4 bytes, 0 us)
 *
 * MODEL_FILE's bytes are what the core hashes and reports (named by the file's stem), so an MLPerf
 * Tiny reference model makes it take that model's input format; the fake model still runs.
 * The `hi` extension's offload goes over a real TCP connection (POSIX sockets, 5 s timeouts).
 * HOST_DUT_OUTPUTS=N in the environment gives the fake model N outputs (input bytes 0..N-1 / 4)
 * instead of up to 4, for a model with as many classes as an edge server's.
 */
#define _DEFAULT_SOURCE /* POSIX sockets and MSG_NOSIGNAL */

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "fake_model.h"
#include "lb_dut.h"
#include "lb_hooks.h"

static uint64_t now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000u + (uint64_t)t.tv_nsec / 1000u;
}

int lb_platform_getchar(void)
{
    unsigned char c;
    ssize_t n;
    do {
        n = read(STDIN_FILENO, &c, 1);
    } while (n < 0 && errno == EINTR);
    return n == 1 ? c : -1;
}

void lb_platform_write(const char *data, size_t n)
{
    while (n > 0) {
        ssize_t written = write(STDOUT_FILENO, data, n);
        if (written < 0 && errno == EINTR) {
            continue;
        }
        if (written < 0) {
            exit(1); /* the line is gone */
        }
        data += written;
        n -= (size_t)written;
    }
}

uint32_t lb_platform_timestamp_us(void)
{
    return (uint32_t)now_us();
}

void fake_spend_us(uint32_t us)
{
    uint64_t end = now_us() + us;
    while (now_us() < end) {
    }
}

#define NET_TIMEOUT_S 5

static int net_fd = -1;
static char net_to[32]; /* "ip:port" of the open connection */

void lb_net_close(void)
{
    if (net_fd >= 0) {
        close(net_fd);
        net_fd = -1;
    }
}

/* A connection to ip:port, opened when none is open to it; NULL or why not. */
static const char *net_connect(const char *ip, uint16_t port)
{
    struct sockaddr_in addr;
    struct timeval timeout = {NET_TIMEOUT_S, 0};
    char to[sizeof net_to];
    int one = 1;
    snprintf(to, sizeof to, "%s:%u", ip, (unsigned)port);
    if (net_fd >= 0 && strcmp(to, net_to) == 0) {
        return NULL;
    }
    lb_net_close();
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    if (inet_pton(AF_INET, ip, &addr.sin_addr) != 1 || (net_fd = socket(AF_INET, SOCK_STREAM, 0)) < 0) {
        return "no socket";
    }
    setsockopt(net_fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(net_fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    setsockopt(net_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(net_fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        const char *why = errno == ECONNREFUSED ? "connection refused" : "connect failed";
        lb_net_close();
        return why;
    }
    strcpy(net_to, to);
    return NULL;
}

const char *lb_net_exchange(const char *ip, uint16_t port, const uint8_t *data, size_t n,
                            uint8_t *reply, size_t reply_cap, size_t *reply_n)
{
    const char *err = net_connect(ip, port);
    ssize_t k;
    *reply_n = 0;
    while (err == NULL && n > 0) {
        k = send(net_fd, data, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) {
            continue;
        }
        if (k <= 0) {
            err = "send failed";
            break;
        }
        data += k;
        n -= (size_t)k;
    }
    while (err == NULL && *reply_n < reply_cap) {
        k = recv(net_fd, reply + *reply_n, reply_cap - *reply_n, 0);
        if (k < 0 && errno == EINTR) {
            continue;
        }
        if (k < 0) {
            err = errno == EAGAIN || errno == EWOULDBLOCK ? "no reply within 5 s"
                  : errno == ECONNRESET                  ? "connection reset by the server"
                                                         : "receive failed";
        } else if (k == 0) {
            err = "connection closed by the server";
        } else {
            *reply_n += (size_t)k;
        }
    }
    if (err != NULL) {
        lb_net_close();
    }
    return err;
}

/* The whole file `path` (malloc'd; NULL when it cannot be read), its size in *n. */
static uint8_t *read_file(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    uint8_t *data = NULL;
    long size;
    if (f == NULL) {
        return NULL;
    }
    if (fseek(f, 0, SEEK_END) == 0 && (size = ftell(f)) > 0 && fseek(f, 0, SEEK_SET) == 0) {
        data = malloc((size_t)size);
        if (data != NULL && fread(data, 1, (size_t)size, f) != (size_t)size) {
            free(data);
            data = NULL;
        }
        *n = (size_t)size;
    }
    fclose(f);
    return data;
}

int main(int argc, char **argv)
{
    static const uint8_t builtin[] = "labbench host model";
    static uint8_t arena[16];
    static char name[65] = "fake01";
    static lb_dut_config config = {
        "host_dut", name, builtin, sizeof builtin - 1, arena, sizeof arena,
    };

    fake_model_reset();
    if (argc > 1) {
        fake_input_bytes = (size_t)strtoul(argv[1], NULL, 10);
    }
    if (argc > 2) {
        fake_invoke_us = (uint32_t)strtoul(argv[2], NULL, 10);
    }
    if (argc > 3) {
        const char *base = strrchr(argv[3], '/') ? strrchr(argv[3], '/') + 1 : argv[3];
        config.model = read_file(argv[3], &config.model_bytes);
        strncpy(name, base, sizeof name - 1);
        name[strcspn(name, ".")] = '\0';
    }
    if (getenv("HOST_DUT_OUTPUTS") != NULL) {
        fake_output_count = (size_t)strtoul(getenv("HOST_DUT_OUTPUTS"), NULL, 10);
    }
    if (argc > 4 || config.model == NULL || fake_input_bytes == 0 ||
        fake_input_bytes > LB_DB_CAPACITY_BYTES || fake_output_count > fake_input_bytes) {
        fprintf(stderr, "usage: host_dut [INPUT_BYTES (1..%lu) [INVOKE_US [MODEL_FILE]]]\n",
                (unsigned long)LB_DB_CAPACITY_BYTES);
        return 2;
    }
    lb_dut_init(&config);
    lb_dut_run();
    return 0;
}
