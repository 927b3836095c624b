/* Plain assertions for the host tests: each failure prints where and what, the run goes on,
 * and check_summary's exit status says whether anything failed. */
#ifndef CHECK_H
#define CHECK_H

#include <stdio.h>
#include <string.h>

static int check_count, check_failures;

static void check_true(int ok, const char *what, const char *file, int line)
{
    check_count++;
    if (!ok) {
        check_failures++;
        fprintf(stderr, "%s:%d: check failed: %s\n", file, line, what);
    }
}

/* Byte-exact string comparison; shows both sides with \r and \n made visible. */
static void check_str(const char *got, const char *want, const char *file, int line)
{
    check_count++;
    if (strcmp(got, want) != 0) {
        const char *side[2] = {got, want};
        const char *label[2] = {"got ", "want"};
        int k;
        check_failures++;
        fprintf(stderr, "%s:%d: strings differ\n", file, line);
        for (k = 0; k < 2; k++) {
            const char *p;
            fprintf(stderr, "  %s: \"", label[k]);
            for (p = side[k]; *p; p++) {
                fputs(*p == '\r' ? "\\r" : *p == '\n' ? "\\n" : (char[2]){*p, 0}, stderr);
            }
            fputs("\"\n", stderr);
        }
    }
}

static int check_summary(const char *suite)
{
    printf("%s: %d checks, %d failed\n", suite, check_count, check_failures);
    return check_failures == 0 ? 0 : 1;
}

#define CHECK(cond) check_true((cond) != 0, #cond, __FILE__, __LINE__)
#define CHECK_STR(got, want) check_str((got), (want), __FILE__, __LINE__)

#endif /* CHECK_H */
