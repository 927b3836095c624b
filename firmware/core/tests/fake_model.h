/* A fake model for the host: its outputs are input[i] / 4 (the input tensor's bytes as uint8) of
 * its last run, for the first fake_output_count bytes (0: up to FAKE_OUTPUTS), or values a test
 * sets; each run takes fake_invoke_us on the board's clock (fake_spend_us, which the board side
 * defines). Its input tensor is int8 with a quantization a test may set. */
#ifndef FAKE_MODEL_H
#define FAKE_MODEL_H

#include <stddef.h>
#include <stdint.h>

#define FAKE_OUTPUTS 4

extern const char *fake_init_error;     /* lb_model_init's answer (NULL: success) */
extern size_t fake_input_bytes;         /* the model's input tensor size */
extern int fake_input_int8;             /* lb_model_input_int8: is the input int8 */
extern float fake_input_scale;          /* ... and its quantization */
extern int32_t fake_input_zero_point;
extern size_t fake_output_count;        /* 0: min(fake_input_bytes, FAKE_OUTPUTS) */
extern size_t fake_arena_used_bytes;    /* lb_model_arena_used_bytes */
extern uint32_t fake_invoke_us;         /* how long one run takes */
extern uint32_t fake_init_us;           /* how long lb_model_init takes */
extern unsigned long fake_fail_on_run;  /* 1-based run that fails (0: none) */
extern unsigned long fake_runs;         /* runs so far */
extern uint8_t fake_seen_input[];       /* the input tensor of the last run */

/* Make the model's outputs `values` instead of the input-derived ones. */
void fake_set_outputs(const float *values, size_t n);

/* Back to the defaults: 4 input bytes, int8 with scale 1 and zero point 0, input-derived
 * outputs, an instant initialisation, no failures, no runs. */
void fake_model_reset(void);

/* Let `us` microseconds pass on the board's clock (defined by the board side). */
void fake_spend_us(uint32_t us);

#endif /* FAKE_MODEL_H */
