/* MLPerf Tiny DUT protocol core, shared by every labbench board firmware.
 *
 * A board fills an lb_dut_config, implements the platform hooks in lb_hooks.h, calls
 * lb_dut_init once (it prints the boot banner) and then lb_dut_run (or lb_dut_feed per byte).
 * firmware/README.md lists the commands, the replies and where they differ from the
 * EEMBC/MLCommons reference.
 *
 * Reply-integrity extension (not in the reference). `profile` announces it with the line
 * `m-ext-[crc32]`. After `crc32 on%` (reply `m-crc32-[on]`) every reply line, that one and its
 * m-ready included, is sent as "<line> *XXXXXXXX\r\n": XXXXXXXX is the CRC-32 of the line's bytes
 * before " *" (zlib's CRC-32, upper-case hex), so a byte lost or changed inside a number is
 * caught by the host. `crc32 off%` (reply `m-crc32-[off]`, untagged) and every reset
 * (lb_dut_init) turn it off; the host turns it on again after a reset. Hosts that never send
 * `crc32` (MLCommons' runner) see the reference's replies.
 */
#ifndef LB_DUT_H
#define LB_DUT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Longest command accepted, in characters, not counting the '%' (the reference's EE_CMD_SIZE). */
#define LB_CMD_MAX_CHARS 80u

/* Capacity of the `db` input buffer (the reference's MAX_DB_INPUT_SIZE default, 96*96*3). */
#ifndef LB_DB_CAPACITY_BYTES
#define LB_DB_CAPACITY_BYTES 27648u
#endif

typedef struct {
    const char *vendor;     /* name%    -> m-name-dut-[<vendor>] */
    const char *model_name; /* profile% -> m-model-[<model_name>] */
    const uint8_t *model;   /* the .tflite flatbuffer; its sha256 is reported by profile% */
    size_t model_bytes;
    uint8_t *arena; /* the model runtime's working memory */
    size_t arena_bytes;
} lb_dut_config;

/* Reset all state, initialise the model and print the boot banner. `cfg` and the strings and
 * buffers it points to must outlive the core. */
void lb_dut_init(const lb_dut_config *cfg);

/* Process one received byte; a command runs when its '%' arrives. */
void lb_dut_feed(int c);

/* Feed bytes from lb_platform_getchar until it reports the end of input (never, on a board). */
void lb_dut_run(void);

#ifdef __cplusplus
}
#endif

#endif /* LB_DUT_H */
