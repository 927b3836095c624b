/* MLPerf Tiny DUT protocol: see lb_dut.h, and firmware/README.md for the fixes to the reference.
 *
 * Hand-written rather than reusing the reference's internally_implemented.cpp: that file has
 * the bugs listed in the README (a NULL dereference on a bare '%', unchecked buffer writes) and
 * relies on the target's printf and strtok.
 */
#include "lb_dut.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lb_hooks.h"
#include "lb_out.h"
#include "lb_sha256.h"

#define FW_VERSION "ULPMark for tinyML Firmware V0.0.1"

/* The MLPerf Tiny reference models (labbench.modelinfo.MLPERF_TINY holds the same table; the
 * host tests check that they agree). */
static const lb_mlperf_model mlperf_models[] = {
    {"ic01", "3c002613d1b2475eb51dd78dfb85a546c8ae658dee71cf6ade43b022fe205415", LB_INPUT_U8_MINUS_128,
     LB_RESULTS_OUTPUTS},
    {"kws01", "aeea436800704fce17b17292e4412630ad856e9d777c044c64ef748a880bd0ae", LB_INPUT_TENSOR,
     LB_RESULTS_OUTPUTS},
    {"vww01", "597a384c8c2c8a1276f04702f25013b7838f2f814f1ca7c174d295b73e3d6b7b", LB_INPUT_U8_MINUS_128,
     LB_RESULTS_OUTPUTS},
    {"ad01", "87cf24194ef93d1d9b11a591d805526b98008e351655d29883c825c9c106ba24", LB_INPUT_F32_QUANTIZED,
     LB_RESULTS_MSE},
};

/* The `hi` extension (lb_dut.h). */
#define HI_REQUEST_HEAD 16u /* ">4sIII": magic, request id, payload bytes, payload CRC-32 */
#define HI_REPLY_HEAD 27u   /* ">4sIBifIH" then ">I": magic, id, status, class, p, us, len, CRC */
#define HI_MESSAGE_MAX 80u  /* the most of a refusal's message kept (the rest is not read) */
#define HI_PROBABILITY_SUM_TOLERANCE 0.05 /* labbench.strategies.decision.to_probabilities */

typedef enum { HI_NONE, HI_LOGISTIC, HI_THRESHOLD, HI_REMOTE } hi_kind;

typedef struct {
    float p1, p2;
    int16_t local_class, final_class;
    uint8_t accepted;
    uint32_t t_inf_us, t_dec_us, t_off_us;
} hi_result;

/* Why a sample of a pass failed, printed after the lines of the samples before it. */
typedef enum {
    HI_FAIL_MODEL,  /* text: the model's reason */
    HI_FAIL_NET,    /* text: the network hook's reason; a: reply bytes received */
    HI_FAIL_MAGIC,  /* a: the reply's first four bytes */
    HI_FAIL_CRC,    /* a: computed, b: stated */
    HI_FAIL_ID,     /* a: echoed, b: sent */
    HI_FAIL_STATUS, /* a: status; message */
    HI_FAIL_CLASS   /* a: |class|, b: output count; negative: the class is negative */
} hi_fail_kind;

typedef struct {
    hi_fail_kind kind;
    unsigned long a, b;
    int negative;
    const char *text;
    char message[HI_MESSAGE_MAX + 1];
} hi_failure;

static struct {
    const lb_dut_config *cfg;
    char model_sha256[65];
    const lb_mlperf_model *mlperf; /* the reference model this is, or NULL */
    float input_scale;             /* the int8 input's quantization (MLPerf models) */
    int32_t input_zero_point;
    const char *model_error; /* why lb_model_init failed, or NULL */
    char cmd[LB_CMD_MAX_CHARS + 1];
    size_t cmd_len;
    int cmd_too_long;
    uint8_t db[LB_DB_CAPACITY_BYTES];
    size_t db_size; /* bytes announced by the last accepted `db load` (0: none) */
    size_t db_pos;  /* bytes received since */
    int have_results;
    float mse; /* the result of an LB_RESULTS_MSE model's last infer */
    uint32_t boot_banner_us;    /* the clock in the boot banner's m-lap-us- (the `boot` extension) */
    uint32_t boot_init_done_us; /* the clock as m-init-done was printed */
    hi_kind hi_decision;
    float hi_w1, hi_w2, hi_b, hi_theta;
    char hi_ip[16]; /* dotted quad; "" until hi-srv */
    uint16_t hi_port;
    uint32_t hi_request_id; /* the last request's */
    int hi_connected;       /* the board's connection carried a reply and was not closed since */
    hi_result hi_results[LB_HI_MAX_SAMPLES];
} s;

const lb_mlperf_model *lb_mlperf_find(const char *sha256_hex, const char *name)
{
    size_t i, n = sizeof mlperf_models / sizeof mlperf_models[0];
    for (i = 0; i < n; i++) {
        if (sha256_hex != NULL && strcmp(sha256_hex, mlperf_models[i].sha256) == 0) {
            return &mlperf_models[i];
        }
    }
    for (i = 0; i < n; i++) {
        if (name != NULL && strcmp(name, mlperf_models[i].id) == 0) {
            return &mlperf_models[i];
        }
    }
    return NULL;
}

/* Prints the clock as m-lap-us-N and returns the value printed. */
static uint32_t print_timestamp(void)
{
    uint32_t now = lb_platform_timestamp_us();
    lb_printf("m-lap-us-%lu\r\n", (unsigned long)now);
    return now;
}

/* Next space-delimited token of the command line, or NULL (strtok without its hidden state). */
static char *next_token(char **cursor)
{
    char *p = *cursor, *start;
    while (*p == ' ') {
        p++;
    }
    if (*p == '\0') {
        *cursor = p;
        return NULL;
    }
    start = p;
    while (*p != '\0' && *p != ' ') {
        p++;
    }
    if (*p != '\0') {
        *p++ = '\0';
    }
    *cursor = p;
    return start;
}

/* A decimal count of 0..2^31-1, digits only. The reference used atoi, which read "-5" as a
 * size_t near 2^64 and "5x" as 5. */
static int parse_count(const char *text, unsigned long *value)
{
    unsigned long v = 0;
    if (*text == '\0') {
        return 0;
    }
    for (; *text; text++) {
        if (*text < '0' || *text > '9') {
            return 0;
        }
        v = v * 10u + (unsigned long)(*text - '0');
        if (v > 0x7fffffffUL) {
            return 0;
        }
    }
    *value = v;
    return 1;
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

/* The reference's two lines, then lines MLPerf's runner ignores (its pattern is
 * ^m-(model|profile)-\[...\]$): the announcements of the crc32 and boot extensions, the model's
 * sha256 and size, and the arena it uses. */
static void cmd_profile(void)
{
    lb_printf("m-profile-[%s]\r\n", FW_VERSION);
    lb_printf("m-model-[%s]\r\n", s.mlperf != NULL ? s.mlperf->id : s.cfg->model_name);
    lb_printf("m-ext-[crc32]\r\n");
    lb_printf("m-ext-[boot]\r\n");
    lb_printf("m-ext-[hi]\r\n");
    lb_printf("m-model-sha256-[%s]\r\n", s.model_sha256);
    lb_printf("m-model-bytes-[%lu]\r\n", (unsigned long)s.cfg->model_bytes);
    if (s.model_error != NULL) {
        lb_printf("e-[Model initialisation failed: %s]\r\n", s.model_error);
    } else {
        lb_printf("m-arena-bytes-[%lu]\r\n", (unsigned long)lb_model_arena_used_bytes());
    }
}

static void cmd_help(void)
{
    lb_printf("%s\r\n\r\n", FW_VERSION);
    lb_printf("help          : Print this information\r\n");
    lb_printf("name          : Print the name of the device\r\n");
    lb_printf("timestamp     : Print the microsecond clock (m-lap-us-N)\r\n");
    lb_printf("profile       : Print the firmware and the model (sha256, bytes, arena)\r\n");
    lb_printf("db load N     : Expect N bytes of input (N <= %lu)\r\n",
              (unsigned long)LB_DB_CAPACITY_BYTES);
    lb_printf("db HH[HH]*    : Load hex bytes until N bytes\r\n");
    lb_printf("db print      : Print the input buffer as hex, 8 bytes per line\r\n");
    lb_printf("infer N [W=10]: Run W warmups, then time N inferences of the input\r\n");
    lb_printf("results       : Print the outputs of the last inference\r\n");
    lb_printf("crc32 on|off  : Append a CRC-32 to every reply line, or stop\r\n");
    lb_printf("boot          : Print the clock at the boot banner and at m-init-done\r\n");
    lb_printf("hi-cfg lr W1 W2 B | th T | remote: Set the HI decision module\r\n");
    lb_printf("hi-srv A.B.C.D P: Set the edge server HI offloads to\r\n");
    lb_printf("hi N          : Run HI over the N inputs in db\r\n");
}

static void db_load(const char *arg)
{
    unsigned long n;
    if (arg == NULL) {
        lb_printf("e-[Command 'db load' requires the # of bytes]\r\n");
        return;
    }
    s.db_size = s.db_pos = 0; /* a new load always abandons the previous one */
    if (!parse_count(arg, &n) || n == 0) {
        lb_printf("e-[Command 'db load' must be >0 bytes]\r\n");
        return;
    }
    if (n > LB_DB_CAPACITY_BYTES) {
        /* The reference printed this without the e-[ ] framing and then kept the size, so the
         * following db data overran the buffer. */
        lb_printf("e-[Supplied buffer size %lu exceeds maximum of %lu]\r\n", n,
                  (unsigned long)LB_DB_CAPACITY_BYTES);
        return;
    }
    s.db_size = (size_t)n;
    memset(s.db, 0, s.db_size);
    lb_printf("m-[Expecting %lu bytes]\r\n", n);
}

static void db_print(void)
{
    size_t i;
    for (i = 0; i < s.db_size; i++) {
        if (i % 8 == 0) {
            lb_printf("m-buffer-");
        }
        lb_printf((i % 8 == 7 || i + 1 == s.db_size) ? "%02x\r\n" : "%02x-", (unsigned)s.db[i]);
    }
}

static void db_data(const char *hex)
{
    size_t digits = strlen(hex), pairs, i;
    if (digits % 2 != 0) {
        lb_printf("e-[Insufficent number of hex digits]\r\n"); /* sic: the reference's text */
        return;
    }
    if (s.db_size == 0) {
        lb_printf("e-[Command 'db' data needs a 'db load N' first]\r\n");
        return;
    }
    if (s.db_pos == s.db_size) {
        lb_printf("e-[Buffer already full: %lu of %lu bytes loaded]\r\n", (unsigned long)s.db_pos,
                  (unsigned long)s.db_size);
        return;
    }
    /* As in the reference, digits beyond the announced size are ignored. Unlike it, the pairs
     * that would be stored are all checked before any is, so a bad chunk changes nothing. */
    pairs = digits / 2;
    if (pairs > s.db_size - s.db_pos) {
        pairs = s.db_size - s.db_pos;
    }
    for (i = 0; i < pairs; i++) {
        if (hex_value(hex[2 * i]) < 0 || hex_value(hex[2 * i + 1]) < 0) {
            lb_printf("e-[Invalid hex digit '%c%c']\r\n", hex[2 * i], hex[2 * i + 1]);
            return;
        }
    }
    for (i = 0; i < pairs; i++) {
        s.db[s.db_pos++] = (uint8_t)(hex_value(hex[2 * i]) << 4 | hex_value(hex[2 * i + 1]));
    }
    if (s.db_pos == s.db_size) {
        lb_printf("m-load-done\r\n");
    }
}

static void cmd_db(char **cursor)
{
    char *sub = next_token(cursor);
    if (sub == NULL) {
        lb_printf("e-[Command 'db' requires a subcommand]\r\n");
    } else if (strcmp(sub, "load") == 0) {
        db_load(next_token(cursor));
    } else if (strcmp(sub, "print") == 0) {
        db_print();
    } else {
        db_data(sub);
    }
}

static void cmd_results(void)
{
    size_t i, n;
    if (!s.have_results) {
        lb_printf("e-[No results: run 'infer' first]\r\n");
        return;
    }
    if (s.mlperf != NULL && s.mlperf->results == LB_RESULTS_MSE) {
        lb_printf("m-results-[%f]\r\n", (double)s.mse);
        return;
    }
    n = lb_model_output_count();
    lb_printf("m-results-[");
    for (i = 0; i < n; i++) {
        lb_printf(i == 0 ? "%f" : ",%f", (double)lb_model_output(i));
    }
    lb_printf("]\r\n");
}

/* The reference's QuantizeFloatToInt8: round(value / scale) + zero point, clamped to int8, with
 * round() done without libm (halves away from zero). A NaN quantizes to the zero point. */
static int8_t quantize(float value, float scale, int32_t zero_point)
{
    float q = value / scale;
    long v;
    if (q != q) {
        q = 0.0f;
    }
    q = q > 1e6f ? 1e6f : q < -1e6f ? -1e6f : q;
    v = (long)(q >= 0.0f ? (double)q + 0.5 : (double)q - 0.5) + zero_point; /* truncates */
    return (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v);
}

/* The `db` bytes an infer needs: the model's input in its format. */
static size_t input_bytes(void)
{
    size_t n = lb_model_input_bytes();
    return s.mlperf != NULL && s.mlperf->input == LB_INPUT_F32_QUANTIZED ? 4u * n : n;
}

/* Once per infer, untimed (the reference's th_load_tensor): where the input tensor's bytes come
 * from. AD's floats (little-endian, as on every board here) are quantized into the buffer after
 * them, so they stay for the MSE; the uint8 images are converted as they are copied. */
static const uint8_t *prepare_input(void)
{
    size_t i, n = lb_model_input_bytes();
    float x;
    if (s.mlperf == NULL || s.mlperf->input != LB_INPUT_F32_QUANTIZED) {
        return s.db;
    }
    for (i = 0; i < n; i++) {
        memcpy(&x, s.db + 4u * i, sizeof x);
        s.db[s.db_size + i] = (uint8_t)quantize(x, s.input_scale, s.input_zero_point);
    }
    return s.db + s.db_size;
}

/* One run of the model on `input` (from prepare_input), copied into the input tensor first: the
 * per-model input conversion. NULL, or why the model failed. */
static const char *invoke_on(const uint8_t *input)
{
    uint8_t *tensor = lb_model_input();
    size_t i, n = lb_model_input_bytes();
    if (s.mlperf != NULL && s.mlperf->input == LB_INPUT_U8_MINUS_128) {
        for (i = 0; i < n; i++) {
            tensor[i] = (uint8_t)(input[i] ^ 0x80u); /* (uint8 - 128) as int8 */
        }
    } else {
        memcpy(tensor, input, n);
    }
    return lb_model_invoke();
}

/* invoke_on, printing the error and returning 0 on failure. */
static int run_once(const uint8_t *input)
{
    const char *err = invoke_on(input);
    if (err != NULL) {
        lb_printf("e-[Inference failed: %s]\r\n", err);
        return 0;
    }
    return 1;
}

/* ad01's result: the mean squared error of the dequantized reconstruction against the float
 * input, summed in order in float as the reference's calculate_result does. */
static float reconstruction_mse(void)
{
    size_t i, n = lb_model_output_count();
    float sum = 0.0f, x, d;
    for (i = 0; i < n; i++) {
        memcpy(&x, s.db + 4u * i, sizeof x);
        d = lb_model_output(i) - x;
        sum += d * d;
    }
    return sum / (float)n;
}

/* Why the model cannot run as the reference model it is taken for, or NULL. */
static const char *check_mlperf(void)
{
    size_t n = lb_model_input_bytes();
    if (!lb_model_input_int8(&s.input_scale, &s.input_zero_point)) {
        return "the MLPerf Tiny input format needs an int8 input tensor";
    }
    if (s.mlperf->input == LB_INPUT_F32_QUANTIZED && 5u * n > LB_DB_CAPACITY_BYTES) {
        return "the float input and its quantized copy exceed the db buffer";
    }
    if (s.mlperf->results == LB_RESULTS_MSE && lb_model_output_count() != n) {
        return "the MSE result needs as many outputs as inputs";
    }
    return NULL;
}

/* The reference's ee_infer. The input is copied in before every run, not once: TFLM reuses the
 * input tensor's arena memory for later layers (tflite-micro#2290), so the reference's second
 * and later runs could see overwritten input, and its m-results after `infer N W` (N + W > 1)
 * came from the last of them. */
static void cmd_infer(char **cursor)
{
    unsigned long n = 1, w = 10, i;
    size_t expected;
    const uint8_t *input;
    char *arg = next_token(cursor);

    if (arg != NULL) {
        if (!parse_count(arg, &n) || n == 0) {
            lb_printf("e-[Inference iterations must be >0]\r\n");
            return;
        }
        arg = next_token(cursor);
        if (arg != NULL && !parse_count(arg, &w)) {
            lb_printf("e-[Inference warmup must be >=0]\r\n");
            return;
        }
    }
    if (s.model_error != NULL) {
        lb_printf("e-[No model: %s]\r\n", s.model_error);
        return;
    }
    expected = input_bytes();
    if (s.db_size != expected) {
        lb_printf("e-[Input is %lu bytes; the model expects %lu]\r\n", (unsigned long)s.db_size,
                  (unsigned long)expected);
        return;
    }
    if (s.db_pos != s.db_size) {
        lb_printf("e-[Input incomplete: %lu of %lu bytes loaded]\r\n", (unsigned long)s.db_pos,
                  (unsigned long)s.db_size);
        return;
    }

    s.have_results = 0;
    input = prepare_input();
    lb_printf("m-warmup-start-%lu\r\n", w);
    for (i = 0; i < w; i++) {
        if (!run_once(input)) {
            return;
        }
    }
    lb_printf("m-warmup-done\r\n");
    lb_printf("m-infer-start-%lu\r\n", n);
    print_timestamp();
    for (i = 0; i < n; i++) {
        if (!run_once(input)) {
            return;
        }
    }
    print_timestamp();
    lb_printf("m-infer-done\r\n");
    if (s.mlperf != NULL && s.mlperf->results == LB_RESULTS_MSE) {
        s.mse = reconstruction_mse();
    }
    s.have_results = 1;
    cmd_results();
}

/* The reply-integrity extension (lb_dut.h). The new setting applies to the command's own reply. */
static void cmd_crc32(const char *arg)
{
    if (arg != NULL && (strcmp(arg, "on") == 0 || strcmp(arg, "off") == 0)) {
        lb_out_set_crc(strcmp(arg, "on") == 0);
        lb_printf("m-crc32-[%s]\r\n", arg);
    } else {
        lb_printf("e-[Command 'crc32' takes on or off]\r\n");
    }
}

/* ---- the hi extension (lb_dut.h) ---- */

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* Skips a run of digits; 0 when there is none. */
static int skip_digits(const char **p)
{
    const char *start = *p;
    while (is_digit(**p)) {
        (*p)++;
    }
    return *p != start;
}

/* A decimal as the host writes one, -?D+(.D+)?([eE][-+]?D+)?, that is finite in float. */
static int parse_float(const char *text, float *value)
{
    const char *p = text;
    char *end;
    double v;
    if (*p == '-') {
        p++;
    }
    if (!skip_digits(&p)) {
        return 0;
    }
    if (*p == '.') {
        p++;
        if (!skip_digits(&p)) {
            return 0;
        }
    }
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '-' || *p == '+') {
            p++;
        }
        if (!skip_digits(&p)) {
            return 0;
        }
    }
    if (*p != '\0') {
        return 0;
    }
    v = strtod(text, &end);
    if (end != p || !(v >= -FLT_MAX && v <= FLT_MAX)) {
        return 0;
    }
    *value = (float)v;
    return 1;
}

/* A dotted quad: four decimal octets of at most 255, without leading zeros. */
static int parse_ipv4(const char *text)
{
    const char *p = text;
    int octet;
    for (octet = 0; octet < 4; octet++) {
        const char *start = p;
        unsigned v = 0;
        while (is_digit(*p) && p - start < 3) {
            v = v * 10u + (unsigned)(*p++ - '0');
        }
        if (p == start || v > 255u || (p - start > 1 && *start == '0')) {
            return 0;
        }
        if (*p != (octet < 3 ? '.' : '\0')) {
            return 0;
        }
        p += octet < 3;
    }
    return 1;
}

static void cmd_hi_cfg(char **cursor)
{
    const char *kind = next_token(cursor), *arg;
    float v[3];
    unsigned want, i;
    if (kind == NULL || (strcmp(kind, "lr") != 0 && strcmp(kind, "th") != 0 &&
                         strcmp(kind, "remote") != 0)) {
        lb_printf("e-[Command 'hi-cfg' takes lr W1 W2 B, th THETA or remote]\r\n");
        return;
    }
    want = strcmp(kind, "lr") == 0 ? 3u : strcmp(kind, "th") == 0 ? 1u : 0u;
    for (i = 0; (arg = next_token(cursor)) != NULL; i++) {
        if (i == want) {
            break;
        }
        if (!parse_float(arg, &v[i])) {
            lb_printf("e-[Invalid number '%s': a finite decimal is needed]\r\n", arg);
            return;
        }
    }
    if (i != want || arg != NULL) {
        lb_printf("e-[Command 'hi-cfg %s' takes %u numbers]\r\n", kind, want);
        return;
    }
    if (want == 3u) {
        s.hi_decision = HI_LOGISTIC;
        s.hi_w1 = v[0], s.hi_w2 = v[1], s.hi_b = v[2];
        lb_printf("m-hi-cfg-[lr,%f,%f,%f]\r\n", (double)v[0], (double)v[1], (double)v[2]);
    } else if (want == 1u) {
        s.hi_decision = HI_THRESHOLD;
        s.hi_theta = v[0];
        lb_printf("m-hi-cfg-[th,%f]\r\n", (double)v[0]);
    } else {
        s.hi_decision = HI_REMOTE;
        lb_printf("m-hi-cfg-[remote]\r\n");
    }
}

static void cmd_hi_srv(char **cursor)
{
    const char *ip = next_token(cursor), *port = next_token(cursor);
    unsigned long p;
    if (ip == NULL || port == NULL || next_token(cursor) != NULL || !parse_ipv4(ip) ||
        !parse_count(port, &p) || p == 0 || p > 65535u) {
        lb_printf("e-[Command 'hi-srv' takes an IPv4 address A.B.C.D and a port 1..65535]\r\n");
        return;
    }
    lb_net_close(); /* the next offload connects to the new address */
    s.hi_connected = 0;
    strcpy(s.hi_ip, ip); /* parse_ipv4 allows at most 15 characters */
    s.hi_port = (uint16_t)p;
    lb_printf("m-hi-srv-[%s:%lu]\r\n", s.hi_ip, p);
}

/* The two highest probabilities of output 0 and its top-1 class (the first of equal values), as
 * labbench.strategies.decision.to_probabilities makes them: the values as they are if they form a
 * probability vector, else their softmax. */
static void top2(float *p1, float *p2, int16_t *top)
{
    size_t i, n = lb_model_output_count(), first = 0;
    double y, y1, y2 = -DBL_MAX, sum = 0.0, exps = 0.0;
    int probabilities = 1;
    y1 = (double)lb_model_output(0);
    for (i = 0; i < n; i++) {
        y = (double)lb_model_output(i);
        probabilities &= y >= 0.0 && y <= 1.0;
        sum += y;
        if (y > y1) {
            y2 = y1, y1 = y, first = i;
        } else if (i != first && y > y2) {
            y2 = y;
        }
    }
    *top = (int16_t)first;
    if (probabilities && fabs(sum - 1.0) <= HI_PROBABILITY_SUM_TOLERANCE) {
        *p1 = (float)y1, *p2 = (float)y2;
        return;
    }
    for (i = 0; i < n; i++) {
        exps += exp((double)lb_model_output(i) - y1);
    }
    *p1 = (float)(1.0 / exps), *p2 = (float)(exp(y2 - y1) / exps);
}

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Sends the LBQ1 request (header, then payload) and receives the LBR1 reply's header, opening the
 * connection once more when a kept one failed before any reply byte (the server dropped it). */
static int hi_exchange(const uint8_t *head, const uint8_t *payload, size_t n, uint8_t *reply,
                       hi_failure *f)
{
    size_t got = 0;
    const char *err;
    int attempt;
    for (attempt = 0;; attempt++) {
        int was_open = s.hi_connected;
        err = lb_net_exchange(s.hi_ip, s.hi_port, head, HI_REQUEST_HEAD, reply, 0, &got);
        if (err == NULL) {
            err = lb_net_exchange(s.hi_ip, s.hi_port, payload, n, reply, HI_REPLY_HEAD, &got);
        }
        if (err == NULL) {
            s.hi_connected = 1;
            return 1;
        }
        s.hi_connected = 0;
        if (!was_open || got != 0 || attempt > 0) {
            f->kind = HI_FAIL_NET, f->text = err, f->a = got;
            return 0;
        }
    }
}

/* Reads the reply's message (its first `keep` bytes) to just after the CRC'd header, in place of
 * the CRC, and keeps it printable in f->message; 0 when it could not be read (f says why). */
static int hi_message(uint8_t *frame, size_t keep, hi_failure *f)
{
    size_t i, got = 0;
    const char *err = NULL;
    uint8_t *message = frame + HI_REPLY_HEAD - 4u;
    if (keep > 0) {
        err = lb_net_exchange(s.hi_ip, s.hi_port, frame, 0, frame + HI_REPLY_HEAD, keep, &got);
    }
    if (err != NULL) {
        f->kind = HI_FAIL_NET, f->text = err, f->a = HI_REPLY_HEAD + got;
        return 0;
    }
    memmove(message, frame + HI_REPLY_HEAD, keep);
    for (i = 0; i < keep; i++) {
        char c = (char)message[i];
        f->message[i] = (c < ' ' || c > '~') ? '?' : c;
    }
    f->message[keep] = '\0';
    return 1;
}

/* One offload of the `n` bytes at `payload`: the server's class in *cls, or 0 and f says why. */
static int hi_offload(const uint8_t *payload, size_t n, int16_t *cls, hi_failure *f)
{
    uint8_t head[HI_REQUEST_HEAD];
    uint8_t frame[HI_REPLY_HEAD + HI_MESSAGE_MAX]; /* the reply's header, then its message */
    uint32_t id = ++s.hi_request_id, stated, crc;
    int32_t class_index;
    size_t length, keep;
    memcpy(head, "LBQ1", 4);
    put_be32(head + 4, id);
    put_be32(head + 8, (uint32_t)n);
    put_be32(head + 12, lb_crc32((const char *)payload, n));
    if (!hi_exchange(head, payload, n, frame, f)) {
        return 0;
    }
    if (memcmp(frame, "LBR1", 4) != 0) {
        f->kind = HI_FAIL_MAGIC, f->a = get_be32(frame);
        return 0;
    }
    length = (size_t)frame[21] << 8 | frame[22];
    keep = length < HI_MESSAGE_MAX ? length : HI_MESSAGE_MAX;
    stated = get_be32(frame + HI_REPLY_HEAD - 4u);
    if (!hi_message(frame, keep, f)) {
        return 0;
    }
    crc = lb_crc32((const char *)frame, HI_REPLY_HEAD - 4u + keep);
    class_index = (int32_t)get_be32(frame + 9);
    if (keep == length && crc != stated) {
        f->kind = HI_FAIL_CRC, f->a = crc, f->b = stated;
    } else if (get_be32(frame + 4) != id) {
        f->kind = HI_FAIL_ID, f->a = get_be32(frame + 4), f->b = id;
    } else if (frame[8] != 0 || length != 0) {
        f->kind = HI_FAIL_STATUS, f->a = frame[8]; /* an ok reply has no message */
    } else if (class_index < 0 || (size_t)class_index >= lb_model_output_count()) {
        f->kind = HI_FAIL_CLASS, f->negative = class_index < 0;
        f->a = class_index < 0 ? 0ul - (unsigned long)class_index : (unsigned long)class_index;
        f->b = (unsigned long)lb_model_output_count();
    } else {
        *cls = (int16_t)class_index;
        return 1;
    }
    return 0;
}

/* One input of a pass, its result in s.hi_results[i]; 0 and f says why when it failed. */
static int hi_sample(size_t i, size_t in_bytes, hi_failure *f)
{
    hi_result *r = &s.hi_results[i];
    const uint8_t *input = s.db + i * in_bytes;
    uint32_t t0, t1, t2;
    memset(r, 0, sizeof *r);
    r->local_class = -1;
    t0 = t1 = t2 = lb_platform_timestamp_us();
    if (s.hi_decision != HI_REMOTE) {
        if ((f->text = invoke_on(input)) != NULL) {
            f->kind = HI_FAIL_MODEL;
            return 0;
        }
        t1 = lb_platform_timestamp_us();
        top2(&r->p1, &r->p2, &r->local_class);
        r->accepted = (uint8_t)(s.hi_decision == HI_LOGISTIC
                                    ? s.hi_w1 * r->p1 + s.hi_w2 * r->p2 + s.hi_b >= 0.0f
                                    : r->p1 >= s.hi_theta);
        t2 = lb_platform_timestamp_us();
        r->t_inf_us = t1 - t0, r->t_dec_us = t2 - t1;
    }
    r->final_class = r->local_class;
    if (r->accepted) {
        return 1;
    }
    if (!hi_offload(input, in_bytes, &r->final_class, f)) {
        lb_net_close(); /* after a failure the stream may be out of step */
        s.hi_connected = 0;
        return 0;
    }
    r->t_off_us = lb_platform_timestamp_us() - t2;
    return 1;
}

static void print_hi_result(size_t i)
{
    const hi_result *r = &s.hi_results[i];
    lb_printf("m-hi-[%lu,%f,%f,%u,%s%u,%u,%lu,%lu,%lu]\r\n", (unsigned long)i, (double)r->p1,
              (double)r->p2, (unsigned)r->accepted, r->local_class < 0 ? "-" : "",
              (unsigned)(r->local_class < 0 ? -r->local_class : r->local_class),
              (unsigned)r->final_class, (unsigned long)r->t_inf_us, (unsigned long)r->t_dec_us,
              (unsigned long)r->t_off_us);
}

static void print_hi_failure(size_t i, const hi_failure *f)
{
    if (f->kind == HI_FAIL_MODEL) {
        lb_printf("e-[hi: sample %lu: Inference failed: %s]\r\n", (unsigned long)i, f->text);
        return;
    }
    lb_printf("e-[hi: sample %lu: offload to %s:%u failed: ", (unsigned long)i, s.hi_ip,
              (unsigned)s.hi_port);
    switch (f->kind) {
    case HI_FAIL_NET:
        lb_printf(f->a > 0 ? "%s after %lu reply bytes" : "%s", f->text, f->a);
        break;
    case HI_FAIL_MAGIC:
        lb_printf("reply magic %08lx, expected LBR1", f->a);
        break;
    case HI_FAIL_CRC:
        lb_printf("reply CRC-32 %08lx, its header says %08lx", f->a, f->b);
        break;
    case HI_FAIL_ID:
        lb_printf("a reply to request %lu, expected %lu", f->a, f->b);
        break;
    case HI_FAIL_STATUS:
        lb_printf("refused with status %lu: %s", f->a, f->message);
        break;
    default:
        lb_printf("class %s%lu outside the model's %lu outputs", f->negative ? "-" : "", f->a, f->b);
        break;
    }
    lb_printf("]\r\n");
}

/* Why `hi n` cannot run (printed), or 0 when it can. */
static int hi_refused(unsigned long n)
{
    size_t need = (size_t)n * lb_model_input_bytes();
    if (s.model_error != NULL) {
        lb_printf("e-[No model: %s]\r\n", s.model_error);
    } else if (s.mlperf != NULL && s.mlperf->input != LB_INPUT_TENSOR) {
        lb_printf("e-[hi: %s's db input is not its input tensor: hi offloads tensor bytes]\r\n",
                  s.mlperf->id);
    } else if (s.hi_decision == HI_NONE) {
        lb_printf("e-[hi: no decision module: send hi-cfg first]\r\n");
    } else if (s.hi_port == 0) {
        lb_printf("e-[hi: no edge server: send hi-srv first]\r\n");
    } else if (lb_model_output_count() < 2) {
        lb_printf("e-[hi: the model has %lu outputs; the decision needs at least 2]\r\n",
                  (unsigned long)lb_model_output_count());
    } else if (s.db_size != need) {
        lb_printf("e-[hi: db holds %lu bytes; %lu inputs of %lu bytes are %lu]\r\n",
                  (unsigned long)s.db_size, n, (unsigned long)lb_model_input_bytes(),
                  (unsigned long)need);
    } else if (s.db_pos != s.db_size) {
        lb_printf("e-[Input incomplete: %lu of %lu bytes loaded]\r\n", (unsigned long)s.db_pos,
                  (unsigned long)s.db_size);
    } else {
        return 0;
    }
    return 1;
}

/* `hi N`: the samples run back to back with no output between them (the clock's window is the
 * board's work alone), then their lines. */
static void cmd_hi(char **cursor)
{
    const char *arg = next_token(cursor);
    unsigned long n;
    size_t i, done;
    uint32_t start, end;
    hi_failure f;
    if (arg == NULL || !parse_count(arg, &n) || n == 0 || n > LB_HI_MAX_SAMPLES) {
        lb_printf("e-[Command 'hi' takes a sample count of 1 to %lu]\r\n",
                  (unsigned long)LB_HI_MAX_SAMPLES);
        return;
    }
    if (hi_refused(n)) {
        return;
    }
    s.have_results = 0; /* the model's outputs are the last sample's, not an infer's */
    memset(&f, 0, sizeof f);
    start = lb_platform_timestamp_us();
    for (done = 0; done < n && hi_sample(done, lb_model_input_bytes(), &f); done++) {
    }
    end = lb_platform_timestamp_us();
    for (i = 0; i < done; i++) {
        print_hi_result(i);
    }
    if (done < n) {
        print_hi_failure(done, &f);
        return;
    }
    lb_printf("m-hi-done-[%lu,%lu,%lu]\r\n", n, (unsigned long)start, (unsigned long)end);
}

static void dispatch(char *line)
{
    char *cursor = line;
    char *tok = next_token(&cursor);

    if (tok == NULL) {
        return; /* bare '%' (or only spaces): just m-ready; the reference passed NULL to strncmp */
    }
    if (strcmp(tok, "name") == 0) {
        lb_printf("m-name-dut-[%s]\r\n", s.cfg->vendor);
    } else if (strcmp(tok, "timestamp") == 0) {
        print_timestamp();
    } else if (strcmp(tok, "profile") == 0) {
        cmd_profile();
    } else if (strcmp(tok, "help") == 0) {
        cmd_help();
    } else if (strcmp(tok, "db") == 0) {
        cmd_db(&cursor);
    } else if (strcmp(tok, "infer") == 0) {
        cmd_infer(&cursor);
    } else if (strcmp(tok, "results") == 0) {
        cmd_results();
    } else if (strcmp(tok, "crc32") == 0) {
        cmd_crc32(next_token(&cursor));
    } else if (strcmp(tok, "hi-cfg") == 0) {
        cmd_hi_cfg(&cursor);
    } else if (strcmp(tok, "hi-srv") == 0) {
        cmd_hi_srv(&cursor);
    } else if (strcmp(tok, "hi") == 0) {
        cmd_hi(&cursor);
    } else if (strcmp(tok, "boot") == 0) {
        /* The boot extension (lb_dut.h): the cold start on the board's own clock. */
        lb_printf("m-boot-us-[%lu,%lu]\r\n", (unsigned long)s.boot_banner_us,
                  (unsigned long)s.boot_init_done_us);
    } else {
        lb_printf("e-[Unknown command: %s]\r\n", tok);
    }
}

void lb_dut_init(const lb_dut_config *cfg)
{
    memset(&s, 0, sizeof s);
    s.cfg = cfg;
    lb_out_set_crc(0); /* a reset ends the crc32 extension; the host turns it on again */
    lb_net_close(); /* and forgets the hi extension's settings and connection */
    lb_sha256_hex(cfg->model, cfg->model_bytes, s.model_sha256);
    s.mlperf = lb_mlperf_find(s.model_sha256, cfg->model_name);
    lb_printf("m-timestamp-mode-performance\r\n");
    s.boot_banner_us = print_timestamp();
    s.model_error = lb_model_init(cfg->model, cfg->model_bytes, cfg->arena, cfg->arena_bytes);
    if (s.model_error == NULL && s.mlperf != NULL) {
        s.model_error = check_mlperf();
    }
    if (s.model_error != NULL) {
        lb_printf("e-[Model initialisation failed: %s]\r\n", s.model_error);
    }
    s.boot_init_done_us = lb_platform_timestamp_us();
    lb_printf("m-init-done\r\n");
    lb_printf("m-ready\r\n");
}

void lb_dut_feed(int c)
{
    if (s.cfg == NULL) {
        return; /* before lb_dut_init, like the reference's disabled parser: no reply at all */
    }
    if (c == '\r' || c == '\n') {
        return; /* line endings some hosts add never reach the parser (the reference's strtok
                   saw "\nname" and answered Unknown command) */
    }
    if (c != '%') {
        if (s.cmd_len < LB_CMD_MAX_CHARS) {
            s.cmd[s.cmd_len++] = (char)c;
        } else {
            s.cmd_too_long = 1; /* the reference silently kept the first 80 characters */
        }
        return;
    }
    if (s.cmd_too_long) {
        lb_printf("e-[Command too long: more than %lu characters]\r\n",
                  (unsigned long)LB_CMD_MAX_CHARS);
    } else {
        s.cmd[s.cmd_len] = '\0';
        dispatch(s.cmd);
    }
    lb_printf("m-ready\r\n");
    s.cmd_len = 0;
    s.cmd_too_long = 0;
}

void lb_dut_run(void)
{
    int c;
    while ((c = lb_platform_getchar()) >= 0) {
        lb_dut_feed(c);
    }
}
