/* SHA-256 against the FIPS 180-2 examples and lengths around the padding boundaries
 * (digests from Python's hashlib). */
#include <stdint.h>
#include <stdlib.h>

#include "check.h"
#include "lb_sha256.h"

static const char *digest(const uint8_t *data, size_t n)
{
    static char hex[65];
    lb_sha256_hex(data, n, hex);
    return hex;
}

static const char *digest_of_counting_bytes(size_t n)
{
    uint8_t data[128];
    size_t i;
    for (i = 0; i < n; i++) {
        data[i] = (uint8_t)i;
    }
    return digest(data, n);
}

int main(void)
{
    static const struct {
        size_t n;
        const char *hex;
    } counting[] = {
        /* 55 bytes: the last length padded in one block; 56: the first that needs two. */
        {55, "463eb28e72f82e0a96c0a4cc53690c571281131f672aa229e0d45ae59b598b59"},
        {56, "da2ae4d6b36748f2a318f23e7ab1dfdf45acdc9d049bd80e59de82a60895f562"},
        {63, "29af2686fd53374a36b0846694cc342177e428d1647515f078784d69cdb9e488"},
        {64, "fdeab9acf3710362bd2658cdc9a29e8f9c757fcf9811603a8c447cd1d9151108"},
        {65, "4bfd2c8b6f1eec7a2afeb48b934ee4b2694182027e6d0fc075074f2fabb31781"},
        {119, "da18797ed7c3a777f0847f429724a2d8cd5138e6ed2895c3fa1a6d39d18f7ec6"},
        {120, "f52b23db1fbb6ded89ef42a23ce0c8922c45f25c50b568a93bf1c075420bbb7c"},
    };
    uint8_t *million;
    size_t i;

    CHECK_STR(digest(NULL, 0),
              "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    CHECK_STR(digest((const uint8_t *)"abc", 3),
              "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    CHECK_STR(digest((const uint8_t *)"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", 56),
              "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    for (i = 0; i < sizeof counting / sizeof counting[0]; i++) {
        CHECK_STR(digest_of_counting_bytes(counting[i].n), counting[i].hex);
    }
    million = malloc(1000000);
    CHECK(million != NULL);
    if (million != NULL) {
        memset(million, 'a', 1000000);
        CHECK_STR(digest(million, 1000000),
                  "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
        free(million);
    }
    return check_summary("test_sha256");
}
