/* The core on a POSIX host: stdin/stdout as the serial line, CLOCK_MONOTONIC as the timer and
 * the fake model (fake_model.c), whose runs busy-wait INVOKE_US. Put it behind a pty to drive it
 * with a real serial client, as tests/test_firmware_core.py does with the bench's DutSerial:
 *
 *     host_dut [INPUT_BYTES [INVOKE_US]]     (defaults: 4 bytes, 0 us)
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
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

int main(int argc, char **argv)
{
    static const uint8_t model[] = "labbench host model";
    static uint8_t arena[16];
    static const lb_dut_config config = {
        "host_dut", "fake01", model, sizeof model - 1, arena, sizeof arena,
    };

    fake_model_reset();
    if (argc > 1) {
        fake_input_bytes = (size_t)strtoul(argv[1], NULL, 10);
    }
    if (argc > 2) {
        fake_invoke_us = (uint32_t)strtoul(argv[2], NULL, 10);
    }
    if (argc > 3 || fake_input_bytes == 0 || fake_input_bytes > LB_DB_CAPACITY_BYTES) {
        fprintf(stderr, "usage: host_dut [INPUT_BYTES (1..%lu) [INVOKE_US]]\n",
                (unsigned long)LB_DB_CAPACITY_BYTES);
        return 2;
    }
    lb_dut_init(&config);
    lb_dut_run();
    return 0;
}
