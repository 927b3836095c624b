/* Formatted replies: see lb_out.h. */
#include "lb_out.h"

#include <float.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>

#include "lb_hooks.h"

static char out_buf[128];
static size_t out_len;
static int crc_on;
static uint32_t line_crc = 0xffffffffu; /* CRC register over the current line, before the final XOR */
static int line_tagged;                 /* the current line's tag went out (at its '\r') */

static void flush(void)
{
    if (out_len > 0) {
        lb_platform_write(out_buf, out_len);
        out_len = 0;
    }
}

static void put_raw(char c)
{
    out_buf[out_len++] = c;
    if (c == '\n' || out_len == sizeof out_buf) {
        flush();
    }
}

static uint32_t crc_update(uint32_t crc, unsigned char byte)
{
    int k;
    crc ^= byte;
    for (k = 0; k < 8; k++) {
        crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
    }
    return crc;
}

uint32_t lb_crc32(const char *data, size_t n)
{
    uint32_t crc = 0xffffffffu;
    while (n-- > 0) {
        crc = crc_update(crc, (unsigned char)*data++);
    }
    return ~crc;
}

void lb_out_set_crc(int on)
{
    crc_on = on;
    line_crc = 0xffffffffu;
    line_tagged = 0;
}

/* One character of a reply. With the CRC on, " *XXXXXXXX" goes in before the line's "\r\n" (or
 * before a bare "\n"). */
static void put(char c)
{
    if (crc_on && (c == '\r' || (c == '\n' && !line_tagged))) {
        uint32_t crc = ~line_crc;
        int shift;
        put_raw(' ');
        put_raw('*');
        for (shift = 28; shift >= 0; shift -= 4) {
            put_raw("0123456789ABCDEF"[(crc >> shift) & 0xfu]);
        }
        line_tagged = 1;
    }
    if (c == '\n') {
        line_crc = 0xffffffffu;
        line_tagged = 0;
    } else if (c != '\r') {
        line_crc = crc_update(line_crc, (unsigned char)c);
    }
    put_raw(c);
}

static void put_str(const char *s)
{
    while (*s) {
        put(*s++);
    }
}

/* `v` in `base` (10 or 16, lower-case), left-padded with '0' to `width` digits. */
static void put_uint(uint64_t v, unsigned base, unsigned width)
{
    char digits[20];
    unsigned n = 0;
    do {
        digits[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v > 0);
    while (width > n) {
        put('0');
        width--;
    }
    while (n > 0) {
        put(digits[--n]);
    }
}

/* A float value (passed as a double) in positional notation, at most 9 significant digits,
 * trailing zeros dropped. Scaling by powers of ten in double precision errs by far less than the
 * half unit in the ninth digit that float32 round-tripping can tolerate. */
static void put_float(double x)
{
    uint64_t bits;
    double magnitude;
    uint32_t digits;
    int exp10 = 0; /* the value is digits * 10^exp10 */
    char text[10];
    int n = 0, point;

    memcpy(&bits, &x, sizeof bits);
    magnitude = (bits >> 63) ? -x : x;
    if (magnitude != magnitude) {
        put_str("nan");
        return;
    }
    if (bits >> 63) {
        put('-');
    }
    if (magnitude > DBL_MAX) {
        put_str("inf");
        return;
    }
    if (magnitude == 0.0) {
        put('0');
        return;
    }
    while (magnitude >= 1e9) {
        magnitude /= 10.0;
        exp10++;
    }
    while (magnitude < 1e8) {
        magnitude *= 10.0;
        exp10--;
    }
    digits = (uint32_t)(magnitude + 0.5);
    if (digits == 1000000000u) {
        digits = 100000000u;
        exp10++;
    }
    while (digits % 10u == 0) {
        digits /= 10u;
        exp10++;
    }
    while (digits > 0) {
        text[n++] = (char)('0' + digits % 10u);
        digits /= 10u;
    }
    /* text holds the n digits backwards; `point` digits come before the decimal point. */
    point = n + exp10;
    if (point <= 0) {
        put('0');
        put('.');
        for (; point < 0; point++) {
            put('0');
        }
        while (n > 0) {
            put(text[--n]);
        }
        return;
    }
    for (; n > 0; point--) {
        if (point == 0) {
            put('.');
        }
        put(text[--n]);
    }
    for (; point > 0; point--) {
        put('0');
    }
}

void lb_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    for (; *fmt; fmt++) {
        unsigned width = 0;
        int is_long = 0;
        if (*fmt != '%') {
            put(*fmt);
            continue;
        }
        fmt++;
        while (*fmt >= '0' && *fmt <= '9') {
            width = width * 10u + (unsigned)(*fmt++ - '0');
        }
        if (*fmt == 'l') {
            is_long = 1;
            fmt++;
        }
        switch (*fmt) {
        case 's':
            put_str(va_arg(ap, const char *));
            break;
        case 'c':
            put((char)va_arg(ap, int));
            break;
        case 'u':
            put_uint(is_long ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 10, width);
            break;
        case 'x':
            put_uint(is_long ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 16, width);
            break;
        case 'f':
            put_float(va_arg(ap, double));
            break;
        case '%':
            put('%');
            break;
        default: /* a format the core never uses: stop rather than misread the arguments */
            va_end(ap);
            return;
        }
    }
    va_end(ap);
}
