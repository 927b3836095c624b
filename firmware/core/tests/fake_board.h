/* Host stand-ins for a board's platform hooks: scripted input, captured output and a clock the
 * test sets (and the fake model advances); and a fake edge server behind the network hooks. */
#ifndef FAKE_BOARD_H
#define FAKE_BOARD_H

#include <stdint.h>

#include "fake_model.h"

extern const char *fake_input; /* what lb_platform_getchar returns, then -1 */
extern uint32_t fake_clock_us; /* lb_platform_timestamp_us */

/* The fake edge server. It reads the LBQ1 requests the core sends, checks their header (magic,
 * length, CRC-32) and answers each in LBR1 with class = (first payload byte) % fake_net_classes,
 * taking fake_net_us on the board's clock. A test may break the request numbered fake_net_break_at
 * (1-based, counted by the server) in the way fake_net_fault says. */
typedef enum {
    FAKE_NET_OK,
    FAKE_NET_DOWN,      /* the server is gone from that request on: connection dropped, then refused */
    FAKE_NET_DROP_ONCE, /* the connection is dropped at that request, the server stays up */
    FAKE_NET_SILENT,    /* that request is never answered: the board's receive times out */
    FAKE_NET_BAD_MAGIC, /* the reply's magic is "LBX1" */
    FAKE_NET_BAD_ID,    /* the reply echoes the id plus one */
    FAKE_NET_BAD_CRC,   /* the reply's CRC is off by one */
    FAKE_NET_REFUSED,   /* status 2 (bad length) with a message */
    FAKE_NET_BAD_CLASS  /* class fake_net_classes (out of range) */
} fake_net_fault_kind;

extern fake_net_fault_kind fake_net_fault;
extern unsigned long fake_net_break_at;
extern int32_t fake_net_classes;
extern uint32_t fake_net_us;
extern unsigned long fake_net_requests; /* requests the server read whole (and well formed) */
extern unsigned long fake_net_connects; /* connections it accepted */
extern unsigned long fake_net_bad_requests; /* requests whose header was wrong */
extern char fake_net_address[32];       /* "ip:port" of the last connection */
extern uint32_t fake_net_last_id;       /* the last request's id */

/* Forget the output captured so far; reset the clock, the input, the fake model and the fake
 * server (up, no fault, 10 classes, instant). */
void fake_reset(void);

/* Everything the core wrote since the last fake_reset or fake_take_output. */
const char *fake_take_output(void);

#endif /* FAKE_BOARD_H */
