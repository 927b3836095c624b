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
 *
 * Boot extension (not in the reference), for the cold start of boards whose host cannot reset
 * them, or misses their boot banner (USB CDC ports re-enumerate on reset). `profile` announces it
 * with the line `m-ext-[boot]`; `boot%` answers `m-boot-us-[B,D]`: the board's microsecond clock
 * (lb_platform_timestamp_us, as in `m-lap-us-`) in the boot banner's stamp (B, printed before the
 * model is initialised) and as `m-init-done` was printed (D), both kept until the next reset.
 * D - B is the model's initialisation; D is the time from the clock's start (the application's
 * start, on the boards here) to m-init-done. Whatever ran before the clock started (boot ROM,
 * bootloader) is not in it: the host bounds that part.
 *
 * Hierarchical-inference extension (not in the reference). `profile` announces it with the line
 * `m-ext-[hi]`. The device runs its model on each input, a decision module on the two highest
 * probabilities p1 >= p2 of output 0 (dequantized; softmaxed unless every value is in [0, 1] and
 * they sum to 1 within 0.05), and offloads the inputs it does not accept to an edge server:
 *   `hi-cfg lr W1 W2 B`  accept when W1*p1 + W2*p2 + B >= 0   -> m-hi-cfg-[lr,W1,W2,B]
 *   `hi-cfg th THETA`    accept when p1 >= THETA              -> m-hi-cfg-[th,THETA]
 *   `hi-cfg remote`      no local inference, offload all      -> m-hi-cfg-[remote]
 *   `hi-srv A.B.C.D P`   the edge server                      -> m-hi-srv-[A.B.C.D:P]
 * Numbers are decimals (-?D+(.D+)?([eE][-+]?D+)?) finite in float; the echo prints the float
 * parsed. `hi N` runs N inputs stored back to back in `db` (exactly N x the input tensor's bytes,
 * N <= LB_HI_MAX_SAMPLES) and, once all have run, prints one line per input,
 *   m-hi-[i,p1,p2,accept,local_class,final_class,t_inf_us,t_dec_us,t_off_us]
 * (remote: p1 = p2 = 0, accept 0, local_class -1, t_inf_us = t_dec_us = 0; t_off_us is 0 where
 * accepted), then m-hi-done-[N,start_us,end_us], the clock around the whole pass. An offload sends
 * the input's bytes in the edge server's LBQ1 request (labbench/edge/server.py: big-endian
 * header "LBQ1", request id (a running count), payload bytes, payload CRC-32) and checks its LBR1
 * reply: magic, CRC-32, the id echoed, status ok, class within the outputs. The connection is kept
 * open across inputs and passes; one that was open and failed before any reply byte is opened
 * again once. A failed offload ends the pass: the lines of the inputs done before it, then
 * e-[hi: sample i: offload to A.B.C.D:P failed: why] and no done line. After hi-cfg or hi-srv
 * failing, the previous setting stays; a reset clears both.
 *
 * MLPerf Tiny reference models. A model found by lb_mlperf_find (its sha256, or a model name that
 * is one of the IDs) is reported by its ID (`m-model-[ic01]`) and takes the `db` input of its
 * reference firmware, which is what MLCommons' runner sends: the per-model input conversion below
 * makes the input tensor of those bytes, as the reference th_load_tensor does; for ad01 `m-results`
 * holds the reconstruction's mean squared error, as the reference th_results prints it. Other
 * models are reported by `model_name` and take the raw bytes of their input tensor.
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

/* Most inputs one `hi N` runs: their results are kept until the pass ends (28 bytes each). */
#ifndef LB_HI_MAX_SAMPLES
#define LB_HI_MAX_SAMPLES 256u
#endif

/* The `db` input format of a model (labbench.modelinfo.MlperfModel.input). */
typedef enum {
    LB_INPUT_TENSOR,         /* the input tensor's own bytes */
    LB_INPUT_U8_MINUS_128,   /* uint8 per element, 128 subtracted into the int8 tensor (IC, VWW) */
    LB_INPUT_F32_QUANTIZED   /* little-endian float32 per element, quantized with the int8 input's
                                scale and zero point: round() (halves away from zero), clamped (AD) */
} lb_input_format;

/* What `m-results-[...]` holds. */
typedef enum {
    LB_RESULTS_OUTPUTS, /* the output tensor, dequantized */
    LB_RESULTS_MSE      /* one value: mean of (dequantized output - float input)^2, summed in order */
} lb_results_format;

typedef struct {
    const char *id;     /* what profile% reports */
    const char *sha256; /* of the reference .tflite (mlcommons/tiny benchmark/training/...) */
    lb_input_format input;
    lb_results_format results;
} lb_mlperf_model;

/* The reference model whose .tflite has this sha256 (64 lower-case hex digits), else the one whose
 * ID is `name` (a build of another model that declares itself, say, ic01), else NULL. */
const lb_mlperf_model *lb_mlperf_find(const char *sha256_hex, const char *name);

typedef struct {
    const char *vendor;     /* name%    -> m-name-dut-[<vendor>] */
    const char *model_name; /* profile% -> m-model-[<model_name>], or the MLPerf Tiny ID */
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
