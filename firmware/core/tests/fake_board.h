/* Host stand-ins for a board's platform hooks: scripted input, captured output and a clock the
 * test sets (and the fake model advances). */
#ifndef FAKE_BOARD_H
#define FAKE_BOARD_H

#include <stdint.h>

#include "fake_model.h"

extern const char *fake_input; /* what lb_platform_getchar returns, then -1 */
extern uint32_t fake_clock_us; /* lb_platform_timestamp_us */

/* Forget the output captured so far; reset the clock, the input and the fake model. */
void fake_reset(void);

/* Everything the core wrote since the last fake_reset or fake_take_output. */
const char *fake_take_output(void);

#endif /* FAKE_BOARD_H */
