/* The core on a POSIX host: stdin/stdout as the serial line, CLOCK_MONOTONIC as the timer and
 * the fake model (fake_model.c), whose runs busy-wait INVOKE_US. Put it behind a pty to drive it
 * with a real serial client, as tests/test_firmware_core.py does with the bench's DutSerial:
 *
 *     host_dut [INPUT_BYTES [INVOKE_US [MODEL_FILE]]]     (defaults: 4 bytes, 0 us)
 *
 * MODEL_FILE's bytes are what the core hashes and reports (named by the file's stem), so an MLPerf
 * Tiny reference model makes it take that model's input format; the fake model still runs.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
    if (argc > 4 || config.model == NULL || fake_input_bytes == 0 ||
        fake_input_bytes > LB_DB_CAPACITY_BYTES) {
        fprintf(stderr, "usage: host_dut [INPUT_BYTES (1..%lu) [INVOKE_US [MODEL_FILE]]]\n",
                (unsigned long)LB_DB_CAPACITY_BYTES);
        return 2;
    }
    lb_dut_init(&config);
    lb_dut_run();
    return 0;
}
