/* Host tests of the DUT protocol core: every command, the error replies and the buffer limits,
 * driven byte by byte through lb_dut_feed and compared byte for byte with what a host reads. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "fake_board.h"
#include "lb_dut.h"
#include "lb_out.h"

static const uint8_t fake_model[] = "labbench fake model";
#define FAKE_MODEL_SHA256 "f4051b2536d32745607c6084fac3580c9128111bfd3b1f23a47a9d1399b3220b"
static uint8_t arena[64];
static const lb_dut_config config = {
    "labbench-host", "fake01", fake_model, sizeof fake_model - 1, arena, sizeof arena,
};

#define READY "m-ready\r\n"

/* Boot a fresh core (after the test has set up the fake board) and return the banner. */
static const char *boot(void)
{
    lb_dut_init(&config);
    return fake_take_output();
}

static void reboot(void)
{
    fake_reset();
    boot();
}

/* Feed `input` one byte at a time and return everything the core answered. */
static const char *send(const char *input)
{
    for (; *input; input++) {
        lb_dut_feed((unsigned char)*input);
    }
    return fake_take_output();
}

static int starts_with(const char *text, const char *prefix)
{
    return strncmp(text, prefix, strlen(prefix)) == 0;
}

/* `count` copies of `c`, for building long commands. */
static char *repeat(char *dst, char c, size_t count)
{
    memset(dst, c, count);
    dst[count] = '\0';
    return dst;
}

/* Must run first: nothing has called lb_dut_init yet. */
static void test_nothing_answered_before_init(void)
{
    fake_reset();
    CHECK_STR(send("name%"), "");
}

static void test_boot_banner(void)
{
    fake_reset();
    fake_clock_us = 1234;
    CHECK_STR(boot(), "m-timestamp-mode-performance\r\nm-lap-us-1234\r\nm-init-done\r\n" READY);
}

static void test_boot_with_failing_model(void)
{
    fake_reset();
    fake_init_error = "arena too small";
    CHECK_STR(boot(), "m-timestamp-mode-performance\r\nm-lap-us-0\r\n"
                      "e-[Model initialisation failed: arena too small]\r\nm-init-done\r\n" READY);
    /* The protocol still answers; only inference is refused. */
    CHECK_STR(send("name%"), "m-name-dut-[labbench-host]\r\n" READY);
    CHECK_STR(send("profile%"), "m-profile-[ULPMark for tinyML Firmware V0.0.1]\r\n"
                                "m-model-[fake01]\r\n"
                                "m-ext-[crc32]\r\n"
                                "m-ext-[boot]\r\n"
                                "m-ext-[hi]\r\n"
                                "m-model-sha256-[" FAKE_MODEL_SHA256 "]\r\n"
                                "m-model-bytes-[19]\r\n"
                                "e-[Model initialisation failed: arena too small]\r\n" READY);
    send("db load 4%db 01020304%");
    CHECK_STR(send("infer 1 0%"), "e-[No model: arena too small]\r\n" READY);
    CHECK(fake_runs == 0);
}

/* The boot extension: the clock at the banner's stamp and at m-init-done, kept until the next
 * reset whatever the clock does meanwhile; a failed model initialisation is timed too. */
static void test_boot_report(void)
{
    fake_reset();
    fake_clock_us = 1500;
    fake_init_us = 15000;
    CHECK_STR(boot(), "m-timestamp-mode-performance\r\nm-lap-us-1500\r\nm-init-done\r\n" READY);
    CHECK_STR(send("boot%"), "m-boot-us-[1500,16500]\r\n" READY);
    fake_clock_us = 99999;
    CHECK_STR(send("boot%timestamp%"), "m-boot-us-[1500,16500]\r\n" READY "m-lap-us-99999\r\n" READY);
    CHECK_STR(send("boot extra words%"), "m-boot-us-[1500,16500]\r\n" READY);
    CHECK(strstr(send("help%"), "boot          : ") != NULL);

    fake_reset();
    fake_clock_us = 4294967000u; /* the 32-bit clock wraps during initialisation */
    fake_init_us = 1000;
    fake_init_error = "arena too small";
    boot();
    CHECK_STR(send("boot%"), "m-boot-us-[4294967000,704]\r\n" READY);
}

static void test_name_profile_timestamp(void)
{
    reboot();
    CHECK_STR(send("name%"), "m-name-dut-[labbench-host]\r\n" READY);
    CHECK_STR(send("profile%"), "m-profile-[ULPMark for tinyML Firmware V0.0.1]\r\n"
                                "m-model-[fake01]\r\n"
                                "m-ext-[crc32]\r\n"
                                "m-ext-[boot]\r\n"
                                "m-ext-[hi]\r\n"
                                "m-model-sha256-[" FAKE_MODEL_SHA256 "]\r\n"
                                "m-model-bytes-[19]\r\n"
                                "m-arena-bytes-[2256]\r\n" READY);
    fake_clock_us = 42;
    CHECK_STR(send("timestamp%"), "m-lap-us-42\r\n" READY);
    fake_clock_us = 4294967295u; /* the clock is 32-bit: it wraps after 71.6 minutes */
    CHECK_STR(send("timestamp%"), "m-lap-us-4294967295\r\n" READY);
    CHECK_STR(send("  name   extra words%"), "m-name-dut-[labbench-host]\r\n" READY);
}

static void test_help(void)
{
    const char *out;
    reboot();
    out = send("help%");
    CHECK(starts_with(out, "ULPMark for tinyML Firmware V0.0.1\r\n\r\n"));
    CHECK(strstr(out, "infer N [W=10]") != NULL); /* the reference's menu said W=0 */
    CHECK(strstr(out, "db load N     : Expect N bytes of input (N <= 27648)\r\n") != NULL);
    CHECK(strstr(out, "e-[") == NULL);
    CHECK(strlen(out) > strlen(READY) && strcmp(out + strlen(out) - strlen(READY), READY) == 0);
}

static void test_unknown_and_empty_commands(void)
{
    reboot();
    CHECK_STR(send("bogus%"), "e-[Unknown command: bogus]\r\n" READY);
    CHECK_STR(send("NAME%"), "e-[Unknown command: NAME]\r\n" READY);
    CHECK_STR(send("%"), READY); /* the reference dereferenced NULL here */
    CHECK_STR(send("    %"), READY);
    CHECK_STR(send("%%%"), READY READY READY);
}

static void test_line_endings_are_ignored(void)
{
    reboot();
    CHECK_STR(send("\r\nname%"), "m-name-dut-[labbench-host]\r\n" READY);
    CHECK_STR(send("\nname%"), "m-name-dut-[labbench-host]\r\n" READY);
    CHECK_STR(send("name\r\n%"), "m-name-dut-[labbench-host]\r\n" READY);
    CHECK_STR(send("na\r\nme%"), "m-name-dut-[labbench-host]\r\n" READY);
    CHECK_STR(send("\r\n"), "");
}

static void test_commands_split_and_joined(void)
{
    reboot();
    CHECK_STR(send("na"), "");
    CHECK_STR(send("me%"), "m-name-dut-[labbench-host]\r\n" READY);
    fake_clock_us = 7;
    CHECK_STR(send("name%timestamp%"),
              "m-name-dut-[labbench-host]\r\n" READY "m-lap-us-7\r\n" READY);
}

static void test_command_length_limit(void)
{
    char cmd[6000], hex[200];
    const char *load_done = "m-load-done\r\n" READY;

    /* 79 characters: "db " + 76 hex digits, the largest chunk (38 bytes) that fits. */
    reboot();
    send("db load 38%");
    sprintf(cmd, "db %s%%", repeat(hex, 'a', 76));
    CHECK(strlen(cmd) == 79 + 1);
    CHECK_STR(send(cmd), load_done);
    CHECK(starts_with(send("db print%"), "m-buffer-aa-aa-aa-aa-aa-aa-aa-aa\r\n"));

    /* 80 characters: the longest command accepted. */
    send("db load 38%");
    sprintf(cmd, "db  %s%%", repeat(hex, 'b', 76));
    CHECK(strlen(cmd) == 80 + 1);
    CHECK_STR(send(cmd), load_done);
    CHECK(starts_with(send("db print%"), "m-buffer-bb-bb-bb-bb-bb-bb-bb-bb\r\n"));
    sprintf(cmd, "name%s%%", repeat(hex, ' ', 76));
    CHECK(strlen(cmd) == 80 + 1);
    CHECK_STR(send(cmd), "m-name-dut-[labbench-host]\r\n" READY);

    /* 81 characters: refused whole; the reference kept the first 80 and ran them. */
    send("db load 39%");
    sprintf(cmd, "db %s%%", repeat(hex, 'c', 78));
    CHECK(strlen(cmd) == 81 + 1);
    CHECK_STR(send(cmd), "e-[Command too long: more than 80 characters]\r\n" READY);
    sprintf(cmd, "name%s%%", repeat(hex, ' ', 77));
    CHECK_STR(send(cmd), "e-[Command too long: more than 80 characters]\r\n" READY);
    CHECK_STR(send("db print%"), "m-buffer-00-00-00-00-00-00-00-00\r\nm-buffer-00-00-00-00-00-00-00-00\r\n"
                                 "m-buffer-00-00-00-00-00-00-00-00\r\nm-buffer-00-00-00-00-00-00-00-00\r\n"
                                 "m-buffer-00-00-00-00-00-00-00\r\n" READY);

    /* Far too long: one error, one m-ready, and the next command is parsed cleanly. */
    repeat(cmd, 'x', 5000);
    strcat(cmd, "%");
    CHECK_STR(send(cmd), "e-[Command too long: more than 80 characters]\r\n" READY);
    CHECK_STR(send("name%"), "m-name-dut-[labbench-host]\r\n" READY);

    /* CR and LF do not count towards the limit. */
    sprintf(cmd, "name%s\r\n%%", repeat(hex, ' ', 76));
    CHECK_STR(send(cmd), "m-name-dut-[labbench-host]\r\n" READY);
}

static void test_db_argument_errors(void)
{
    reboot();
    CHECK_STR(send("db%"), "e-[Command 'db' requires a subcommand]\r\n" READY);
    CHECK_STR(send("db load%"), "e-[Command 'db load' requires the # of bytes]\r\n" READY);
    CHECK_STR(send("db load 0%"), "e-[Command 'db load' must be >0 bytes]\r\n" READY);
    CHECK_STR(send("db load abc%"), "e-[Command 'db load' must be >0 bytes]\r\n" READY);
    CHECK_STR(send("db load -5%"), "e-[Command 'db load' must be >0 bytes]\r\n" READY);
    CHECK_STR(send("db load 5x%"), "e-[Command 'db load' must be >0 bytes]\r\n" READY);
    CHECK_STR(send("db load 99999999999%"), "e-[Command 'db load' must be >0 bytes]\r\n" READY);
    CHECK_STR(send("db load 4%"), "m-[Expecting 4 bytes]\r\n" READY);
}

static void test_db_capacity(void)
{
    char cmd[100];
    size_t loaded = 0, i, len;
    int only_ready = 1;

    reboot();
    CHECK_STR(send("db load 27649%"),
              "e-[Supplied buffer size 27649 exceeds maximum of 27648]\r\n" READY);
    /* The refused load leaves no buffer to write into (the reference kept the size). */
    CHECK_STR(send("db 00%"), "e-[Command 'db' data needs a 'db load N' first]\r\n" READY);
    CHECK_STR(send("db print%"), READY);

    CHECK_STR(send("db load 27648%"), "m-[Expecting 27648 bytes]\r\n" READY);
    while (loaded < 27648) {
        size_t chunk = 27648 - loaded < 38 ? 27648 - loaded : 38;
        const char *out;
        strcpy(cmd, "db ");
        for (i = 0, len = 3; i < chunk; i++, len += 2) {
            sprintf(cmd + len, "%02x", (unsigned)((loaded + i) * 7 % 256));
        }
        strcat(cmd, "%");
        loaded += chunk;
        out = send(cmd);
        if (loaded < 27648) {
            only_ready &= strcmp(out, READY) == 0;
        } else {
            CHECK_STR(out, "m-load-done\r\n" READY);
        }
    }
    CHECK(only_ready);
    CHECK_STR(send("db 00%"), "e-[Buffer already full: 27648 of 27648 bytes loaded]\r\n" READY);

    fake_input_bytes = 27648;
    send("infer 1 0%");
    CHECK(fake_runs == 1);
    for (i = 0; i < 27648 && fake_seen_input[i] == (uint8_t)(i * 7 % 256); i++) {
    }
    CHECK(i == 27648);
}

static void test_db_data_errors(void)
{
    reboot();
    CHECK_STR(send("db 0102%"), "e-[Command 'db' data needs a 'db load N' first]\r\n" READY);
    send("db load 4%");
    CHECK_STR(send("db 012%"), "e-[Insufficent number of hex digits]\r\n" READY);
    CHECK_STR(send("db 0%"), "e-[Insufficent number of hex digits]\r\n" READY);
    CHECK_STR(send("db 01zz%"), "e-[Invalid hex digit 'zz']\r\n" READY);
    CHECK_STR(send("db g0%"), "e-[Invalid hex digit 'g0']\r\n" READY);
    CHECK_STR(send("db 0G%"), "e-[Invalid hex digit '0G']\r\n" READY);
    CHECK_STR(send("db 0x01%"), "e-[Invalid hex digit '0x']\r\n" READY);
    /* A refused chunk stores nothing, not even its valid leading pairs. */
    CHECK_STR(send("db print%"), "m-buffer-00-00-00-00\r\n" READY);
    CHECK_STR(send("db aBcD%"), READY);
    CHECK_STR(send("db Ef01%"), "m-load-done\r\n" READY);
    CHECK_STR(send("db print%"), "m-buffer-ab-cd-ef-01\r\n" READY);
    CHECK_STR(send("db 02%"), "e-[Buffer already full: 4 of 4 bytes loaded]\r\n" READY);
}

static void test_db_chunks_and_print(void)
{
    reboot();
    CHECK_STR(send("db print%"), READY);
    CHECK_STR(send("db load 10%"), "m-[Expecting 10 bytes]\r\n" READY);
    CHECK_STR(send("db 00010203%"), READY);
    CHECK_STR(send("db 04050607%"), READY);
    CHECK_STR(send("db 0809%"), "m-load-done\r\n" READY);
    /* No blank line after a partial last line (the reference printed one). */
    CHECK_STR(send("db print%"),
              "m-buffer-00-01-02-03-04-05-06-07\r\nm-buffer-08-09\r\n" READY);

    /* Digits beyond the announced size are ignored, as in the reference, even invalid ones. */
    CHECK_STR(send("db load 2%"), "m-[Expecting 2 bytes]\r\n" READY);
    CHECK_STR(send("db 0a0b0czz%"), "m-load-done\r\n" READY);
    CHECK_STR(send("db print%"), "m-buffer-0a-0b\r\n" READY);

    /* A new load starts over; exactly 8 bytes print as one line. */
    send("db load 8%db 1111%");
    CHECK_STR(send("db load 8%"), "m-[Expecting 8 bytes]\r\n" READY);
    CHECK_STR(send("db 2122232425262728%"), "m-load-done\r\n" READY);
    CHECK_STR(send("db print%"), "m-buffer-21-22-23-24-25-26-27-28\r\n" READY);
}

static void test_infer_transcript(void)
{
    reboot();
    fake_clock_us = 1000;
    fake_invoke_us = 250;
    send("db load 4%db 04080c10%");
    CHECK_STR(send("infer 3 2%"), "m-warmup-start-2\r\n"
                                  "m-warmup-done\r\n"
                                  "m-infer-start-3\r\n"
                                  "m-lap-us-1500\r\n"
                                  "m-lap-us-2250\r\n"
                                  "m-infer-done\r\n"
                                  "m-results-[1,2,3,4]\r\n" READY);
    /* Every run was handed the whole input (TFLM may overwrite its copy during a run, and the fake
     * model does). */
    CHECK(fake_runs == 5);
    CHECK(memcmp(fake_seen_input, "\x04\x08\x0c\x10", 4) == 0);
    CHECK_STR(send("results%"), "m-results-[1,2,3,4]\r\n" READY);
}

static void test_infer_defaults(void)
{
    const char *out;
    reboot();
    send("db load 4%db 01020304%");
    out = send("infer%");
    CHECK(starts_with(out, "m-warmup-start-10\r\nm-warmup-done\r\nm-infer-start-1\r\n"));
    CHECK(fake_runs == 11);
    out = send("infer 3%");
    CHECK(starts_with(out, "m-warmup-start-10\r\nm-warmup-done\r\nm-infer-start-3\r\n"));
    CHECK(fake_runs == 11 + 13);
    out = send("infer 1 0%");
    CHECK(starts_with(out, "m-warmup-start-0\r\nm-warmup-done\r\nm-infer-start-1\r\n"));
    CHECK(fake_runs == 11 + 13 + 1);
}

static void test_infer_argument_errors(void)
{
    reboot();
    send("db load 4%db 01020304%");
    CHECK_STR(send("infer 0%"), "e-[Inference iterations must be >0]\r\n" READY);
    CHECK_STR(send("infer -1%"), "e-[Inference iterations must be >0]\r\n" READY);
    CHECK_STR(send("infer x%"), "e-[Inference iterations must be >0]\r\n" READY);
    CHECK_STR(send("infer 99999999999%"), "e-[Inference iterations must be >0]\r\n" READY);
    CHECK_STR(send("infer 2 -1%"), "e-[Inference warmup must be >=0]\r\n" READY);
    CHECK_STR(send("infer 2 x%"), "e-[Inference warmup must be >=0]\r\n" READY);
    CHECK(fake_runs == 0);
}

static void test_infer_input_errors(void)
{
    reboot();
    CHECK_STR(send("infer 1 0%"), "e-[Input is 0 bytes; the model expects 4]\r\n" READY);
    send("db load 3%db 010203%");
    CHECK_STR(send("infer 1 0%"), "e-[Input is 3 bytes; the model expects 4]\r\n" READY);
    send("db load 4%db 0102%");
    CHECK_STR(send("infer 1 0%"), "e-[Input incomplete: 2 of 4 bytes loaded]\r\n" READY);
    CHECK(fake_runs == 0);
}

static void test_infer_failure_and_results(void)
{
    reboot();
    CHECK_STR(send("results%"), "e-[No results: run 'infer' first]\r\n" READY);
    send("db load 4%db 01020304%");
    fake_fail_on_run = 3;
    CHECK_STR(send("infer 2 1%"), "m-warmup-start-1\r\nm-warmup-done\r\nm-infer-start-2\r\n"
                                  "m-lap-us-0\r\ne-[Inference failed: fake failure]\r\n" READY);
    CHECK_STR(send("results%"), "e-[No results: run 'infer' first]\r\n" READY);
    fake_fail_on_run = 0;
    send("infer 1 0%");
    CHECK_STR(send("results%"), "m-results-[0.25,0.5,0.75,1]\r\n" READY);
}

static void expect_results(const float v[FAKE_OUTPUTS], const char *want, const char *file, int line)
{
    fake_set_outputs(v, FAKE_OUTPUTS);
    check_str(send("results%"), want, file, line);
}
#define EXPECT_RESULTS(want, ...)                                                                   \
    do {                                                                                           \
        const float v_[FAKE_OUTPUTS] = {__VA_ARGS__};                                              \
        expect_results(v_, "m-results-[" want "]\r\n" READY, __FILE__, __LINE__);                \
    } while (0)

/* Outputs print in positional notation with at most 9 significant digits and no trailing zeros,
 * which parses back to the same float32 (the simulated boards print numpy's shortest form of the
 * same values; the two agree on values like these). */
static void test_results_number_format(void)
{
    uint32_t state = 12345u;
    int k, i, round_trips = 1;

    reboot();
    send("db load 4%db 01020304%infer 1 0%");
    EXPECT_RESULTS("1,0,-0,-2.5", 1.0f, 0.0f, -0.0f, -2.5f);
    EXPECT_RESULTS("0.00390625,0.99609375,0.5,0.1875", 1 / 256.0f, 255 / 256.0f, 0.5f, 0.1875f);
    EXPECT_RESULTS("0.100000001,123.456001,1000000,16777216", 0.1f, 123.456f, 1e6f, 16777216.0f);
    /* The smallest subnormal, the largest float, the smallest normal (numpy's %.9g digits). */
    EXPECT_RESULTS("0.00000000000000000000000000000000000000000000140129846,"
                   "340282347000000000000000000000000000000,"
                   "0.0000000000000000000000000000000000000117549435,-0.333333343",
                   1.401298464e-45f, 3.402823466e38f, 1.175494351e-38f, -1.0f / 3.0f);
    EXPECT_RESULTS("nan,inf,-inf,0.000000100000001", (float)NAN, (float)INFINITY, -(float)INFINITY,
                   1e-7f);

    /* Int8 dequantized outputs (k/256) and random bit patterns all parse back unchanged. */
    for (k = 0; k < 4000; k++) {
        float v[FAKE_OUTPUTS];
        char line[400], *p;
        for (i = 0; i < FAKE_OUTPUTS; i++) {
            uint32_t bits;
            if (k < 64) {
                v[i] = (float)(k * FAKE_OUTPUTS + i - 128) / 256.0f;
                continue;
            }
            do {
                state = state * 1664525u + 1013904223u;
                bits = state;
            } while ((bits & 0x7f800000u) == 0x7f800000u); /* skip inf and nan */
            memcpy(&v[i], &bits, sizeof v[i]);
        }
        fake_set_outputs(v, FAKE_OUTPUTS);
        strcpy(line, send("results%"));
        p = line + strlen("m-results-[");
        for (i = 0; i < FAKE_OUTPUTS; i++) {
            char *end;
            float back = strtof(p, &end);
            if (memcmp(&back, &v[i], sizeof back) != 0 || (*end != ',' && *end != ']')) {
                fprintf(stderr, "value %d of %s does not parse back to %.9g\n", i, line, (double)v[i]);
                round_trips = 0;
            }
            p = end + 1;
        }
    }
    CHECK(round_trips);
}

/* Every line of `out` ends " *XXXXXXXX\r\n" with the CRC-32 of what precedes " *"; `untagged`
 * receives `out` without the tags. */
static int all_lines_tagged(const char *out, char *untagged)
{
    const char *line = out, *end;
    int ok = 1;
    *untagged = '\0';
    while ((end = strstr(line, "\r\n")) != NULL) {
        size_t n = (size_t)(end - line);
        char want[9];
        if (n < 10 || line[n - 10] != ' ' || line[n - 9] != '*') {
            fprintf(stderr, "untagged line: %.*s\n", (int)n, line);
            return 0;
        }
        sprintf(want, "%08lX", (unsigned long)lb_crc32(line, n - 10));
        if (memcmp(want, line + n - 8, 8) != 0) {
            fprintf(stderr, "bad tag on line: %.*s (want %s)\n", (int)n, line, want);
            ok = 0;
        }
        strncat(untagged, line, n - 10);
        strcat(untagged, "\r\n");
        line = end + 2;
    }
    return ok && *line == '\0';
}

static void test_crc32_values(void)
{
    CHECK(lb_crc32("123456789", 9) == 0xCBF43926u); /* the CRC-32 check value */
    CHECK(lb_crc32("", 0) == 0u);
    CHECK(lb_crc32("m-ready", 7) == 0x22889601u); /* zlib.crc32(b"m-ready") */
}

static void test_crc_extension(void)
{
    static char plain[1 << 16];
    const char *out;

    reboot();
    fake_clock_us = 42;
    CHECK_STR(send("crc32 on%"), "m-crc32-[on] *628A0723\r\nm-ready *22889601\r\n");
    CHECK_STR(send("name%"), "m-name-dut-[labbench-host] *199DB537\r\nm-ready *22889601\r\n");
    CHECK_STR(send("timestamp%"), "m-lap-us-42 *B0F8E1EC\r\nm-ready *22889601\r\n");
    CHECK_STR(send("crc32%"), "e-[Command 'crc32' takes on or off] *90BCD5F1\r\nm-ready *22889601\r\n");
    CHECK_STR(send("crc32 maybe%"), "e-[Command 'crc32' takes on or off] *90BCD5F1\r\nm-ready *22889601\r\n");

    /* Lines printed in pieces (db print, results) and the menu's empty line are tagged whole. */
    fake_invoke_us = 250;
    fake_input_bytes = 10;
    out = send("db load 10%db 00010203040506070809%");
    CHECK(all_lines_tagged(out, plain));
    CHECK_STR(plain, "m-[Expecting 10 bytes]\r\n" READY "m-load-done\r\n" READY);
    out = send("db print%infer 3 2%results%");
    CHECK(all_lines_tagged(out, plain));
    CHECK_STR(plain, "m-buffer-00-01-02-03-04-05-06-07\r\nm-buffer-08-09\r\n" READY
                     "m-warmup-start-2\r\nm-warmup-done\r\nm-infer-start-3\r\n"
                     "m-lap-us-542\r\nm-lap-us-1292\r\nm-infer-done\r\n"
                     "m-results-[0,0.25,0.5,0.75]\r\n" READY "m-results-[0,0.25,0.5,0.75]\r\n" READY);
    out = send("help%");
    CHECK(all_lines_tagged(out, plain));
    CHECK(strstr(out, "\r\n *00000000\r\n") != NULL); /* the empty line after the title */
    CHECK(strstr(plain, "crc32 on|off") != NULL);
    out = send("profile%bogus%");
    CHECK(all_lines_tagged(out, plain));
    CHECK(strstr(plain, "m-ext-[crc32]\r\n") != NULL && strstr(plain, "e-[Unknown command: bogus]\r\n"));
    out = send("boot%");
    CHECK(all_lines_tagged(out, plain));
    CHECK(starts_with(plain, "m-boot-us-["));

    /* Off again: the reply to `crc32 off` is already untagged. */
    CHECK_STR(send("crc32 off%"), "m-crc32-[off]\r\n" READY);
    CHECK_STR(send("name%"), "m-name-dut-[labbench-host]\r\n" READY);

    /* A reset turns it off. */
    send("crc32 on%");
    fake_clock_us = 0;
    CHECK_STR(boot(), "m-timestamp-mode-performance\r\nm-lap-us-0\r\nm-init-done\r\n" READY);
    CHECK_STR(send("name%"), "m-name-dut-[labbench-host]\r\n" READY);
}

/* The MLPerf Tiny reference models' table, by sha256 and by ID. */
static void test_mlperf_table(void)
{
    static const char *const ids[] = {"ic01", "kws01", "vww01", "ad01"};
    size_t i;
    for (i = 0; i < 4; i++) {
        const lb_mlperf_model *m = lb_mlperf_find(NULL, ids[i]);
        CHECK(m != NULL && strcmp(m->id, ids[i]) == 0 && strlen(m->sha256) == 64);
        CHECK(m != NULL && lb_mlperf_find(m->sha256, "other") == m);
        CHECK(m != NULL && lb_mlperf_find(m->sha256, NULL) == m);
    }
    CHECK(lb_mlperf_find(FAKE_MODEL_SHA256, "fake01") == NULL);
    CHECK(lb_mlperf_find(NULL, NULL) == NULL);
    CHECK(lb_mlperf_find(NULL, "IC01") == NULL);
    CHECK(lb_mlperf_find(lb_mlperf_find(NULL, "kws01")->sha256, "ic01") == lb_mlperf_find(NULL, "kws01"));
}

static const char *boot_as(const char *model_name)
{
    static lb_dut_config named;
    named = config;
    named.model_name = model_name;
    lb_dut_init(&named);
    return fake_take_output();
}

#define PROFILE_AS(id)                                                                             \
    "m-profile-[ULPMark for tinyML Firmware V0.0.1]\r\nm-model-[" id "]\r\nm-ext-[crc32]\r\n"       \
    "m-ext-[boot]\r\nm-ext-[hi]\r\nm-model-sha256-[" FAKE_MODEL_SHA256 "]\r\nm-model-bytes-[19]\r\n"

/* ic01/vww01: uint8 images, 128 subtracted (th_load_tensor); the ID replaces the name. */
static void test_mlperf_uint8_images(void)
{
    fake_reset();
    boot_as("vww01");
    CHECK_STR(send("profile%"), PROFILE_AS("vww01") "m-arena-bytes-[2256]\r\n" READY);
    CHECK_STR(send("db load 4%db 007f80ff%"), "m-[Expecting 4 bytes]\r\n" READY "m-load-done\r\n" READY);
    /* The tensor is int8 {-128, -1, 0, 127}; the fake model prints its bytes / 4. */
    CHECK_STR(send("infer 2 1%"), "m-warmup-start-1\r\nm-warmup-done\r\nm-infer-start-2\r\n"
                                  "m-lap-us-0\r\nm-lap-us-0\r\nm-infer-done\r\n"
                                  "m-results-[32,63.75,0,31.75]\r\n" READY);
    CHECK(fake_runs == 3 && memcmp(fake_seen_input, "\x80\xff\x00\x7f", 4) == 0);
    /* The buffer keeps the bytes as sent; the next infer converts them again. */
    CHECK_STR(send("db print%"), "m-buffer-00-7f-80-ff\r\n" READY);
    send("infer 1 0%");
    CHECK(memcmp(fake_seen_input, "\x80\xff\x00\x7f", 4) == 0);

    fake_reset();
    fake_input_int8 = 0;
    boot_as("ic01");
    CHECK_STR(send("profile%"),
              PROFILE_AS("ic01")
              "e-[Model initialisation failed: the MLPerf Tiny input format needs an int8 input "
              "tensor]\r\n" READY);
}

/* kws01: the int8 features as they are. */
static void test_mlperf_int8_features(void)
{
    fake_reset();
    boot_as("kws01");
    send("db load 4%db 007f80ff%infer 1 0%");
    CHECK(memcmp(fake_seen_input, "\x00\x7f\x80\xff", 4) == 0);
}

static void send_floats(const float *x, size_t n)
{
    char cmd[200], *p;
    size_t i, k;
    sprintf(cmd, "db load %lu%%", (unsigned long)(4 * n));
    send(cmd);
    p = cmd + sprintf(cmd, "db ");
    for (i = 0; i < n; i++) {
        const uint8_t *b = (const uint8_t *)&x[i]; /* little-endian host, as the boards */
        for (k = 0; k < 4; k++) {
            p += sprintf(p, "%02x", (unsigned)b[k]);
        }
    }
    strcpy(p, "%");
    CHECK_STR(send(cmd), "m-load-done\r\n" READY);
}

/* ad01: float32 quantized with the input's scale and zero point as QuantizeFloatToInt8 does
 * (round halves away from zero, clamp), and the reconstruction's MSE as the one result. */
static void test_mlperf_float_input_and_mse(void)
{
    const float x[4] = {1.0f, -1.25f, 0.25f, 100.0f};
    const float halves[4] = {0.75f, -0.75f, -1e30f, (float)NAN};
    fake_reset();
    fake_input_scale = 0.5f;
    fake_input_zero_point = 1;
    fake_output_count = 4;
    boot_as("ad01");
    CHECK_STR(send("db load 4%"), "m-[Expecting 4 bytes]\r\n" READY);
    CHECK_STR(send("db 00000000%infer 1 0%"),
              "m-load-done\r\n" READY "e-[Input is 4 bytes; the model expects 16]\r\n" READY);
    send_floats(x, 4);
    /* 1/0.5 = 2 -> 3; -1.25/0.5 = -2.5 -> -3 -> -2; 0.25/0.5 = 0.5 -> 1 -> 2; 200 -> 127 */
    CHECK_STR(send("infer 1 0%"), "m-warmup-start-0\r\nm-warmup-done\r\nm-infer-start-1\r\n"
                                  "m-lap-us-0\r\nm-lap-us-0\r\nm-infer-done\r\n"
                                  "m-results-[2212.6875]\r\n" READY);
    CHECK(memcmp(fake_seen_input, "\x03\xfe\x02\x7f", 4) == 0);
    /* outputs {3, 254, 2, 127} / 4: ((0.75-1)^2 + (63.5+1.25)^2 + (0.5-0.25)^2 + (31.75-100)^2) / 4 */
    CHECK_STR(send("results%"), "m-results-[2212.6875]\r\n" READY);
    /* 1.5 -> 2 -> 3; -1.5 -> -2 -> -1; -2e30 clamps to -128; NaN -> the zero point */
    send_floats(halves, 4);
    send("infer 1 0%");
    CHECK(memcmp(fake_seen_input, "\x03\xff\x80\x01", 4) == 0);

    fake_reset();
    fake_input_bytes = 8; /* 4 outputs */
    boot_as("ad01");
    CHECK_STR(send("profile%"), PROFILE_AS("ad01")
                                "e-[Model initialisation failed: the MSE result needs as many outputs "
                                "as inputs]\r\n" READY);
    fake_reset();
    fake_input_bytes = 5530; /* 4 x 5530 floats and the 5530 quantized bytes exceed 27648 */
    fake_output_count = 5530;
    boot_as("ad01");
    CHECK(strstr(send("profile%"), "e-[Model initialisation failed: the float input and its "
                                   "quantized copy exceed the db buffer]\r\n") != NULL);
}

static void test_run_loop(void)
{
    reboot();
    fake_input = "name%\r\nbogus%";
    lb_dut_run();
    CHECK_STR(fake_take_output(),
              "m-name-dut-[labbench-host]\r\n" READY "e-[Unknown command: bogus]\r\n" READY);
}


/* ---- the hi extension ---- */

/* Four inputs of 4 bytes; the fake model's outputs are the bytes / 4:
 *   0 0 0 4 -> 0,0,0,1        a probability vector: p1 = 1, p2 = 0, class 3
 *   1 0 0 3 -> .25,0,0,.75    p1 = .75, p2 = .25, class 3
 *   4 4 4 4 -> 1,1,1,1        not one (sums to 4): softmax, p1 = p2 = .25, class 0
 *   0 0 2 2 -> 0,0,.5,.5      p1 = p2 = .5, class 2 (the first of the two)
 * The fake server answers (first byte) % 4: 0, 1, 0, 0. */
#define HI_INPUTS "db load 16%db 00000004010000030404040400000202%"

static void hi_setup(const char *decision)
{
    char cmd[96];
    reboot();
    fake_net_classes = 4;
    fake_invoke_us = 100;
    fake_net_us = 2500;
    send(HI_INPUTS);
    sprintf(cmd, "hi-cfg %s%%hi-srv 10.0.0.2 9000%%", decision);
    send(cmd);
    fake_clock_us = 1000;
}

static void test_hi_config_echo(void)
{
    reboot();
    CHECK(strstr(send("profile%"), "m-ext-[hi]\r\n") != NULL);
    CHECK(strstr(send("help%"), "hi N          : ") != NULL);
    CHECK_STR(send("hi-cfg lr 1.5 -2 0.25%"), "m-hi-cfg-[lr,1.5,-2,0.25]\r\n" READY);
    CHECK_STR(send("hi-cfg lr 12.5e-1 -2E0 25e-2%"), "m-hi-cfg-[lr,1.25,-2,0.25]\r\n" READY);
    CHECK_STR(send("hi-cfg th 0.7%"), "m-hi-cfg-[th,0.699999988]\r\n" READY); /* as a float */
    CHECK_STR(send("hi-cfg remote%"), "m-hi-cfg-[remote]\r\n" READY);
    CHECK_STR(send("hi-srv 192.168.1.20 8765%"), "m-hi-srv-[192.168.1.20:8765]\r\n" READY);
    CHECK_STR(send("hi-srv 0.0.0.0 1%"), "m-hi-srv-[0.0.0.0:1]\r\n" READY);

    CHECK_STR(send("hi-cfg%"), "e-[Command 'hi-cfg' takes lr W1 W2 B, th THETA or remote]\r\n" READY);
    CHECK_STR(send("hi-cfg LR 1 2 3%"),
              "e-[Command 'hi-cfg' takes lr W1 W2 B, th THETA or remote]\r\n" READY);
    CHECK_STR(send("hi-cfg lr 1 2%"), "e-[Command 'hi-cfg lr' takes 3 numbers]\r\n" READY);
    CHECK_STR(send("hi-cfg lr 1 2 3 4%"), "e-[Command 'hi-cfg lr' takes 3 numbers]\r\n" READY);
    CHECK_STR(send("hi-cfg remote 1%"), "e-[Command 'hi-cfg remote' takes 0 numbers]\r\n" READY);
    {
        static const char *bad[] = {"nan", "inf", "1e39", "0x10", "+1", ".5", "5.", "1e", "--1",
                                    "1,5", "1.5x"};
        char cmd[64], want[96];
        size_t i;
        for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            sprintf(cmd, "hi-cfg th %s%%", bad[i]);
            sprintf(want, "e-[Invalid number '%s': a finite decimal is needed]\r\n" READY, bad[i]);
            CHECK_STR(send(cmd), want);
        }
    }
    {
        static const char *bad[] = {"hi-srv%", "hi-srv 1.2.3.4%", "hi-srv 256.1.1.1 80%",
                                    "hi-srv 01.2.3.4 80%", "hi-srv 1.2.3 80%", "hi-srv 1.2.3.4.5 80%",
                                    "hi-srv 1.2.3.4 0%", "hi-srv 1.2.3.4 65536%",
                                    "hi-srv 1.2.3.4 80 x%", "hi-srv 1.2.3.-4 80%"};
        size_t i;
        for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            CHECK_STR(send(bad[i]), "e-[Command 'hi-srv' takes an IPv4 address A.B.C.D and a port "
                                    "1..65535]\r\n" READY);
        }
    }
    /* failures keep the settings before them: a pass still runs */
    send("db load 4%db 00000004%");
    fake_net_classes = 4;
    CHECK(starts_with(send("hi 1%"), "m-hi-[0,0,0,0,-1,0,0,0,0]\r\nm-hi-done-[1,"));
    CHECK_STR(fake_net_address, "0.0.0.0:1");
}

static void test_hi_threshold_pass(void)
{
    hi_setup("th 0.8");
    CHECK_STR(send("hi 4%"), "m-hi-[0,1,0,1,3,3,100,0,0]\r\n"
                             "m-hi-[1,0.75,0.25,0,3,1,100,0,2500]\r\n"
                             "m-hi-[2,0.25,0.25,0,0,0,100,0,2500]\r\n"
                             "m-hi-[3,0.5,0.5,0,2,0,100,0,2500]\r\n"
                             "m-hi-done-[4,1000,8900]\r\n" READY);
    CHECK(fake_runs == 4);
    CHECK(fake_net_requests == 3 && fake_net_bad_requests == 0 && fake_net_last_id == 3);
    CHECK(fake_net_connects == 1); /* kept open */
    CHECK_STR(fake_net_address, "10.0.0.2:9000");
    /* a second pass keeps counting requests on the same connection */
    fake_clock_us = 0;
    CHECK(strstr(send("hi 4%"), "m-hi-done-[4,0,7900]\r\n") != NULL);
    CHECK(fake_net_last_id == 6 && fake_net_connects == 1);
    /* theta 0 accepts everything: no request */
    send("hi-cfg th 0%");
    CHECK(strstr(send("hi 4%"), "m-hi-[2,0.25,0.25,1,0,0,100,0,0]\r\n") != NULL);
    CHECK(fake_net_requests == 6);
}

static void test_hi_logistic_pass(void)
{
    /* accept when 10 p1 - 10 p2 - 2 >= 0: p1 - p2 >= 0.2 */
    hi_setup("lr 10 -10 -2");
    CHECK_STR(send("hi 4%"), "m-hi-[0,1,0,1,3,3,100,0,0]\r\n"
                             "m-hi-[1,0.75,0.25,1,3,3,100,0,0]\r\n"
                             "m-hi-[2,0.25,0.25,0,0,0,100,0,2500]\r\n"
                             "m-hi-[3,0.5,0.5,0,2,0,100,0,2500]\r\n"
                             "m-hi-done-[4,1000,6400]\r\n" READY);
    CHECK(fake_net_requests == 2);
    /* the boundary itself accepts: 0.5 p1 - 0.25 >= 0 with p1 = .5 */
    send("hi-cfg lr 0.5 0 -0.25%");
    CHECK(strstr(send("hi 4%"), "m-hi-[3,0.5,0.5,1,2,2,100,0,0]\r\n") != NULL);
}

static void test_hi_remote_pass(void)
{
    hi_setup("remote");
    CHECK_STR(send("hi 4%"), "m-hi-[0,0,0,0,-1,0,0,0,2500]\r\n"
                             "m-hi-[1,0,0,0,-1,1,0,0,2500]\r\n"
                             "m-hi-[2,0,0,0,-1,0,0,0,2500]\r\n"
                             "m-hi-[3,0,0,0,-1,0,0,0,2500]\r\n"
                             "m-hi-done-[4,1000,11000]\r\n" READY);
    CHECK(fake_runs == 0 && fake_net_requests == 4);
}

static void test_hi_refusals(void)
{
    reboot();
    send("db load 16%");
    CHECK_STR(send("hi 4%"), "e-[hi: no decision module: send hi-cfg first]\r\n" READY);
    send("hi-cfg remote%");
    CHECK_STR(send("hi 4%"), "e-[hi: no edge server: send hi-srv first]\r\n" READY);
    send("hi-srv 127.0.0.1 80%");
    CHECK_STR(send("hi 4%"), "e-[Input incomplete: 0 of 16 bytes loaded]\r\n" READY);
    CHECK_STR(send("hi 3%"), "e-[hi: db holds 16 bytes; 3 inputs of 4 bytes are 12]\r\n" READY);
    CHECK_STR(send("hi 5%"), "e-[hi: db holds 16 bytes; 5 inputs of 4 bytes are 20]\r\n" READY);
    CHECK_STR(send("hi 0%"), "e-[Command 'hi' takes a sample count of 1 to 256]\r\n" READY);
    CHECK_STR(send("hi 257%"), "e-[Command 'hi' takes a sample count of 1 to 256]\r\n" READY);
    CHECK_STR(send("hi%"), "e-[Command 'hi' takes a sample count of 1 to 256]\r\n" READY);
    CHECK_STR(send("hi -1%"), "e-[Command 'hi' takes a sample count of 1 to 256]\r\n" READY);
    CHECK(fake_net_connects == 0);

    fake_reset();
    fake_input_bytes = 1; /* one output */
    boot();
    send("hi-cfg remote%hi-srv 127.0.0.1 80%db load 1%db 00%");
    CHECK_STR(send("hi 1%"), "e-[hi: the model has 1 outputs; the decision needs at least 2]\r\n" READY);

    fake_reset();
    boot_as("vww01");
    send("hi-cfg remote%hi-srv 127.0.0.1 80%db load 4%db 00000000%");
    CHECK_STR(send("hi 1%"), "e-[hi: vww01's db input is not its input tensor: hi offloads tensor "
                             "bytes]\r\n" READY);

    fake_reset();
    fake_init_error = "arena too small";
    boot();
    send("hi-cfg remote%hi-srv 127.0.0.1 80%");
    CHECK_STR(send("hi 1%"), "e-[No model: arena too small]\r\n" READY);

    /* a reset forgets the settings */
    reboot();
    send("db load 4%db 00000004%");
    CHECK_STR(send("hi 1%"), "e-[hi: no decision module: send hi-cfg first]\r\n" READY);
}

/* Offload every input (theta 2 > any p1) with the server's request `at` broken as `fault`; the
 * reply to `hi 4`. */
static const char *hi_broken(fake_net_fault_kind fault, unsigned long at)
{
    hi_setup("th 2");
    fake_net_fault = fault;
    fake_net_break_at = at;
    return send("hi 4%");
}

#define SAMPLE0 "m-hi-[0,1,0,0,3,0,100,0,2500]\r\n"
#define SAMPLE1 "m-hi-[1,0.75,0.25,0,3,1,100,0,2500]\r\n"
#define OFFLOAD_FAILED(i) "e-[hi: sample " #i ": offload to 10.0.0.2:9000 failed: "

static void test_hi_server_failures(void)
{
    /* the server goes away at the second request: the kept connection is tried once more */
    CHECK_STR(hi_broken(FAKE_NET_DOWN, 2),
              SAMPLE0 OFFLOAD_FAILED(1) "connection refused]\r\n" READY);
    CHECK(fake_net_connects == 1);
    /* ... and the pass after fails at once */
    CHECK_STR(send("hi 4%"), OFFLOAD_FAILED(0) "connection refused]\r\n" READY);

    /* a connection the server dropped once is opened again and the pass completes */
    CHECK(strstr(hi_broken(FAKE_NET_DROP_ONCE, 2), "m-hi-done-[4,") != NULL);
    CHECK(fake_net_connects == 2 && fake_net_requests == 5 && fake_net_last_id == 4);

    /* a new connection that fails is not retried */
    CHECK_STR(hi_broken(FAKE_NET_SILENT, 1), OFFLOAD_FAILED(0) "no reply within 5 s]\r\n" READY);
    CHECK(fake_net_connects == 1);

    CHECK_STR(hi_broken(FAKE_NET_BAD_ID, 2),
              SAMPLE0 OFFLOAD_FAILED(1) "a reply to request 3, expected 2]\r\n" READY);
    CHECK_STR(hi_broken(FAKE_NET_BAD_MAGIC, 1),
              OFFLOAD_FAILED(0) "reply magic 4c425831, expected LBR1]\r\n" READY);
    CHECK(starts_with(hi_broken(FAKE_NET_BAD_CRC, 2), SAMPLE0 OFFLOAD_FAILED(1) "reply CRC-32 "));
    CHECK_STR(hi_broken(FAKE_NET_REFUSED, 1),
              OFFLOAD_FAILED(0) "refused with status 2: payload of 3 bytes, the model's input is "
                                "int8[1, 4] (4 bytes)]\r\n" READY);
    CHECK_STR(hi_broken(FAKE_NET_BAD_CLASS, 2),
              SAMPLE0 OFFLOAD_FAILED(1) "class 4 outside the model's 4 outputs]\r\n" READY);
    /* after a failure the connection is closed; the next pass opens a new one and completes */
    CHECK(strstr(send("hi 4%"), "m-hi-done-[4,") != NULL);
    CHECK(fake_net_connects == 2);
}

int main(void)
{
    test_nothing_answered_before_init();
    test_boot_banner();
    test_boot_with_failing_model();
    test_boot_report();
    test_name_profile_timestamp();
    test_help();
    test_unknown_and_empty_commands();
    test_line_endings_are_ignored();
    test_commands_split_and_joined();
    test_command_length_limit();
    test_db_argument_errors();
    test_db_capacity();
    test_db_data_errors();
    test_db_chunks_and_print();
    test_infer_transcript();
    test_infer_defaults();
    test_infer_argument_errors();
    test_infer_input_errors();
    test_infer_failure_and_results();
    test_results_number_format();
    test_crc32_values();
    test_crc_extension();
    test_mlperf_table();
    test_mlperf_uint8_images();
    test_mlperf_int8_features();
    test_mlperf_float_input_and_mse();
    test_run_loop();
    test_hi_config_echo();
    test_hi_threshold_pass();
    test_hi_logistic_pass();
    test_hi_remote_pass();
    test_hi_refusals();
    test_hi_server_failures();
    return check_summary("test_dut");
}
