/* Hooks the DUT core calls.
 *
 * Platform hooks: each board implements these three around its serial port and timer.
 * Network hooks: the `hi` extension's offload (lb_dut.h); a board without a network link
 * implements them as refusals.
 * Model hooks: lb_model_tflm.cpp implements them with TFLite Micro on the boards; the host
 * tests use a fake model (tests/fake_board.c).
 */
#ifndef LB_HOOKS_H
#define LB_HOOKS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Next byte from the host (0..255), waiting for one; negative when the input has ended. */
int lb_platform_getchar(void);

/* Send `n` bytes to the host. The core hands over whole lines where it can (a run of bytes
 * rather than putchar, so a USB CDC port is not sent one packet per character). */
void lb_platform_write(const char *data, size_t n);

/* Free-running microsecond clock. Only differences are used; it may wrap at 2^32. */
uint32_t lb_platform_timestamp_us(void);

/* Network hooks (the `hi` extension). The core builds and checks the request and reply frames;
 * the board only moves bytes over one TCP connection to `ip`:`port` that it keeps open between
 * calls, opening it when none is open or when the address changed.
 * lb_net_exchange sends the `n` bytes of `data` (nothing when n is 0), then receives until
 * `reply_cap` bytes have arrived in `reply` (nothing when reply_cap is 0), waiting a few seconds at
 * most. *reply_n is the count received. Returns NULL on success, else a short reason ("connection
 * refused", "no reply within 5 s", "connection closed by the server"), after closing the
 * connection. lb_net_close closes it, if one is open. */
const char *lb_net_exchange(const char *ip, uint16_t port, const uint8_t *data, size_t n,
                            uint8_t *reply, size_t reply_cap, size_t *reply_n);
void lb_net_close(void);

/* Model hooks. Those returning `const char *` return NULL on success, else a short reason
 * that the core prints inside e-[...]. The core calls the others only after a successful
 * lb_model_init. */

/* Prepare the model; `arena` is the runtime's working memory (the TFLM tensor arena). */
const char *lb_model_init(const uint8_t *model, size_t model_bytes, uint8_t *arena,
                          size_t arena_bytes);

/* The model's input tensor: its memory, which the core fills before every run, and its size in
 * bytes. */
uint8_t *lb_model_input(void);
size_t lb_model_input_bytes(void);

/* 1 when the input tensor is int8, with its quantization in *scale and *zero_point; else 0. */
int lb_model_input_int8(float *scale, int32_t *zero_point);

/* Run the model once on its input tensor. */
const char *lb_model_invoke(void);

/* Number of elements in the output tensor, and element `index` dequantized to float. */
size_t lb_model_output_count(void);
float lb_model_output(size_t index);

/* Bytes of the arena the model actually uses (reported by profile% as m-arena-bytes-[N]). */
size_t lb_model_arena_used_bytes(void);

#ifdef __cplusplus
}
#endif

#endif /* LB_HOOKS_H */
