/* Host stand-ins for a board's platform hooks: see fake_board.h. */
#include "fake_board.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lb_hooks.h"

const char *fake_input;
uint32_t fake_clock_us;

static char captured[1 << 20], taken[1 << 20];
static size_t captured_len;

void fake_reset(void)
{
    captured_len = 0;
    fake_input = NULL;
    fake_clock_us = 0;
    fake_model_reset();
}

const char *fake_take_output(void)
{
    memcpy(taken, captured, captured_len);
    taken[captured_len] = '\0';
    captured_len = 0;
    return taken;
}

void fake_spend_us(uint32_t us)
{
    fake_clock_us += us;
}

int lb_platform_getchar(void)
{
    if (fake_input == NULL || *fake_input == '\0') {
        return -1;
    }
    return (unsigned char)*fake_input++;
}

void lb_platform_write(const char *data, size_t n)
{
    if (captured_len + n >= sizeof captured) {
        fprintf(stderr, "fake board: captured output overflow\n");
        abort();
    }
    memcpy(captured + captured_len, data, n);
    captured_len += n;
}

uint32_t lb_platform_timestamp_us(void)
{
    return fake_clock_us;
}
