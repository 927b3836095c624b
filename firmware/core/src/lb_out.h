/* Formatted replies for the core.
 *
 * A small printf over lb_platform_write, so that replies look the same on every board whatever
 * the target libc supports (newlib-nano has no float printf by default; the reference's integer
 * workaround printed 1.0 as "0.1000"). Output is buffered and handed over line by line.
 *
 * Conversions: %s, %c, %u (unsigned), %lu (unsigned long), %x with an optional zero-padded
 * width (%02x), %%, and %f: a double holding a float value, in positional notation with at
 * most 9 significant digits and no trailing zeros ("1", "0.00390625", "-2.5", "0.100000001").
 * Nine digits always parse back to the same float32, so the host sees the exact outputs.
 *
 * Reply integrity (the `crc32` extension, lb_dut.h): while it is on, every line goes out as
 * "<line> *XXXXXXXX\r\n", XXXXXXXX being the CRC-32 of the line's bytes before " *" in upper-case
 * hex. The CRC is zlib's (reflected polynomial 0xEDB88320, initial value and final XOR 0xFFFFFFFF).
 */
#ifndef LB_OUT_H
#define LB_OUT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
void lb_printf(const char *fmt, ...);

/* Tag every line from the next one on with its CRC-32 (on != 0), or stop tagging. */
void lb_out_set_crc(int on);

/* CRC-32 of `n` bytes, as zlib.crc32 computes it. */
uint32_t lb_crc32(const char *data, size_t n);

#ifdef __cplusplus
}
#endif

#endif /* LB_OUT_H */
