/* SHA-256 (FIPS 180-4), so each board reports the hash of the model bytes it actually runs.
 * Hand-written (about 80 lines) so that the core depends on no board SDK's crypto library and
 * is tested on the host like the rest of the core. */
#ifndef LB_SHA256_H
#define LB_SHA256_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Lower-case hex digest of `data`, NUL-terminated into `hex` (65 bytes). */
void lb_sha256_hex(const uint8_t *data, size_t n, char hex[65]);

#ifdef __cplusplus
}
#endif

#endif /* LB_SHA256_H */
