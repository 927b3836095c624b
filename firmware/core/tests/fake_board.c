/* Host stand-ins for a board's platform hooks: see fake_board.h. */
#include "fake_board.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lb_dut.h"
#include "lb_hooks.h"
#include "lb_out.h"

const char *fake_input;
uint32_t fake_clock_us;

static char captured[1 << 20], taken[1 << 20];
static size_t captured_len;

fake_net_fault_kind fake_net_fault;
unsigned long fake_net_break_at;
int32_t fake_net_classes;
uint32_t fake_net_us;
unsigned long fake_net_requests, fake_net_connects, fake_net_bad_requests;
char fake_net_address[32];
uint32_t fake_net_last_id;

static int net_open;      /* the board's connection */
static int net_down;      /* the server is gone */
static int net_silent;    /* the server stopped answering on this connection */
static uint8_t net_in[LB_DB_CAPACITY_BYTES + 64]; /* what arrived and is not a whole request yet */
static size_t net_in_len;
static uint8_t net_out[256]; /* replies not read yet */
static size_t net_out_len, net_out_pos;

void fake_reset(void)
{
    captured_len = 0;
    fake_input = NULL;
    fake_clock_us = 0;
    fake_model_reset();
    fake_net_fault = FAKE_NET_OK;
    fake_net_break_at = 0;
    fake_net_classes = 10;
    fake_net_us = 0;
    fake_net_requests = fake_net_connects = fake_net_bad_requests = 0;
    fake_net_address[0] = '\0';
    fake_net_last_id = 0;
    net_open = net_down = net_silent = 0;
    net_in_len = net_out_len = net_out_pos = 0;
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

static void be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v;
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Queue an LBR1 reply (labbench/edge/server.py reply_bytes) with `fault` applied. */
static void reply(uint32_t id, int32_t class_index, fake_net_fault_kind fault)
{
    static const char refusal[] = "payload of 3 bytes, the model's input is int8[1, 4] (4 bytes)";
    uint8_t *p = net_out + net_out_len, covered[23 + sizeof refusal];
    const char *message = fault == FAKE_NET_REFUSED ? refusal : "";
    size_t length = strlen(message);
    memcpy(p, fault == FAKE_NET_BAD_MAGIC ? "LBX1" : "LBR1", 4);
    be32(p + 4, id + (fault == FAKE_NET_BAD_ID));
    p[8] = fault == FAKE_NET_REFUSED ? 2 : 0;
    be32(p + 9, fault == FAKE_NET_REFUSED ? 0xffffffffu
                : fault == FAKE_NET_BAD_CLASS ? (uint32_t)fake_net_classes
                                              : (uint32_t)class_index);
    be32(p + 13, fault == FAKE_NET_REFUSED ? 0x7fc00000u : 0x3f400000u); /* NaN, or 0.75 */
    be32(p + 17, fake_net_us);
    p[21] = (uint8_t)(length >> 8), p[22] = (uint8_t)length;
    memcpy(covered, p, 23); /* the CRC covers the 23 bytes before it and the message */
    memcpy(covered + 23, message, length);
    be32(p + 23, lb_crc32((const char *)covered, 23 + length) + (fault == FAKE_NET_BAD_CRC));
    memcpy(p + 27, message, length);
    net_out_len += 27 + length;
}

/* Answer the whole requests that have arrived; 0 when the connection was dropped meanwhile. */
static int serve(void)
{
    uint32_t length;
    while (net_in_len >= 16 && net_in_len >= 16 + (length = get32(net_in + 8))) {
        uint32_t id = get32(net_in + 4);
        fake_net_fault_kind fault = ++fake_net_requests == fake_net_break_at ? fake_net_fault
                                                                             : FAKE_NET_OK;
        if (memcmp(net_in, "LBQ1", 4) != 0 ||
            lb_crc32((const char *)net_in + 16, length) != get32(net_in + 12)) {
            fake_net_bad_requests++;
        }
        fake_net_last_id = id;
        fake_spend_us(fake_net_us);
        if (fault == FAKE_NET_DOWN || fault == FAKE_NET_DROP_ONCE) {
            net_down = fault == FAKE_NET_DOWN;
            lb_net_close();
            return 0;
        }
        net_silent |= fault == FAKE_NET_SILENT;
        if (!net_silent) {
            reply(id, (int32_t)(net_in[16] % (uint8_t)fake_net_classes), fault);
        }
        memmove(net_in, net_in + 16 + length, net_in_len - 16 - length);
        net_in_len -= 16 + length;
    }
    return 1;
}

const char *lb_net_exchange(const char *ip, uint16_t port, const uint8_t *data, size_t n,
                            uint8_t *reply_buf, size_t reply_cap, size_t *reply_n)
{
    size_t take;
    *reply_n = 0;
    if (!net_open) {
        if (net_down) {
            return "connection refused";
        }
        net_open = 1;
        fake_net_connects++;
        sprintf(fake_net_address, "%s:%u", ip, (unsigned)port);
    }
    if (net_in_len + n > sizeof net_in) {
        fprintf(stderr, "fake network: request overflow\n");
        abort();
    }
    memcpy(net_in + net_in_len, data, n);
    net_in_len += n;
    if (!serve()) {
        return "connection closed by the server";
    }
    take = net_out_len - net_out_pos < reply_cap ? net_out_len - net_out_pos : reply_cap;
    memcpy(reply_buf, net_out + net_out_pos, take);
    net_out_pos += take;
    *reply_n = take;
    if (net_out_pos == net_out_len) {
        net_out_pos = net_out_len = 0;
    }
    if (take < reply_cap) {
        net_open = 0;
        net_in_len = net_out_len = net_out_pos = 0;
        return net_silent ? "no reply within 5 s" : "connection closed by the server";
    }
    return NULL;
}

void lb_net_close(void)
{
    net_open = 0;
    net_silent = 0;
    net_in_len = net_out_len = net_out_pos = 0;
}
